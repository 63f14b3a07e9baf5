"""Optimiser and learning-rate schedule from config (optax)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax.errors import ConfigError

NO_DECAY_NAMES = ("embed", "pos_embed")  # embedding tables; biases and norm scales by suffix


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable[[Any], Any]:
  """Linear warm-up to `lr`, then cosine / linear decay to `lr * min_lr_ratio`, or constant."""
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  end = cfg.lr * cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ConfigError(
        f"config.optim.schedule={cfg.schedule!r}: use 'cosine', 'linear' or 'constant'"
    )
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params, *, decay_norms_biases_embeddings: bool):
  """True where weight decay applies: matrices, not norms/biases (1-D per layer) nor embeddings."""
  if decay_norms_biases_embeddings:
    return jax.tree.map(lambda _: True, params)

  def is_decayed(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    # By name: a per-head bias is 2-D ([heads, head_dim]) but still a bias.
    if name in NO_DECAY_NAMES or name.endswith("bias") or name == "scale":
      return False
    per_layer_ndim = x.ndim - (1 if any(getattr(k, "key", None) == "blocks" for k in path) else 0)
    return per_layer_ndim >= 2

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, trainable: Callable[[Any], Any] | None = None
):
  """(optax transformation, schedule). cfg = config.optim.

  trainable: None (every param trains) or params -> bool tree (e.g. `lora.trainable_mask`): the
  other params get zero updates and no optimiser state at all (no moments)."""
  schedule = make_schedule(cfg, total_steps)
  chain = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.name == "adamw":
    chain.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(
                p, decay_norms_biases_embeddings=cfg.decay_norms_biases_embeddings
            ),
        )
    )
  elif cfg.name == "sgd":
    chain.append(optax.sgd(schedule))
  else:
    raise ConfigError(f"config.optim.name={cfg.name!r}: use 'adamw' or 'sgd'")
  optimizer = optax.chain(*chain)
  if trainable is not None:
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))
    optimizer = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
  if cfg.get("skip_nonfinite", True):
    optimizer = skip_nonfinite(optimizer)
  return optimizer, schedule


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optax.apply_if_finite` without its `lax.cond`, and never giving up: a gradient with a NaN or
  Inf gives zero updates and leaves `inner`'s state as it was; the state is optax's
  `ApplyIfFiniteState` (consecutive and total counts), so the driver stops the run
  (`check_nonfinite`) while the params are still the last finite ones. Both outcomes are computed
  and selected elementwise: a conditional whose branch holds the sharded optimiser update can
  deadlock XLA's CPU collectives on a multi-device mesh."""

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
    )

  def update(updates, state, params=None, **extra):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(updates)]))
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1).astype(jnp.int32),
        last_finite=finite,
        total_notfinite=(state.total_notfinite + jnp.where(finite, 0, 1)).astype(jnp.int32),
        inner_state=jax.tree.map(keep, new_inner, state.inner_state),
    )

  return optax.GradientTransformationExtraArgs(init, update)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite gradient: the run stopped."""


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array] | None:
  """(consecutive, total) steps skipped for a non-finite gradient, as int32 [] arrays, from the
  state of a `make_optimizer` optimiser (None when it does not guard: `skip_nonfinite=False`)."""
  if isinstance(opt_state, optax.ApplyIfFiniteState):
    return opt_state.notfinite_count, opt_state.total_notfinite
  return None


def check_nonfinite(opt_state, step: int, limit: int, last_checkpoint: int | None) -> int:
  """Returns the total of skipped steps; raises NonFiniteError when the current streak of skipped
  steps has reached `limit` (> 0) at train step `step` (the number of steps done), naming the step
  the streak started at and the last checkpoint (whose params predate it or equal the last finite
  ones: skipped steps do not change the params)."""
  counts = nonfinite_counts(opt_state)
  if counts is None:
    return 0
  streak, total = (int(x) for x in jax.device_get(counts))
  if limit > 0 and streak >= limit:
    where = (
        f"the last checkpoint is step {last_checkpoint}"
        if last_checkpoint is not None
        else "no checkpoint was saved"
    )
    raise NonFiniteError(
        f"stopped: the last {streak} steps (steps {step - streak + 1}-{step}) all had a NaN or Inf "
        f"gradient and were skipped ({total} skipped in all); the params are those after step "
        f"{step - streak}, and {where}. Lower config.optim.lr or config.optim.grad_clip_norm, or look "
        "for bad records in the batches of those steps (config.train.max_nonfinite_steps="
        f"{limit} sets the limit; 0 never stops)"
    )
  return total
