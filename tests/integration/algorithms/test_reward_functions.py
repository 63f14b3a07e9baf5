"""Reward functions in the drivers: GRPO on functions alone, a function added to a reward model's
reward, a function failing mid-run (the run stops before that iteration's update; the rerun resumes
and ends where an uninterrupted run does), and rejection sampling keeping the functions' best."""

import json

import jax
import numpy as np
import pytest

from rlhf_jax.algorithms import ppo, rejection_sampling
from rlhf_jax.algorithms.reward_functions import RewardFunctionError
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.ppo import group_config, rejection_sampling_config

SOURCE = """
calls = 0

def shorter(prompts, completions, **_):
  global calls
  calls += 1
  if FAIL_AT and calls == FAIL_AT:
    raise ValueError("the grader is down")
  return [-len(c.split()) / 10 for c in completions]

def one(prompts, completions, **_):
  return [1.0] * len(completions)
"""


def write_functions(path, fail_at=0):
  path.write_text(f"FAIL_AT = {fail_at}\n" + SOURCE)
  return str(path)


def export_of(workdir):
  params, _ = checkpoint.load_params(workdir / "export")
  return params


@pytest.mark.slow
def test_grpo_on_functions_alone_survives_a_failing_function(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  fns = tmp_path / "grader.py"

  def config(iterations=3):
    c = group_config(exports, tokenizer_dir, "grpo", iterations=iterations)
    c.ppo.reward.update(helpful="", functions=(f"{fns}:shorter",))
    return c

  write_functions(fns)
  straight = tmp_path / "straight"
  ppo.train(config(), str(straight))
  rows = metrics.read_jsonl(straight / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3] and all(r["ppo/reward"] <= 0 for r in rows)

  write_functions(fns, fail_at=2)  # iteration 2's reward call raises
  workdir = tmp_path / "interrupted"
  with pytest.raises(RewardFunctionError, match=r"grader.py:shorter raised ValueError: the grader"):
    ppo.train(config(), str(workdir))
  assert [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")] == [1]
  assert not (workdir / "export").exists()
  write_functions(fns)  # fixed
  ppo.train(config(), str(workdir))
  assert [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")] == [1, 2, 3]
  jax.tree.map(np.testing.assert_array_equal, export_of(workdir), export_of(straight))


@pytest.mark.slow
def test_a_function_adds_to_the_reward_models_reward(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  fns = write_functions(tmp_path / "grader.py")
  rewards = []
  for functions in ((), (f"{fns}:one",)):
    c = group_config(exports, tokenizer_dir, "grpo", iterations=1)
    c.ppo.reward.update(functions=functions, function_weights=(2.5,) if functions else ())
    workdir = tmp_path / f"run{len(functions)}"
    ppo.train(c, str(workdir))
    rewards.append(metrics.read_jsonl(workdir / "metrics.jsonl")[0]["ppo/reward"])
  assert rewards[1] == pytest.approx(rewards[0] + 2.5, abs=1e-5)  # the same rollout, + 2.5 each


@pytest.mark.slow
def test_rejection_sampling_keeps_the_functions_best(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  c = rejection_sampling_config(exports, tokenizer_dir, rounds=1)
  c.rejection_sampling.reward.update(helpful="", functions=("rlhf_jax.toyworld.verifiers:gold",))
  rejection_sampling.train(c, str(tmp_path / "rs"))
  kept = [json.loads(line) for line in (tmp_path / "rs" / "round_1" / "kept.jsonl").open()]
  assert kept and all(np.isfinite(k["reward"]) for k in kept)
  assert all(k["reward"] == pytest.approx(k["gold_combined"]) for k in kept if "gold_combined" in k)
