"""Reliability: a run killed anywhere resumes to the same params bit for bit, SIGTERM saves a final
checkpoint, and non-finite steps are skipped (a run of them stops the run with its checkpoints
intact).

Kill anywhere (SFT, reward model, DPO, PPO): the same command runs three times in a fresh process
(tests/workers/kill_worker.py): the first is SIGKILLed at a random step (seeded), the second kills
itself while its first asynchronous checkpoint save is being written, the third runs to the end. Its
export must equal, bit for bit, that of one uninterrupted run: data order, rng, optimiser state and
PPO's KL coefficient all come back from the checkpoint. Then (SFT, DPO, PPO) the newest checkpoint
is truncated, deleted or overwritten in place and the export removed: the rerun resumes from the
step before and ends identical again.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/train/test_reliability.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import run
from rlhf_jax.algorithms import sft
from rlhf_jax.data import train_tokenizer
from rlhf_jax.models import ModelConfig, create_model, split_model
from rlhf_jax.toyworld import corpus_texts, generate_sft_records
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import (
    NonFiniteError,
    checkpoint,
    metrics,
    preemption,
)
from tests.helpers import ROOT, faults, xla_flags
from tests.helpers.compile_cache import persistent_compilation_cache
from tests.helpers.preference import WORDS, learnable_pairs, write_jsonl
from tests.workers import reliability_configs as configs

WORKER = os.path.join(ROOT, "tests", "workers", "kill_worker.py")


@pytest.mark.slow
def test_a_diverging_run_stops_with_its_checkpoints_intact(tmp_path):
  """lr 1e30: the first update blows the params up, every later gradient is NaN; after
  max_nonfinite_steps of them the run stops, naming where the streak started, and every checkpoint
  it left holds finite params."""
  config = configs.sft_config()
  config.optim.update(lr=1e30, warmup_steps=0, schedule="constant")
  config.train.update(steps=12, max_nonfinite_steps=4, checkpoint_every=2)
  with pytest.raises(NonFiniteError, match=r"the last 4 steps \(steps 2-5\) all had a NaN") as e:
    sft.train(config, str(tmp_path))
  assert "the last checkpoint is step 4" in str(e.value)
  assert isinstance(e.value, run.USER_ERRORS)  # the CLI prints it as one message
  assert not (tmp_path / "export").exists()
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r] == [0, 1, 2, 3, 4]
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.all_steps() == [2, 4]
  # Every checkpoint it left holds finite params (step 2: after the one finite update).
  for step in (2, 4):
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------- kill anywhere


def _tiny_export(path, tokenizer_dir, *, head="lm", seed=0):
  cfg = ModelConfig(
      **{**configs.TINY, "vocab_size": 384, "max_seq_len": 128},
      head=head,
      scalar_head_init_std=1.0 if head == "scalar" else 0.001,
  )
  _, params = split_model(create_model(cfg, seed))
  metadata = {"model": cfg.to_dict(), "tokenizer": str(tokenizer_dir)}
  if head == "scalar":
    metadata["reward"] = {"stats": {"mean": 0.0, "std": 1.0, "n": 1}}
  checkpoint.export_params(path, jax.device_get(params), metadata=metadata)
  return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Tokenizer, random LM and reward-model exports, preference pairs and toy prompts, named in a
  JSON file for the worker processes (RELIABILITY_INPUTS)."""
  root = tmp_path_factory.mktemp("reliability")
  tasks = world_lib.World(0).tasks(16, seed=1)
  texts = (
      corpus_texts(generate_sft_records(200, seed=0))
      + [t["prompt"] for t in tasks]
      + [" ".join(WORDS + ["great", "awful"])] * 5
  )
  train_tokenizer(texts, 384, root / "tok")
  paths = {
      "tokenizer": str(root / "tok"),
      "lm": _tiny_export(root / "lm", root / "tok", seed=3),
      "rm": _tiny_export(root / "rm", root / "tok", head="scalar", seed=4),
      "pairs": write_jsonl(root / "pairs.jsonl", learnable_pairs(48)),
      "prompts": write_jsonl(root / "prompts.jsonl", tasks),
  }
  assert set(paths) == set(configs.INPUT_KEYS)
  (root / "inputs.json").write_text(json.dumps(paths))
  return {"file": str(root / "inputs.json"), "cache": str(root / "jax_cache"), **paths}


def _env(inputs):
  # A compilation cache shared by the worker processes: each compiles a program once.
  return {
      **os.environ,
      "RELIABILITY_INPUTS": inputs["file"],
      "PYTHONPATH": ROOT,
      "JAX_COMPILATION_CACHE_DIR": inputs["cache"],
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.endswith("\n"))


