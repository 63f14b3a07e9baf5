"""Reliability: a run killed anywhere resumes to the same params bit for bit, SIGTERM saves a final
checkpoint, and non-finite steps are skipped (a run of them stops the run with its checkpoints
intact).

Kill anywhere (SFT, reward model, DPO, PPO): the same command runs three times in a fresh process
(tests/workers/kill_worker.py): the first is SIGKILLed at a random step (seeded), the second kills
itself while its first asynchronous checkpoint save is being written, the third runs to the end. Its
export must equal, bit for bit, that of one uninterrupted run: data order, rng, optimiser state and
PPO's KL coefficient all come back from the checkpoint.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/train/test_reliability.py.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sharding
from rlhf_jax.train import (
    create_train_state,
    make_optimizer,
    make_train_step,
    preemption,
    state_shardings,
)
from tests.workers import reliability_configs as configs

# ---------------------------------------------------------------- non-finite steps


def _tiny_step(lr=0.1):
  """A linear least-squares step on 8 devices; `batch["scale"]` = inf poisons the gradient."""
  mesh = sharding.make_mesh((8, 1, 1))
  params = {"w": jnp.ones((4,), jnp.float32)}

  def loss_fn(p, batch, rng):
    del rng
    err = batch["x"] @ p["w"] * batch["scale"][:, 0] - batch["y"]
    loss = jnp.mean(err**2)
    return loss, {"loss": loss}

  cfg = configs.base_config().optim
  cfg.update(lr=lr, warmup_steps=0, schedule="constant", grad_clip_norm=0.0)
  optimizer, schedule = make_optimizer(cfg, 10)
  rep = sharding.replicated(mesh)
  psh = {"w": rep}
  shardings = state_shardings(optimizer, psh, params, mesh)
  state = create_train_state(params, optimizer, shardings, seed=0)
  step = make_train_step(loss_fn, optimizer, mesh=mesh, state_shardings=shardings, donate=False)
  return state, step


def _batch(scale):
  x = np.arange(32, dtype=np.float32).reshape(8, 4) / 10
  return {"x": x, "y": np.ones(8, np.float32), "scale": np.full((8, 1), scale, np.float32)}


def test_a_non_finite_gradient_skips_the_update_and_is_counted():
  state, step = _tiny_step()
  good, m = step(state, _batch(1.0))
  assert int(m["skipped_steps"]) == 0
  bad, m = step(good, _batch(np.inf))
  assert int(m["skipped_steps"]) == 1 and not np.isfinite(float(m["loss"]))
  # Params and moments as they were; the step counter and the rng still advance.
  jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(bad.params), jax.device_get(good.params)
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(bad.opt_state.inner_state),
      jax.device_get(good.opt_state.inner_state),
  )
  assert int(bad.step) == 2 and not np.array_equal(bad.rng, good.rng)
  # The next finite step updates as if the bad one had not happened (Adam's count included).
  after, m = step(bad, _batch(1.0))
  direct, _ = step(good, _batch(1.0))
  jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(after.params), jax.device_get(direct.params)
  )
  assert int(m["skipped_steps"]) == 1 and int(after.opt_state.notfinite_count) == 0


def test_skip_nonfinite_off_applies_the_nan():
  state, _ = _tiny_step()
  cfg = configs.base_config().optim
  cfg.update(skip_nonfinite=False)
  optimizer, _ = make_optimizer(cfg, 10)
  assert not isinstance(optimizer.init(state.params), optax.ApplyIfFiniteState)


class _FakeCheckpoints:

  def __init__(self):
    self.saves = []

  def save(self, step, state, *, force, **kwargs):
    self.saves.append((step, state, force, kwargs))


def test_stop_signal_save_forces_the_step_in_flight_then_raises(tmp_path):
  """`StopSignal.save`, the save both training loops call after each step: forced at the last
  step; after SIGTERM, the step in flight is saved (forced), `on_stop` runs, `Preempted` names it.
  """
  ckpt, closed = _FakeCheckpoints(), []
  with preemption.StopSignal() as stop:
    stop.save(ckpt, 1, 3, "s1", workdir=str(tmp_path), on_stop=lambda: closed.append(1), x=1)
    stop.save(ckpt, 3, 3, "s3", workdir=str(tmp_path))  # the last step: forced, no stop
    os.kill(os.getpid(), signal.SIGTERM)  # handled: only sets the flag
    with pytest.raises(preemption.Preempted, match="after step 2: a checkpoint of that step"):
      stop.save(ckpt, 2, 3, "s2", workdir=str(tmp_path), on_stop=lambda: closed.append(2))
  assert [(s, f, kw) for s, _, f, kw in ckpt.saves] == [
      (1, False, {"x": 1}),
      (3, True, {}),
      (2, True, {}),
  ]
  assert closed == [2]


def test_ctrl_c_saves_like_sigterm_and_a_second_one_stops_at_once(tmp_path):
  """SIGINT (Ctrl-C) in a training loop: the step in flight is saved and `Preempted` carries exit
  status 130 (a shell's for SIGINT; SIGTERM's is 143); a second Ctrl-C raises KeyboardInterrupt
  at once. The handlers that were installed before come back afterwards."""
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  ckpt = _FakeCheckpoints()
  with preemption.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(preemption.Preempted, match="stopped by SIGINT after step 1") as stopped:
      stop.save(ckpt, 1, 3, "s1", workdir=str(tmp_path))
    assert stopped.value.exit_status == 130 and ckpt.saves[-1][2]  # forced
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  with preemption.StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(preemption.Preempted, match=r"SIGTERM \(preemption\)") as stopped:
      stop.save(ckpt, 1, 3, "s1", workdir=str(tmp_path))
  assert stopped.value.exit_status == preemption.EXIT_STATUS == 143
