"""ReST: the Improve steps' thresholds and filters against hand-worked and NumPy references, config
errors before anything loads, and the driver end to end on tiny models (files, shrinking kept sets,
each Improve step from the previous one, resume of an interrupted SFT, skipping finished steps)."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.algorithms import pipeline, rest
from rlhf_jax.configs.base import base_config
from rlhf_jax.train import checkpoint, metrics
from tests.test_ppo import (
    MAX_PROMPT_LEN,
    TINY,
    base_driver_config,  # noqa: F401
    exports,
    tasks,
    tokenizer_dir,
)

# ---------------------------------------------------------------- thresholds and filters

REWARDS = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], np.float32)  # sorted: 1 1 2 3 3 4 5 5 5 6 9


def test_quantile_thresholds_and_masks_by_hand():
  taus = rest.reward_thresholds(
      jnp.asarray(REWARDS), jnp.asarray([0.5, 0.75, 0.9]), kind="quantile"
  )
  np.testing.assert_array_equal(taus, [4.0, 5.0, 6.0])  # sorted positions 5, 7.5, 9
  masks = np.asarray(rest.keep_masks(jnp.asarray(REWARDS), taus))
  np.testing.assert_array_equal(masks, [REWARDS >= 4, REWARDS >= 5, REWARDS >= 6])
  assert masks.sum(axis=1).tolist() == [6, 5, 2]
  # Between two samples the threshold interpolates linearly.
  assert (
      float(
          rest.reward_thresholds(jnp.asarray([0.0, 10.0]), jnp.asarray([0.25]), kind="quantile")[0]
      )
      == 2.5
  )


def test_absolute_thresholds_are_the_configured_values():
  taus = rest.reward_thresholds(jnp.asarray(REWARDS), jnp.asarray([2.0, 5.5]), kind="absolute")
  np.testing.assert_array_equal(taus, [2.0, 5.5])
  assert np.asarray(rest.keep_masks(jnp.asarray(REWARDS), taus)).sum(axis=1).tolist() == [9, 2]


def test_quantile_thresholds_match_numpy():
  rs = np.random.RandomState(0)
  rewards = rs.randn(257).astype(np.float32)
  quantiles = np.sort(rs.uniform(0.05, 0.95, 4))
  taus = np.asarray(
      rest.reward_thresholds(
          jnp.asarray(rewards), jnp.asarray(quantiles, jnp.float32), kind="quantile"
      )
  )
  np.testing.assert_allclose(taus, np.quantile(rewards.astype(np.float64), quantiles), atol=1e-6)
  masks = np.asarray(rest.keep_masks(jnp.asarray(rewards), jnp.asarray(taus)))
  for tau, mask, q in zip(taus, masks, quantiles):
    np.testing.assert_array_equal(mask, rewards >= tau)
    assert abs(mask.mean() - (1 - q)) <= 1 / 257 + 1e-9  # the top (1 - q) of the set


def test_improve_sets_keep_samples_above_each_tau_with_a_completion():
  texts = ["a", "b", "", "c", "d", "e", "f", "g", "h", "", "i"]  # two empty completions
  samples = [{"completion": t, "reward": float(r)} for t, r in zip(texts, REWARDS)]
  sets = rest.improve_sets(samples, (0.5, 0.75, 0.9), kind="quantile")
  assert [tau for tau, _ in sets] == [4.0, 5.0, 6.0]
  # The empty completion with reward 4 counts for the quantiles but is not kept.
  assert [[s["completion"] for s in kept] for _, kept in sets] == [
      ["d", "e", "g", "h", "i"],
      ["d", "e", "g", "h", "i"],
      ["e", "g"],
  ]


@pytest.mark.parametrize(
    "update, match",
    [
        (dict(thresholds=(0.5, 0.5)), r"thresholds=\(0.5, 0.5\) must rise strictly"),
        (dict(thresholds=(0.9, 0.5)), r"thresholds=\(0.9, 0.5\) must rise strictly"),
        (dict(thresholds=()), "thresholds is empty"),
        (dict(thresholds=(0.0, 0.5)), r"thresholds=\(0.0, 0.5\): quantiles must lie in \(0, 1\)"),
        (dict(thresholds=(0.5, 1.0)), r"thresholds=\(0.5, 1.0\): quantiles must lie in \(0, 1\)"),
        (dict(threshold_kind="percentile"), "threshold_kind='percentile'"),
        (dict(grow_steps=0), "grow_steps=0"),
        (dict(samples_per_prompt=0), "samples_per_prompt=0"),
        (dict(temperature=0.0), "temperature=0.0"),
    ],
)
def test_config_errors_name_the_field(update, match):
  r = base_config().rest
  r.update(**update)
  with pytest.raises(ValueError, match="config.rest." + match):
    rest.check_config(r)


def test_absolute_thresholds_may_be_any_rising_values():
  r = base_config().rest
  r.update(threshold_kind="absolute", thresholds=(-1.0, 0.0, 2.5))
  rest.check_config(r)


def test_driver_rejects_a_bad_config_before_loading_anything(tmp_path):
  c = base_config()
  c.algorithm, c.init_from = "rest", str(tmp_path / "no_such_export")
  c.rest.thresholds = (0.9, 0.5)
  with pytest.raises(ValueError, match="must rise strictly"):
    rest.train(c, str(tmp_path / "rest"))


def test_toy_experiment_resolves_reward_models_by_stage():
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy_rest.py")
  spec = importlib.util.spec_from_file_location("toy_rest", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert pipeline.training_stages(config)[-1] == "rest" and pipeline.is_policy(config, "rest")
  rest.check_config(config.rest.rest)
  c = pipeline.stage_config(
      config, "rest", {"rl_prompts": "p.jsonl", "tokenizer": "tok"}, "w/sft/export", exports_dir="w"
  )
  assert (c.rest.reward.helpful, c.rest.reward.safety) == (
      "w/rm_helpful/export",
      "w/rm_safety/export",
  )
  assert (c.data.source, c.init_from) == ("p.jsonl", "w/sft/export")


# ---------------------------------------------------------------- driver


def rest_config(exports, tokenizer_dir, **rest_overrides):
  c = base_driver_config("rest", exports, tokenizer_dir)
  c.data.packing = True
  c.train.update(
      steps=2,
      batch_size=8,
      seq_len=TINY["max_seq_len"],
      checkpoint_every=1,
      eval_every=2,
      eval_batches=1,
      log_every=1,
      async_checkpoint=False,
  )
  c.sample.num_examples = 0
  c.rest.update(
      **{
          **dict(
              grow_steps=2,
              prompts_per_grow=8,
              samples_per_prompt=3,
              max_new_tokens=8,
              max_prompt_len=MAX_PROMPT_LEN,
              batch_prompts=8,
              thresholds=(0.25, 0.5, 0.75),
          ),
          **rest_overrides,
      }
  )
  c.rest.reward.helpful = exports["helpful"]
  return c


def steps_logged(workdir):
  return {
      path: [r["step"] for r in metrics.read_jsonl(path) if "train/loss" in r]
      for path in sorted(str(p) for p in workdir.glob("grow_*/improve_*/metrics.jsonl"))
  }


@pytest.mark.slow
def test_driver_grows_improves_resumes_and_skips(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  workdir = tmp_path / "rest"
  interrupted = rest_config(exports, tokenizer_dir)
  interrupted.train.stop_after_steps = 1
  assert rest.train(interrupted, str(workdir)) == {"stopped_in": "grow_1/improve_1"}
  assert not (workdir / "grow_1" / "improve_1" / "export").exists()

  result = rest.train(rest_config(exports, tokenizer_dir), str(workdir))  # resumes that SFT
  assert result["grow_steps"] == 2
  logged = steps_logged(workdir)
  assert len(logged) == 6 and all(steps == [1, 2] for steps in logged.values()), logged
  rows = json.loads((workdir / "steps.json").read_text())
  assert [(r["grow"], r["improve"]) for r in rows] == [(g, k) for g in (1, 2) for k in range(4)]
  previous = str(exports["lm"])
  for g in (1, 2):
    samples = metrics.read_jsonl(workdir / f"grow_{g}" / "samples.jsonl")
    assert len(samples) == 8 * 3 and rows[4 * (g - 1)]["samples"] == 24
    rewards = np.array([s["reward"] for s in samples])
    assert all(np.isfinite(s["gold_combined"]) and "helpful" in s["scores"] for s in samples)
    improve = rows[4 * (g - 1) + 1 : 4 * g]
    # The taus are the Grow set's quantiles; each kept set is exactly its samples above tau.
    np.testing.assert_allclose(
        [r["tau"] for r in improve], np.quantile(rewards, [0.25, 0.5, 0.75]), atol=1e-5
    )
    for row in improve:
      kept = metrics.read_jsonl(workdir / f"grow_{g}" / f"improve_{row['improve']}" / "kept.jsonl")
      expected = [s for s in samples if s["reward"] >= row["tau"] - 1e-6 and s["completion"]]
      assert kept == expected and row["kept"] == len(kept)
      assert row["reward"] == pytest.approx(np.mean([s["reward"] for s in kept]))
      # Each Improve step fine-tunes the previous one's policy (across Grow steps too).
      config = json.loads(
          (workdir / f"grow_{g}" / f"improve_{row['improve']}" / "config.json").read_text()
      )
      assert config["init_from"] == previous and config["algorithm"] == "sft"
      previous = str(workdir / f"grow_{g}" / f"improve_{row['improve']}" / "export")
    counts = [r["kept"] for r in improve]
    assert counts[0] > counts[1] > counts[2] > 0, counts  # rising thresholds keep fewer
    assert improve[0]["reward"] < improve[1]["reward"] < improve[2]["reward"]
  final, _ = checkpoint.load_params(workdir / "export")
  last, _ = checkpoint.load_params(previous)
  jax.tree.map(np.testing.assert_array_equal, final, last)

  # A rerun skips every finished step: no sampling, no training.
  mtimes = {p: os.path.getmtime(p) for p in workdir.glob("grow_*/samples.jsonl")}
  assert rest.train(rest_config(exports, tokenizer_dir), str(workdir)) == result
  assert steps_logged(workdir) == logged
  assert {p: os.path.getmtime(p) for p in mtimes} == mtimes

  # A threshold above every reward: the error names it and the Grow step (no sampling: the
  # finished Grow set is reused).
  other = tmp_path / "too_high"
  shutil.copytree(workdir / "grow_1", other / "grow_1", ignore=shutil.ignore_patterns("improve_*"))
  too_high = rest_config(exports, tokenizer_dir, threshold_kind="absolute", thresholds=(1e6,))
  with pytest.raises(
      ValueError,
      match=r"config.rest.thresholds\[0\]=1000000.0 .* keeps no sample "
      r"of Grow step 1 \(24 samples",
  ):
    rest.train(too_high, str(other))
