"""The sampler tests' tiny models, prompts and jitted generate / sample calls
(tests/{unit,integration}/test_generate.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.generate import generate, prompt_batch, sample_token
from rlhf_jax.models import ModelConfig, abstract_model

# init_std well above the default so logits are peaked: argmax never hinges on a rounding error.
LLAMA = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    max_seq_len=64,
    family="llama",
    init_std=0.2,
)
GPT2 = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    mlp_dim=64,
    max_seq_len=64,
    family="gpt2",
    tie_embeddings=True,
    init_std=0.2,
)
PROMPTS = [[5, 9, 3], [7], [11, 2, 60, 8, 4, 30], [1, 1, 2, 3, 5]]
N = 8
NEVER = -1  # an eos id no model can emit


@functools.lru_cache(maxsize=None)
def _model(cfg):
  """(graphdef, params) with NumPy-drawn weights: the model's own eager init costs ~10 s of CPU
  compiles here. Norm scales near 1, everything else (biases too) N(0, init_std^2)."""
  graphdef, abstract, _ = abstract_model(cfg)
  rs = np.random.RandomState(0)

  def draw(path, leaf):
    noise = rs.randn(*leaf.shape).astype(np.float32)
    if "scale" in jax.tree_util.keystr(path):
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(cfg.init_std * noise)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def _generate(cfg, prompts=PROMPTS, **kw):
  graphdef, params = _model(cfg)
  kw = dict(dict(rng=jax.random.key(0), max_new_tokens=N, temperature=0.0, eos_id=NEVER), **kw)
  return generate(graphdef, params, *prompt_batch(prompts), **kw)


_sample = jax.jit(sample_token, static_argnames=("top_k", "top_p"))
