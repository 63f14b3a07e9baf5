"""One train step gives the same loss, gradients and update on every mesh layout."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sharding
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.models import ModelConfig, abstract_model, create_model, split_model
from rlhf_jax.train import (
    accumulate_gradients,
    create_train_state,
    make_train_step,
    state_shardings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _run(mesh_shape, accum_steps=1):
  mesh, graphdef, psh, optimizer, shardings, state = _setup(mesh_shape)
  loss_fn = make_sft_loss_fn(graphdef)
  batch = sharding.put_batch(_batch(), mesh)

  @jax.jit
  def grads_fn(params, batch):
    with sharding.activation_sharding(mesh):
      return accumulate_gradients(loss_fn, params, batch, jax.random.key(0), accum_steps)

  grads, metrics = grads_fn(state.params, batch)
  step = make_train_step(
      loss_fn, optimizer, mesh=mesh, state_shardings=shardings, accum_steps=accum_steps
  )
  new_state, step_metrics = step(state, batch)
  return jax.device_get((grads, metrics, new_state.params, step_metrics))


@pytest.fixture(scope="module")
def reference():
  return _run((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_meshes_agree(reference, mesh_shape):
  grads, metrics, params, step_metrics = _run(mesh_shape)
  ref_grads, ref_metrics, ref_params, ref_step = reference
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(step_metrics["loss"], ref_step["loss"], rtol=1e-5, atol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, ref_grads
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), params, ref_params
  )


def test_params_are_sharded_as_the_rules_say():
  mesh, _, psh, _, shardings, state = _setup((1, 2, 4))
  q = state.params["blocks"]["attn"]["q"]  # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 8)
  mu = state.opt_state[1][0].trace["blocks"]["attn"]["q"]
  assert mu.sharding.spec == q.sharding.spec  # optimiser moments follow their parameter


@pytest.mark.slow  # compiles several train steps: keeps the fast set under 5 minutes
@pytest.mark.parametrize("accum_steps", [2, 4])
def test_gradient_accumulation_equals_full_batch(reference, accum_steps):
  """Per-token normalisation over the global batch: any micro-batch split gives the same loss."""
  grads, metrics, _, _ = _run((2, 1, 1), accum_steps=accum_steps)
  ref_grads, ref_metrics, _, _ = reference
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, ref_grads
  )


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


@pytest.mark.slow
def test_two_processes_match_one(reference):
  """2 processes x 4 CPU devices (gloo), as on a 2-host slice: same step as one process."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(pid),
        PYTHONPATH=ROOT,
    )
    env.pop("XLA_FLAGS", None)
    procs.append(
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"), "2,2,2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  result = json.loads(outs[0][0].strip().splitlines()[-1])
  assert result["devices"] == 8 and result["processes"] == 2
  loss, checksum = one_train_step((2, 2, 2))
  np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(result["checksum"], checksum, rtol=1e-5)
  np.testing.assert_allclose(loss, reference[3]["loss"], rtol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_bad_mesh_messages():
  with pytest.raises(sharding.ShardingConfigError, match="data \\* fsdp \\* tensor = 8"):
    sharding.make_mesh((3, 1, 1))
  with pytest.raises(sharding.ShardingConfigError, match="does not divide the 8 devices"):
    sharding.make_mesh((-1, 3, 1))
  mesh = sharding.make_mesh((1, 1, 8))
  with pytest.raises(sharding.ShardingConfigError, match="num_kv_heads = 4"):
    sharding.validate_model_mesh(CFG, mesh)
  with pytest.raises(sharding.ShardingConfigError, match="multiple of 8"):
    sharding.check_batch_size(12, sharding.make_mesh((8, 1, 1)))


def test_logical_rules_never_repeat_a_mesh_axis():
  spec = sharding.logical_to_spec(("batch", "embed"))  # embed -> fsdp, already used by batch
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
