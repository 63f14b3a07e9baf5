"""The one train-step factory every method uses.

A method supplies `loss_fn(params, batch, rng) -> (loss, metrics)`, pure. The factory adds
gradients, gradient accumulation over micro-batches, the optimiser update, shardings and donation,
and returns a jitted `step(state, batch) -> (state, metrics)`.

Micro-batch weighting: if `metrics` has a scalar "loss_weight" (e.g. the number of target tokens),
micro-batches are combined as sum(w_i * loss_i) / sum(w_i) (and so are their gradients and
metrics), which equals the loss over the whole batch for losses that are means over tokens or
examples. Without it, micro-batches are weighted equally.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.train.optim import nonfinite_counts
from rlhf_jax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
WEIGHT = "loss_weight"


def _split_micro(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [A, B/A, ...] taking rows i, i+A, ... into micro-batch i, so that every
  micro-batch stays spread over all batch shards (a plain reshape would put micro-batch 0 on the
  first devices only)."""

  def split(x):
    b = x.shape[0]
    x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params, batch: dict, rng: jax.Array, accum_steps: int):
  """(grads, metrics) of `loss_fn` over `batch`, in `accum_steps` sequential micro-batches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    metrics = dict(metrics)
    metrics.pop(WEIGHT, None)
    return grads, metrics

  micro = _split_micro(batch, accum_steps)
  rngs = jax.random.split(rng, accum_steps)

  def one(carry, xs):
    grad_sum, metric_sum, weight_sum = carry
    mb, key = xs
    mb = jax.tree.map(lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
    (_, metrics), grads = grad_fn(params, mb, key)
    w = metrics.get(WEIGHT, jnp.float32(1.0)).astype(jnp.float32)
    grad_sum = jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), grad_sum, grads)
    metric_sum = jax.tree.map(
        lambda a, m: a + w * m, metric_sum, {k: v for k, v in metrics.items() if k != WEIGHT}
    )
    return (grad_sum, metric_sum, weight_sum + w), None

  zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  _, abstract_metrics = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros_m = {k: jnp.zeros(v.shape, jnp.float32) for k, v in abstract_metrics.items() if k != WEIGHT}
  (grad_sum, metric_sum, weight_sum), _ = jax.lax.scan(
      one, (zeros_g, zeros_m, jnp.float32(0.0)), (micro, rngs)
  )
  denom = jnp.maximum(weight_sum, 1e-9)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, params)
  return grads, jax.tree.map(lambda m: m / denom, metric_sum)


def make_update(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    schedule: Callable | None = None,
):
  """The un-jitted optimiser step `update(state, batch) -> (state, metrics)`: gradients (accumulated
  over `accum_steps` micro-batches), the optimiser update and the metrics. `make_train_step` jits
  it; a method that takes several optimiser steps inside one jitted call (PPO epochs over
  mini-batches) scans it. Call it inside `sharding.activation_sharding`."""

  def update(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(state.key())
    grads, metrics = accumulate_gradients(loss_fn, state.params, batch, step_rng, accum_steps)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    counts = nonfinite_counts(opt_state)
    if counts is not None:  # steps skipped so far for a NaN / Inf gradient (optax.apply_if_finite)
      metrics["skipped_steps"] = counts[1]
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng)
    )
    return new_state, metrics

  return update


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    accum_steps: int = 1,
    schedule: Callable | None = None,
    rules=sharding.DEFAULT_RULES,
    donate: bool = True,
):
  """Jitted `step(state, batch) -> (state, metrics)` with explicit shardings and donated state.

  batch: dict of [B, ...] arrays sharded over the batch axes; B must be divisible by accum_steps
  and B / accum_steps by the number of batch shards. Metrics are replicated scalars.
  """
  update = make_update(loss_fn, optimizer, accum_steps=accum_steps, schedule=schedule)

  def step(state: TrainState, batch: dict):
    with sharding.activation_sharding(mesh, rules):
      return update(state, batch)

  return jax.jit(
      step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,) if donate else (),
      compiler_options=train_compiler_options(mesh),
  )


# The option replaces XLA's own set (individual dots and reductions), so the reductions are named
# too: without them every reduction of the step (RMSNorm, softmax, loss, the optimiser's norms)
# fell back to XLA's reduce-window loops, ~10x slower than YNNPACK's (a [6, 512, 1344] sum of
# squares: 4.6 -> 0.5 ms).
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def train_compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for a train step on `mesh`: on a one-device CPU mesh, XLA's YNNPACK fusion on
  every dot and every reduction (experimental in jaxlib 0.10; by default XLA sends only some dots
  there, and its reductions).

  Alternating bench runs on the 2-core CPU (docs/benchmarks.md, "Against PyTorch"): sft_step, rm_step and
  dpo_step 10-60% faster over two sessions' measurements. Not for forward-only programs (set
  process-wide it slowed plain matmuls), and not on a mesh of several CPU devices: there
  YNNPACK's threads starve the collectives of XLA's host devices, and the step aborts on a
  rendezvous timeout (seen with 8 fake devices on 2 cores). RLHF_JAX_CPU_YNN=0 leaves XLA's
  default everywhere.
  """
  if (
      jax.default_backend() != "cpu"
      or mesh.devices.size != 1
      or os.environ.get("RLHF_JAX_CPU_YNN", "1") == "0"
  ):
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": YNN_FUSION_TYPES}


def make_eval_step(loss_fn: LossFn, *, mesh: Mesh, param_shardings, rules=sharding.DEFAULT_RULES):
  """Jitted `eval_step(params, batch, rng) -> metrics` (no gradients)."""

  def eval_step(params, batch, rng):
    with sharding.activation_sharding(mesh, rules):
      _, metrics = loss_fn(params, batch, rng)
    return metrics

  return jax.jit(
      eval_step,
      in_shardings=(
          param_shardings,
          sharding.batch_sharding(mesh, rules),
          sharding.replicated(mesh),
      ),
      out_shardings=sharding.replicated(mesh),
  )
