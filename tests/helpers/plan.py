"""The memory planner tests' tiny model (tests/{unit,integration}/tools/test_plan.py)."""

from rlhf_jax.models import llama_bench_config


def build_tiny():
  return llama_bench_config(
      vocab_size=256,
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      max_seq_len=256,
  )
