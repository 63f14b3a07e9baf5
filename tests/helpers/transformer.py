"""The decoder tests' random O(1) parameters and NumPy reference forward
(tests/{unit,integration}/models/test_transformer.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import (
    ModelConfig,
    abstract_model,
    apply,
)

# GQA (4 query heads on 2 KV heads) and head_dim 16 != embed_dim / num_heads, untied head.
LLAMA = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=48,
    max_seq_len=32,
    family="llama",
)
B, T = 3, 12
ATOL = 1e-5

# XLA:CPU's LLVM optimisations double compile time here and change no semantics.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
_forward = jax.jit(apply, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


def random_params(cfg, seed=0):
  """(graphdef, params) with every leaf drawn in NumPy: matrices N(0, 1/fan_in), embeddings N(0, 1),
  norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2). Built from `abstract_model`: nothing compiles."""
  graphdef, abstract, _ = abstract_model(cfg)
  fan_in = {
      "q": cfg.embed_dim,
      "k": cfg.embed_dim,
      "v": cfg.embed_dim,
      "gate": cfg.embed_dim,
      "up": cfg.embed_dim,
      "lm_head": cfg.embed_dim,
      "score": cfg.embed_dim,
      "o": cfg.num_heads * cfg.dim_per_head,
      "down": cfg.mlp_dim,
  }
  rs = np.random.RandomState(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rs.randn(*leaf.shape)
    if name == "scale":
      value = 1 + 0.1 * noise
    elif name.endswith("bias"):
      value = 0.1 * noise
    elif name in ("embed", "pos_embed"):
      value = noise
    else:
      value = noise / math.sqrt(fan_in[name])
    return jnp.asarray(value, leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def forward(graphdef, params, tokens, positions=None, segment_ids=None, cache=None):
  """`apply` on NumPy inputs; positions default to 0..T-1 and segment ids to all ones."""
  tokens = np.asarray(tokens, np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  if segment_ids is None:
    segment_ids = np.ones(tokens.shape, np.int32)
  out, cache = _forward(
      graphdef,
      params,
      jnp.asarray(tokens),
      jnp.asarray(positions, jnp.int32),
      jnp.asarray(segment_ids, jnp.int32),
      cache,
  )
  return np.asarray(out), cache
