"""One train step gives the same loss, gradients and update on every mesh layout.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/test_sharding.py.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.train import (
    accumulate_gradients,
    make_train_step,
)
from tests.helpers import ROOT
from tests.helpers.sharding import _batch, _setup, one_train_step


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
            [
                sys.executable,
                os.path.join(ROOT, "tests", "workers", "multiprocess_worker.py"),
                "2,2,2",
            ],
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
