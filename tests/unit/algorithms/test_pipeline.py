"""The toy-world pipeline end to end (reduced sizes) and the gold-evaluation summaries.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_pipeline.py.
"""

import os

import jax
import numpy as np
import pytest

from rlhf_jax.algorithms import ai_feedback, pipeline
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.evaluation import reward_eval
from tests.helpers import ROOT
from tests.helpers.pipeline import experiment_config


@pytest.mark.parametrize(
    "name",
    sorted(
        name[:-3]
        for name in os.listdir(os.path.join(ROOT, "experiments"))
        if name.startswith("toy_") and name != "toy_sft.py"
    ),
)  # every pipeline experiment (not plain SFT)
def test_toy_experiments_name_known_stages_and_data(name):
  config = experiment_config(name)
  world_data = {
      "pretrain",
      "sft",
      "judge",
      *pipeline.EVAL_FEEDBACK,
      "safety_critical_eval",
      "eval_tasks",
      "valid_tasks",
      "rankings",
      "pairs_helpful",
      "pairs_safety",
      "safety_labels",
      "kto",
      "rl_prompts",
  }
  for stage in pipeline.training_stages(config):
    if config[stage].algorithm == pipeline.FEEDBACK:
      world_data |= set(pipeline.feedback_paths(stage, ""))
      continue
    if config[stage].algorithm == ai_feedback.ALGORITHM:  # AI-labelled pairs, by the judge stage
      assert config[stage].judge in config.stages
      world_data |= set(ai_feedback.paths_of(stage, ""))
      continue
    source = config[stage].data.source
    assert (source if source not in ("", "toy") else stage) in world_data
    assert config[stage].data.eval_source in ("", *world_data)


def test_compilation_cache_directory_follows_config_and_environment(tmp_path, monkeypatch):
  from rlhf_jax import run

  saved = jax.config.jax_compilation_cache_dir
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  try:
    config = experiment_config("toy_quickstart")
    assert config.compile_cache == "workdir"
    assert run.enable_compilation_cache(config, str(tmp_path)) == str(tmp_path / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    config.compile_cache = ""
    assert run.enable_compilation_cache(config, str(tmp_path)) is None
    config.compile_cache = str(tmp_path / "shared")
    assert run.enable_compilation_cache(config, "unused") == str(tmp_path / "shared")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))  # the user's wins
    assert run.enable_compilation_cache(config, "unused") == str(tmp_path / "env")
  finally:
    jax.config.update("jax_compilation_cache_dir", saved)


def test_a_scratch_stage_starts_from_new_weights_and_best_of_n_names_its_policy():
  """toy_big_rm: a second, larger trunk pretrained from scratch after the policy stages, its reward
  models branching from it, and best of n on the small SFT policy's samples."""
  config = experiment_config("toy_big_rm")
  assert pipeline.parent_stage(config, "pretrain_big", previous_policy="sft") is None
  assert pipeline.parent_stage(config, "sft_big", previous_policy="pretrain_big") == "pretrain_big"
  assert pipeline.parent_stage(config, "rm_helpful_big", previous_policy="sft_big") == "sft_big"
  assert config.pretrain_big.model.embed_dim > config.pretrain.model.embed_dim
  assert config.eval.best_of_n_policy == "sft"
  config.eval.best_of_n_policy = "sft_typo"
  with pytest.raises(
      ValueError,
      match=r"config.eval.best_of_n_policy='sft_typo' names no training "
      r"stage of config.stages \(pretrain, sft, feedback",
  ):
    pipeline.training_stages(config)


def test_summaries_split_refusals_by_prompt_safety():
  rows = [
      dict(
          family="unsafe",
          unsafe=True,
          helpfulness=0.4,
          safety=1.0,
          combined=1.0,
          length=8.0,
          refusal=1.0,
          win_rate=1.0,
          kl=2.0,
      ),
      dict(
          family="facts",
          unsafe=False,
          helpfulness=1.0,
          safety=1.0,
          combined=1.0,
          length=4.0,
          refusal=0.0,
          win_rate=0.5,
          kl=1.0,
      ),
      dict(
          family="facts",
          unsafe=False,
          helpfulness=0.0,
          safety=1.0,
          combined=0.0,
          length=6.0,
          refusal=1.0,
          win_rate=0.0,
          kl=0.0,
      ),
  ]
  s = gold_eval.summarise(rows)
  assert s["n"] == 3 and s["refusal_unsafe"] == 1.0 and s["refusal_safe"] == 0.5
  np.testing.assert_allclose(
      [s["helpfulness"], s["win_rate"], s["kl"], s["length"]], [1.4 / 3, 0.5, 1.0, 6.0]
  )
  table = gold_eval.table_rows(
      {"m": {"overall": s, "families": {"facts": gold_eval.summarise(rows[1:])}}}
  )
  assert [r["family"] for r in table] == ["all", "facts"]
  assert table[1]["refusal_unsafe"] is None  # no unsafe prompt in that family


