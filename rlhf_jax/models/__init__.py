"""Decoder LMs (Llama family, GPT-2 family) with LM or scalar heads, used functionally."""

from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig, llama_bench_config
from rlhf_jax.models.transformer import (
    KVCache,
    Transformer,
    abstract_model,
    apply,
    apply_at,
    apply_rows,
    apply_shared_prefix,
    apply_with_hidden,
    create_model,
    group_rows,
    init_cache,
    positions_from_mask,
    split_model,
    ungroup_rows,
    unstack_layers,
)

__all__ = [
    "lora",
    "ModelConfig",
    "llama_bench_config",
    "KVCache",
    "Transformer",
    "abstract_model",
    "apply",
    "apply_at",
    "apply_rows",
    "apply_shared_prefix",
    "apply_with_hidden",
    "group_rows",
    "ungroup_rows",
    "create_model",
    "init_cache",
    "positions_from_mask",
    "split_model",
    "unstack_layers",
]
