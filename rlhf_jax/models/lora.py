"""LoRA (Hu et al. 2021) on the param tree: which leaves train, the reference (base without
adapters), merging adapters into the base, and adapters for a base loaded from an export.

A LoRA model (`ModelConfig.lora_rank > 0`) has, beside each target weight W [*in, *out] (stacked on
the `layers` axis), `W_lora_a` [*in, r] and `W_lora_b` [r, *out]; its forward is
W x + (alpha / r) B(A x) (models/layers.py). B starts at zero, so the adapted model starts as the
base. Only adapters (and a scalar head, which has no base to adapt) are trained: see
`trainable_mask` and `make_optimizer(trainable=...)`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import LORA_FIELDS, ModelConfig
from rlhf_jax.models.transformer import create_model, split_model

Params = dict[str, Any]
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
# Trained with the adapters: a reward/value model's scalar head is new (PEFT's modules_to_save).
ALWAYS_TRAINED = ("score",)


def _name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def is_adapter(path) -> bool:
  """Whether the leaf at `path` (a jax key path) is a LoRA A or B matrix."""
  return _name(path).endswith((A_SUFFIX, B_SUFFIX))


def trainable_mask(params: Params) -> Params:
  """True for the leaves a LoRA run trains: the adapters and a scalar head (`score`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_adapter(path) or _name(path) in ALWAYS_TRAINED, params
  )


def freeze_base(loss_fn: Callable) -> Callable:
  """`loss_fn` with every non-trainable leaf behind `stop_gradient`: their gradients are zeros
  without computing them (no weight-gradient matmuls for the base)."""

  def frozen_loss_fn(params, batch, rng):
    mask = trainable_mask(params)
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
    return loss_fn(params, batch, rng)

  return frozen_loss_fn


def _map_dicts(fn: Callable[[dict], dict], tree: Params) -> Params:
  """Applies `fn` to every dict of the nested param dict, innermost first."""
  if not isinstance(tree, dict):
    return tree
  return fn({k: _map_dicts(fn, v) for k, v in tree.items()})


def reference_params(params: Params) -> Params:
  """The base model without adapters, as a param tree of the LoRA model: the same base arrays (no
  copy) and every B replaced by zeros, so the same graphdef computes W x exactly. Built from the
  *current* params where it is used: a train step donates (invalidates) the params it was given,
  and the base never changes, so the reference of any step's params is the same model."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if _name(path).endswith(B_SUFFIX) else p, params
  )


def base_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without LoRA (the merged model's, or the base's)."""
  return cfg.replace(
      lora_rank=0, lora_alpha=ModelConfig.lora_alpha, lora_targets=ModelConfig.lora_targets
  )


def strip_adapters(params: Params) -> Params:
  """The param tree without its adapters (base-shaped), sharing the base arrays."""
  return _map_dicts(
      lambda d: {k: v for k, v in d.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}, params
  )


def merge_lora(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
  """(base-shaped params with W + (alpha / r) A B folded into each target, `cfg` without LoRA):
  a plain model for exports, `hf.export_hf` and later stages. The sum is taken in float32 and
  stored in W's dtype. A config without LoRA returns its params unchanged."""
  if not cfg.lora_rank:
    return params, cfg
  scale = cfg.lora_alpha / cfg.lora_rank

  def merge(d: dict) -> dict:
    out = {}
    for k, v in d.items():
      if k.endswith((A_SUFFIX, B_SUFFIX)):
        continue
      if k + A_SUFFIX in d:
        a, b = d[k + A_SUFFIX], d[k + B_SUFFIX]  # [L, *in, r], [L, r, *out]; W [L, *in, *out]
        layers, rank = a.shape[0], a.shape[-1]
        delta = jnp.matmul(
            a.reshape(layers, -1, rank).astype(jnp.float32),
            b.reshape(layers, rank, -1).astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        v = (v.astype(jnp.float32) + scale * delta.reshape(v.shape)).astype(v.dtype)
      out[k] = v
    return out

  return _map_dicts(merge, params), base_config(cfg)


def same_lora(a: ModelConfig, b: ModelConfig) -> bool:
  return all(getattr(a, f) == getattr(b, f) for f in LORA_FIELDS)


def with_adapters(base: Params, cfg: ModelConfig, seed: int, shardings: Params) -> Params:
  """`base` (base-shaped params, e.g. from an export) with fresh adapters of `cfg` added, as
  `create_model(cfg, seed)` initialises them (B = 0), placed in `shardings` (the LoRA model's)."""
  adapter_shardings = jax.tree_util.tree_map_with_path(
      lambda path, s: s if is_adapter(path) else None, shardings
  )
  adapter_shardings = _prune(adapter_shardings)
  # jit drops the init of every param not returned: only the adapters are made.
  adapters = jax.jit(
      lambda: _prune(
          jax.tree_util.tree_map_with_path(
              lambda path, p: p if is_adapter(path) else None,
              split_model(create_model(cfg, seed))[1],
          )
      ),
      out_shardings=adapter_shardings,
  )()
  return _deep_merge(base, adapters)


def _prune(tree):
  """Drops None leaves and then-empty dicts."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
  return tree


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(a[k], v) if isinstance(v, dict) and k in a else v
  return out
