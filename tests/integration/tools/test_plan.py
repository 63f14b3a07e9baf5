"""The memory planner: per-device bytes of params and optimizer state are exact (checked against a
real train state on the same mesh), frozen models and algorithms count what they hold, activations
respond to batch and remat, and the CLI plans on fake devices and says when a plan does not fit.
How close the compiled activations are to a GPU's measured peak is recorded in docs/real_models.md ("Memory
planner"), not tested: no GPU here.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/tools/test_plan.py.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.configs.base import base_config
from rlhf_jax.models import abstract_model, create_model, split_model
from rlhf_jax.tools import plan as plan_lib
from rlhf_jax.train import create_train_state, make_optimizer, state_shardings
from tests.helpers import ROOT
from tests.helpers.plan import build_tiny


@pytest.fixture(scope="module")
def tiny():
  return build_tiny()


@pytest.mark.slow
def test_params_and_optimizer_bytes_equal_a_real_train_state(tiny):
  mesh = sharding.make_mesh((1, 4, 2))
  record = plan_lib.plan(tiny, mesh, algorithm="sft", batch=8, seq_len=32)
  graphdef, abstract, axes = abstract_model(tiny)
  psh = sharding.param_shardings(abstract, axes, mesh)
  optimizer, _ = make_optimizer(base_config().optim, 1000)
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  params = jax.jit(lambda: split_model(create_model(tiny, 0))[1], out_shardings=psh)()
  state = create_train_state(params, optimizer, shardings, seed=0)
  device = mesh.devices.flat[0]
  on_device = lambda tree: sum(
      s.data.nbytes
      for leaf in jax.tree.leaves(tree)
      for s in leaf.addressable_shards
      if s.device == device
  )
  assert record["params_per_device"] == on_device(state.params)
  assert record["optimizer_per_device"] == on_device(state.opt_state)
  # FSDP x tensor sharding: each device holds well under the whole model.
  assert record["params_per_device"] < tiny.num_params() * 4 / 4  # < a quarter of the fp32 model


@pytest.mark.slow  # six compiles (~60 s): keeps the fast set under 5 minutes
def test_algorithms_count_the_models_they_hold(tiny):
  mesh = sharding.make_mesh((1, 8, 1))
  kw = dict(batch=8, seq_len=32)
  sft = plan_lib.plan(tiny, mesh, algorithm="sft", **kw)
  dpo = plan_lib.plan(tiny, mesh, algorithm="dpo", **kw)
  dpo_pre = plan_lib.plan(tiny, mesh, algorithm="dpo", reference=False, **kw)
  dpo_f32 = plan_lib.plan(tiny, mesh, algorithm="dpo", frozen_dtype="float32", **kw)
  ppo = plan_lib.plan(tiny, mesh, algorithm="ppo", **kw)
  grpo = plan_lib.plan(tiny, mesh, algorithm="grpo", **kw)
  assert sft["frozen_per_device"] == dpo_pre["frozen_per_device"] == 0
  # The reference in bf16 is half the fp32 policy; in fp32 the same size.
  assert dpo["frozen_per_device"] * 2 == dpo_f32["frozen_per_device"] == sft["params_per_device"]
  # PPO: policy + value model trained, reference + reward model frozen; the value and reward
  # models are the policy's trunk with a scalar head (no LM head's vocab x embed weights).
  _, scalar, axes = abstract_model(tiny.replace(head="scalar"))
  value = plan_lib.shard_bytes(scalar, sharding.param_shardings(scalar, axes, mesh))
  assert value < sft["params_per_device"]
  assert ppo["params_per_device"] == sft["params_per_device"] + value
  assert ppo["frozen_models"] == 2
  assert ppo["frozen_per_device"] == dpo["frozen_per_device"] + value // 2  # bf16
  # GRPO: the policy alone is trained; reference and reward model frozen, as PPO.
  assert grpo["params_per_device"] == sft["params_per_device"]
  assert grpo["optimizer_per_device"] == sft["optimizer_per_device"]
  assert grpo["frozen_per_device"] == ppo["frozen_per_device"]
  for r in (sft, dpo, ppo, grpo):
    assert r["total_per_device"] == (
        r["params_per_device"]
        + r["optimizer_per_device"]
        + r["frozen_per_device"]
        + r["activations_per_device"]
    )


@pytest.mark.slow  # ten compiles (~110 s)
def test_activations_grow_with_batch_and_shrink_with_remat(tiny):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  deep = tiny.replace(num_layers=4)
  small = plan_lib.plan(deep, mesh, algorithm="sft", batch=2, seq_len=128)
  large = plan_lib.plan(deep, mesh, algorithm="sft", batch=8, seq_len=128)
  remat = plan_lib.plan(deep.replace(remat="full"), mesh, algorithm="sft", batch=8, seq_len=128)
  accum = plan_lib.plan(deep, mesh, algorithm="sft", batch=8, seq_len=128, accum_steps=4)
  assert 0 < small["activations_per_device"] < large["activations_per_device"]
  assert remat["activations_per_device"] < large["activations_per_device"]
  assert accum["activations_per_device"] < large["activations_per_device"]
  reward = plan_lib.plan(deep, mesh, algorithm="reward", batch=2, seq_len=512)
  assert reward["activations_per_device"] > 0
  # DPO's step computes the LM head on its rows' responses only (half the slots): fewer
  # temporaries than an SFT step on the same rows, where the logits dominate (vocab 4,096).
  wide = deep.replace(vocab_size=4096)
  sft = plan_lib.plan(wide, mesh, algorithm="sft", batch=2, seq_len=512)
  dpo = plan_lib.plan(wide, mesh, algorithm="dpo", batch=2, seq_len=512)
  assert 0 < dpo["activations_per_device"] < 0.9 * sft["activations_per_device"]
  # SFT on instruction data lists its targets (a quarter of the slots here), as the trainer does.
  sft_listed = plan_lib.plan(wide, mesh, algorithm="sft", batch=2, seq_len=512, response_share=0.25)
  assert 0 < sft_listed["activations_per_device"] < 0.9 * sft["activations_per_device"]
  # GRPO's update runs the head on the responses only: fewer temporaries with shorter responses.
  grpo = [
      plan_lib.plan(wide, mesh, algorithm="grpo", batch=2, seq_len=512, response_share=share)
      for share in (0.25, 1.0)
  ]
  assert 0 < grpo[0]["activations_per_device"] < 0.8 * grpo[1]["activations_per_device"]


@pytest.mark.slow  # two subprocesses compiling on 16 fake devices (~30 s)
def test_cli_plans_on_fake_devices_and_exits_3_when_it_does_not_fit():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  base = [
      sys.executable,
      "-m",
      "rlhf_jax.tools.plan",
      "--model=bench",
      "--devices=16",
      "--mesh=2,4,2",
      "--batch=16",
      "--seq_len=64",
      "--algorithm=dpo",
  ]
  ok = subprocess.run(
      base + ["--chip=h100"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  record = json.loads(ok.stdout.strip().splitlines()[-1])
  assert record["devices"] == 16 and record["mesh"] == {"data": 2, "fsdp": 4, "tensor": 2}
  assert record["fits"] and "fits a h100" in ok.stdout
  full = subprocess.run(
      base + ["--chip=tpu-v5e", "--reserve=0.999999"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert full.returncode == 3 and "does NOT fit" in full.stdout
  np.testing.assert_equal(
      json.loads(full.stdout.strip().splitlines()[-1])["total_per_device"],
      record["total_per_device"],
  )