def _kill_after_rows(algorithm, workdir, inputs, rows, delay):
  """Starts the worker and SIGKILLs it `delay` seconds after metrics.jsonl has `rows` more rows."""
  start = _rows(workdir)
  proc = subprocess.Popen(
      [sys.executable, WORKER, algorithm, str(workdir)],
      env=_env(inputs),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 300
  while _rows(workdir) < start + rows and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{out}\n{err[-3000:]}"


def _worker(algorithm, workdir, inputs, *args):
  return subprocess.run(
      [sys.executable, WORKER, algorithm, str(workdir), *map(str, args)],
      env=_env(inputs),
      capture_output=True,
      text=True,
      timeout=600,
  )


def _config(algorithm, inputs):
  if algorithm == "sft":
    return configs.sft_config()
  paths = {k: inputs[k] for k in configs.INPUT_KEYS}
  return {
      "reward": configs.reward_config,
      "dpo": configs.dpo_config,
      "ppo": configs.ppo_config,
      "ppo_stale": configs.ppo_stale_config,  # rollout devices of its own, one step off-policy
  }[algorithm](paths)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, inputs):
  """straight(algorithm) -> (export params, metrics rows) of one uninterrupted run (in this
  process; computed once per module)."""
  done = {}

  def get(algorithm):
    if algorithm not in done:
      config = _config(algorithm, inputs)
      workdir = tmp_path_factory.mktemp(f"straight_{algorithm}")
      # In the workers' compilation cache: the first worker loads what this run compiled.
      with persistent_compilation_cache(inputs["cache"]):
        run.resolve_driver(config.algorithm)(config, str(workdir))
      done[algorithm] = checkpoint.load_params(workdir / "export")[0], _rows(workdir)
    return done[algorithm]

  return get


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sft", "reward", "dpo", "ppo", "ppo_stale"])
def test_killed_anywhere_the_rerun_ends_with_identical_params(
    tmp_path, inputs, straight, algorithm
):
  expected, total = straight(algorithm)  # rows: one per step / iteration (+ eval rows)
  every = _config(algorithm, inputs).train.checkpoint_every

  killed = tmp_path / "killed"
  rng = np.random.default_rng(["sft", "reward", "dpo", "ppo", "ppo_stale"].index(algorithm))
  # 1. SIGKILL at a random point after the first save was issued: a few rows in, plus up to 0.3 s
  #    (mid-step, mid-save or between them).
  _kill_after_rows(
      algorithm,
      killed,
      inputs,
      rows=int(rng.integers(every + 1, total - 3)),
      delay=float(rng.uniform(0, 0.3)),
  )
  assert not (killed / "export").exists()
  runs = []
  if algorithm in ("sft", "ppo"):  # the two checkpointing loops (common.train_loop and PPO's)
    # 2. Resumed, then killed while its first asynchronous save is in flight.
    runs.append(_worker(algorithm, killed, inputs, 1))
    assert runs[-1].returncode == -signal.SIGKILL, runs[-1].stderr[-3000:]
    in_save = json.loads(runs[-1].stdout.strip().splitlines()[-1])["killed_in_save"]
    assert not (killed / "checkpoints" / str(in_save)).exists()  # only its tmp directory
  # 3. The same command again, to the end.
  runs.append(_worker(algorithm, killed, inputs))
  assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
  for resumed in runs:  # each started from a checkpoint the previous one left
    assert "resumed" in resumed.stderr, resumed.stderr[-3000:]
  got, _ = checkpoint.load_params(killed / "export")
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  if algorithm in ("reward", "ppo_stale"):
    return
  # 4. The newest checkpoint damaged after the run (a disk or copy error; truncated, deleted or
  #    overwritten in place: the last leaves every file readable), the export removed: the rerun
  #    sets the step aside, resumes from the one before, and ends identical again.
  how = {"sft": "truncate", "dpo": "delete", "ppo": "overwrite"}[algorithm]
  steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) >= 2, steps
  faults.damage(faults.largest_file(killed / "checkpoints" / str(steps[-1]) / "state"), how)
  shutil.rmtree(killed / "export")
  rerun = _worker(algorithm, killed, inputs)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert (
      "trying the one before it" in rerun.stderr
      and f"resumed from step {steps[-2]}" in rerun.stderr
  )
  assert list((killed / "checkpoints").glob(f"{steps[-1]}.corrupt-*"))
  got, _ = checkpoint.load_params(killed / "export")
  jax.tree.map(np.testing.assert_array_equal, got, expected)


# ---------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_the_rerun_finishes_identically(tmp_path, inputs, straight):
  """The CLI on SIGTERM: finishes the step in flight, saves it (between the periodic saves), exits
  with 143 and one line saying how to resume; the rerun's export equals an uninterrupted run's."""
  expected, _ = straight("sft")
  workdir = tmp_path / "run"
  command = [
      sys.executable,
      "-m",
      "rlhf_jax.run",
      f"--config={ROOT}/tests/workers/reliability_configs.py:sft",
      f"--workdir={workdir}",
      "--config.train.checkpoint_every=100",
  ]  # no periodic save before the end
  env = {
      **_env(inputs),
      "XLA_FLAGS": xla_flags(8),
      "JAX_PLATFORMS": "cpu",
      "JAX_DEFAULT_MATMUL_PRECISION": "highest",
  }
  proc = subprocess.Popen(
      command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  while _rows(workdir) < 3 and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == preemption.EXIT_STATUS, err[-3000:]
  assert "stopped by SIGTERM (preemption) after step" in err and "Traceback" not in err, err[-3000:]
  with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    saved = ckpt.latest_step()
  assert saved is not None and 3 <= saved < configs.STEPS
  assert f"after step {saved}:" in err
  assert not (workdir / "export").exists()
  again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  got, _ = checkpoint.load_params(workdir / "export")
  jax.tree.map(np.testing.assert_array_equal, got, expected)
