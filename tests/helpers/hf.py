"""The HF checkpoint tests' tiny transformers models of each family, saved as safetensors, and the
logits / bit-exactness checks against them (tests/{unit,integration}/hf/test_checkpoints.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from rlhf_jax.models import apply, positions_from_mask

VOCAB = 256
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # head_dim 16: all three rope branches occur
MODELS = {
    "llama": (transformers.LlamaConfig, LLAMA),
    "llama3_rope": (
        transformers.LlamaConfig,
        {**LLAMA, "rope_theta": 50000.0, "rope_scaling": LLAMA3_ROPE},
    ),
    "llama_tied": (transformers.LlamaConfig, {**LLAMA, "tie_word_embeddings": True}),
    "qwen2": (transformers.Qwen2Config, LLAMA),
    # head_dim 32 != hidden / heads (as in Mistral NeMo): q_proj is [heads * 32, hidden].
    "mistral": (transformers.MistralConfig, {**LLAMA, "sliding_window": None, "head_dim": 32}),
    "gpt2": (
        transformers.GPT2Config,
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        ),
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Every weight random (norm scales near 1, biases too): a mapping error cannot hide behind a
  zero or one. std 0.2 makes the logits peaked, so greedy decoding has no near-ties."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen)
      is_norm = "norm" in name or ".ln_" in name
      p.copy_(1 + 0.1 * noise if is_norm and name.endswith("weight") else 0.2 * noise)


def _save(path, name: str, cls=transformers.AutoModelForCausalLM, seed: int = 0, **overrides):
  config_cls, kwargs = MODELS[name]
  model = cls.from_config(config_cls(**{**kwargs, **overrides}))
  _randomize(model, seed)
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


def build_hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: _save(root / name, name, seed=i) for i, name in enumerate(MODELS)}


def _padded_batch(seed: int = 0, batch: int = 3, length: int = 12):
  """Rows: full, right-padded, left-padded. Tokens from 1..V-1 (0 is the pad id)."""
  rs = np.random.RandomState(seed)
  mask = np.ones((batch, length), bool)
  mask[1, 8:] = False
  mask[2, :5] = False
  tokens = np.where(mask, rs.randint(1, VOCAB, (batch, length)), 0).astype(np.int32)
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  return tokens, mask, positions


def _our_logits(graphdef, params, tokens, mask, positions):
  out, _ = jax.jit(apply, static_argnums=0)(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask, jnp.int32)
  )
  return np.asarray(out)


def _assert_bit_exact(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
