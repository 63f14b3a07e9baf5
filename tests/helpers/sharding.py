"""The mesh-equivalence tests' tiny model, batch and one train step
(tests/{unit,integration}/test_sharding.py, and the two-process worker
tests/workers/multiprocess_worker.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import sharding
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.models import ModelConfig, abstract_model, create_model, split_model
from rlhf_jax.train import (
    create_train_state,
    make_train_step,
    state_shardings,
)

CFG = ModelConfig(
    vocab_size=128,
    num_layers=2,
    embed_dim=64,
    num_heads=8,
    num_kv_heads=4,
    mlp_dim=128,
    max_seq_len=32,
)


def _batch(seed=0, b=8, t=16):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, CFG.vocab_size, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[::2, t - 3 :] = 0  # some right padding
  tokens = tokens * (seg > 0)
  loss_mask = (np.arange(t)[None] >= 4) & (seg > 0)
  positions = np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32)
  return dict(tokens=tokens, loss_mask=loss_mask, segment_ids=seg, positions=positions)


def _setup(mesh_shape):
  n = int(np.prod(mesh_shape))
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:n])
  graphdef, abstract, axes = abstract_model(CFG)
  psh = sharding.param_shardings(abstract, axes, mesh)
  _, params = split_model(create_model(CFG, 0))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5, momentum=0.9))
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  state = create_train_state(params, optimizer, shardings, seed=0)
  return mesh, graphdef, psh, optimizer, shardings, state


def one_train_step(mesh_shape):
  """(loss, sum of updated params) after one step; shared with the multi-process worker."""
  mesh, graphdef, psh, optimizer, shardings, state = _setup(mesh_shape)
  step = make_train_step(
      make_sft_loss_fn(graphdef), optimizer, mesh=mesh, state_shardings=shardings
  )
  state, metrics = step(state, sharding.put_batch(_batch(), mesh))
  total = jax.jit(
      lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)), out_shardings=sharding.replicated(mesh)
  )(state.params)
  return float(metrics["loss"]), float(total)
