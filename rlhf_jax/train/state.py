"""TrainState: everything a step changes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding


class TrainState(flax.struct.PyTreeNode):
  """step: int32 []; params: nested dict of arrays; opt_state: optax state;
  rng: raw uint32 key data [2] (raw, not a typed key, so it checkpoints as a plain array)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def state_shardings(
    optimizer: optax.GradientTransformation, param_shardings, abstract_params, mesh: Mesh
) -> TrainState:
  """A TrainState of NamedShardings: optimiser moments follow their parameter's sharding (a
  param without state in a masked optimiser, e.g. a LoRA run's frozen base, stays a MaskedNode)."""
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  rep = sharding.replicated(mesh)
  masked = lambda v: isinstance(v, optax.MaskedNode)
  opt_shardings = optax.tree_map_params(
      optimizer,
      lambda v, s: v if masked(v) else s,
      abstract_opt,
      param_shardings,
      transform_non_params=lambda _: rep,
      is_leaf=masked,
  )
  return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)


def create_train_state(
    params, optimizer: optax.GradientTransformation, shardings: TrainState, seed: int
) -> TrainState:
  """Initial state placed in `shardings` (params are moved/kept there; no host copy of moments)."""
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)
