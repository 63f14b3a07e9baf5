"""ReST: the Improve steps' thresholds and filters against hand-worked and NumPy references, config
errors before anything loads, and the driver end to end on tiny models (files, shrinking kept sets,
each Improve step from the previous one, resume of an interrupted SFT, skipping finished steps).

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_rest.py.
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.algorithms import pipeline, rest
from rlhf_jax.configs.base import base_config, driver_config
from tests.helpers import ROOT

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
  path = os.path.join(ROOT, "experiments", "toy_rest.py")
  spec = importlib.util.spec_from_file_location("toy_rest", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert pipeline.training_stages(config)[-1] == "rest" and pipeline.is_policy(config, "rest")
  rest.check_config(driver_config(config.rest).rest)
  c = pipeline.stage_config(
      config, "rest", {"rl_prompts": "p.jsonl", "tokenizer": "tok"}, "w/sft/export", exports_dir="w"
  )
  assert (c.rest.reward.helpful, c.rest.reward.safety) == (
      "w/rm_helpful/export",
      "w/rm_safety/export",
  )
  assert (c.data.source, c.init_from) == ("p.jsonl", "w/sft/export")