def test_best_of_n_gold_matches_a_loop():
  rs = np.random.RandomState(0)
  gold, rewards = rs.rand(5, 8), rs.randn(5, 8)
  for n in (1, 2, 4, 8):
    picks = [
        gold[p, g * n + np.argmax(rewards[p, g * n : (g + 1) * n])]
        for p in range(5)
        for g in range(8 // n)
    ]
    assert reward_eval.best_of_n_gold(gold, rewards, n) == pytest.approx(np.mean(picks))
  assert reward_eval.best_of_n_gold(gold, gold, 8) == pytest.approx(gold.max(1).mean())  # oracle
  with pytest.raises(ValueError, match="divisible"):
    reward_eval.best_of_n_gold(gold, rewards, 3)


def test_eval_rounds_puts_each_rejection_sampling_round_before_its_stage(tmp_path):
  config = experiment_config("toy_rejection_sampling")
  assert config.eval.rounds and config.rejection_sampling.rounds == 3
  stages = ["sft", "rejection_sampling", "ppo"]
  parents = {"sft": None, "rejection_sampling": "sft", "ppo": "rejection_sampling"}
  for r in (1, 2, 3):
    (tmp_path / "rejection_sampling" / f"round_{r}" / "export").mkdir(parents=True)
  got, got_parents = pipeline.with_rounds(config, str(tmp_path), stages, parents)
  assert got == [
      "sft",
      "rejection_sampling/round_1",
      "rejection_sampling/round_2",
      "rejection_sampling",
      "ppo",
  ]
  assert got_parents == {
      "sft": None,
      "rejection_sampling/round_1": "sft",
      "rejection_sampling/round_2": "rejection_sampling/round_1",
      "rejection_sampling": "rejection_sampling/round_2",
      "ppo": "rejection_sampling",
  }
  assert parents["rejection_sampling"] == "sft"  # the caller's dict is left alone
  config.eval.rounds = False
  assert pipeline.with_rounds(config, str(tmp_path), stages, parents) == (stages, parents)


def test_llama2_schedule_retrains_the_helpfulness_model_on_each_round_samples():
  """V(r) starts from V(r-1) and picks with a reward model trained on V(r-1)'s labelled samples,
  on prompts no earlier round saw; PPO starts from V3 with a model trained on V3's samples."""
  config = experiment_config("toy_llama2_pipeline")
  parents, previous = {}, None
  for stage in pipeline.training_stages(config):
    parents[stage] = pipeline.parent_stage(config, stage, previous)
    if pipeline.is_policy(config, stage):
      previous = stage
  assert [parents[f"rs_v{r}"] for r in (1, 2, 3)] == ["sft", "rs_v1", "rs_v2"]
  assert parents["ppo_after_rs"] == "rs_v3"
  assert [config[f"rs_v{r}"].reward.helpful for r in (1, 2, 3)] == [
      "rm_helpful",
      "rm_helpful_v2",
      "rm_helpful_v3",
  ]
  assert config.ppo_after_rs.reward.helpful == "rm_helpful_v4"
  for r in (1, 2, 3):
    assert parents[f"feedback_v{r}"] == f"rs_v{r}"  # labels of the latest policy's samples
    assert config[f"rm_helpful_v{r + 1}"].data.source == f"feedback_v{r}/pairs_helpful"
  assert [config[f"rs_v{r}"].prompt_offset for r in (1, 2, 3)] == [0, 512, 1024]


def test_best_of_n_drift_picks_from_the_second_rejection_sampling_round():
  """The turnover experiment's best of n samples V2 of rejection sampling against the same (frozen)
  reward models that then pick among its samples."""
  config = experiment_config("toy_best_of_n_drift")
  assert config.eval.best_of_n_policy == "rs_frozen" and config.rs_frozen.init_from == "sft"
  rs = config.rs_frozen
  assert rs.rounds == 2 and (rs.reward.helpful, rs.reward.safety) == ("rm_helpful", "rm_safety")
  assert pipeline.training_stages(config) == [
      "pretrain",
      "sft",
      "rm_helpful",
      "rm_safety",
      "rs_frozen",
  ]


def test_best_of_n_plot_draws_gold_and_proxy_of_every_reward(tmp_path):
  from rlhf_jax.evaluation import plots

  rs = np.random.RandomState(0)
  gold, rewards = rs.rand(20, 16), rs.randn(20, 16)
  ns = (1, 2, 4, 8, 16)
  picks = [reward_eval.best_of_n_gold(gold, rewards, n) for n in ns]
  curve = {
      "combined": picks,
      "helpfulness": picks,
      "safety": [1.0] * len(ns),
      "proxy": [reward_eval.best_of_n_gold(rewards, rewards, n) for n in ns],
  }
  assert np.all(np.diff(curve["proxy"]) > 0)  # a reward's own score of its pick rises with n
  report = {
      "n": list(ns),
      "kl": [reward_eval.best_of_n_kl(n) for n in ns],
      "prompts": 20,
      "mean": {"combined": 0.5},
      "oracle_curve": {
          k: [reward_eval.best_of_n_gold(gold, gold, n) for n in ns]
          for k in ("combined", "helpfulness", "safety")
      },
      "rm": curve,
  }
  rows = reward_eval.best_of_n_rows(report)
  assert [r["proxy"] for r in rows if r["reward"] == "rm"] == curve["proxy"]
  path = plots.plot_best_of_n(report, tmp_path / "eval" / "best_of_n.png")
  assert os.path.getsize(path) > 10_000 and open(path, "rb").read(4) == b"\x89PNG"


def test_within_prompt_corr_ignores_prompt_difficulty():
  rs = np.random.RandomState(0)
  gold = rs.rand(6, 4)
  offsets = 10.0 * rs.randn(6, 1)  # a reward that also knows which prompts are easy
  assert reward_eval.within_prompt_corr(gold + offsets, gold) == pytest.approx(1.0)
  assert reward_eval.within_prompt_corr(-gold + offsets, gold) == pytest.approx(-1.0)
  # Only prompt difficulty, no ordering within a prompt: undefined, not a spurious 1.
  assert reward_eval.within_prompt_corr(np.repeat(offsets, 4, 1), gold) is None
  r, g = rs.randn(6, 4), gold
  rc, gc = r - r.mean(1, keepdims=True), g - g.mean(1, keepdims=True)
  np.testing.assert_allclose(
      reward_eval.within_prompt_corr(r, g), np.corrcoef(rc.ravel(), gc.ravel())[0, 1], rtol=1e-12
  )
  # KL(best of n || policy) = log n - (n-1)/n: Monte Carlo over a discrete policy without ties.
  p = rs.dirichlet(np.ones(50))
  r = rs.permutation(50)  # distinct rewards
  cdf_sorted = np.cumsum(p[np.argsort(r)])
  q = np.empty(50)
  q[np.argsort(r)] = cdf_sorted**4 - np.concatenate([[0.0], cdf_sorted[:-1]]) ** 4
  exact = float(np.sum(q * np.log(q / p)))
  assert reward_eval.best_of_n_kl(4) == pytest.approx(np.log(4) - 0.75)
  assert exact <= reward_eval.best_of_n_kl(4) + 1e-9 and exact > 0.5 * reward_eval.best_of_n_kl(4)


def test_temperature_curve_needs_positive_temperatures():
  for bad in ((), (1.0, 0.0)):
    with pytest.raises(ValueError, match="temperatures > 0"):
      gold_eval.temperature_curve(None, None, [], jax.random.key(0), bad)


def test_gold_vs_kl_plot(tmp_path):
  from rlhf_jax.evaluation import plots

  np.testing.assert_allclose(plots.smooth([1.0, 2.0, 3.0, 4.0], 2), [1.0, 1.5, 2.5, 3.5])
  rows = [
      {
          "ppo/kl": 0.1 * i,
          "ppo/reward": 0.05 * i,
          "ppo/gold_helpfulness": 0.5,
          "ppo/gold_combined": 0.6,
      }
      for i in range(12)
  ]
  rows += [{"eval/kl": 0.2 * i, "eval/helpfulness": 0.5, "eval/combined": 0.6} for i in range(3)]
  path = plots.plot_gold_vs_kl(
      {"ppo (beta=0.1)": rows},
      tmp_path / "eval" / "plot.png",
      final={"ppo (beta=0.1)": {"kl": 1.0, "helpfulness": 0.5, "combined": 0.6}},
      baselines=[
          {
              "label": "best of n",
              "kl": [0.0, 0.19],
              "helpfulness": [0.5, 0.55],
              "combined": [0.6, 0.62],
          },
          {
              "label": "temperature",
              "kl": [0.0, 0.3],
              "helpfulness": [0.5, 0.56],
              "combined": [0.6, 0.64],
          },
      ],
  )
  assert os.path.getsize(path) > 10_000 and open(path, "rb").read(4) == b"\x89PNG"


def test_eval_skip_leaves_out_stages_and_a_table_of_none_loads_nothing(tmp_path):
  config = experiment_config("toy_quickstart")
  assert tuple(config.eval.skip) == ("pretrain",)
  # Nothing to evaluate: no tokenizer, task file or model is read (none exists here).
  assert pipeline.evaluate_stages(config, str(tmp_path), {}, ["pretrain"]) == {}
  assert pipeline.annotator_options(config.world) == {
      "bias_strength": config.world.annotator_bias,
      "flip_rate": config.world.annotator_flip_rate,
      "seeing": dict(config.world.annotators_seeing),
  }


def test_eval_split_picks_the_validation_or_the_test_prompts():
  config = experiment_config("toy_quickstart")
  paths = {"eval_tasks": "world/eval_tasks.jsonl", "valid_tasks": "world/valid_tasks.jsonl"}
  assert config.eval.split == "eval"  # tables report the test prompts unless told otherwise
  assert pipeline.eval_tasks_path(config, paths) == paths["eval_tasks"]
  config.eval.split = "valid"
  assert pipeline.eval_tasks_path(config, paths) == paths["valid_tasks"]
  config.eval.split = "test"
  with pytest.raises(ConfigError, match=r"config.eval.split='test'"):
    pipeline.eval_tasks_path(config, paths)
