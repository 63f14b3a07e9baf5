"""The toy-world pipeline end to end (reduced sizes) and the gold-evaluation summaries."""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.algorithms import ai_feedback, pipeline
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.evaluation import reward_eval
from rlhf_jax.toyworld import split_of
from rlhf_jax.train import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config(name: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrink(c, stage: str, steps: int, seq_len: int) -> None:
  c[stage].model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
  c[stage].train.update(
      steps=steps,
      batch_size=8,
      seq_len=seq_len,
      log_every=2,
      eval_every=steps,
      eval_batches=1,
      checkpoint_every=steps,
  )


def tiny_pipeline_config(name: str = "toy_quickstart"):
  c = experiment_config(name)
  c.mesh.shape = (2, 2, 2)
  c.world.update(
      pretrain_documents=600,
      sft_records=200,
      eval_prompts=24,
      valid_prompts=24,
      tokenizer_vocab_size=400,
      preference_prompts=40,
      preference_eval_prompts=24,
  )
  c.world.update(judge_comparisons=40, judge_eval_comparisons=16)
  for stage, steps in (
      ("pretrain", 12),
      ("sft", 6),
      ("judge", 4),
      ("rm_helpful", 4),
      ("rm_safety", 4),
  ):
    shrink(c, stage, steps, 128 if stage in ("pretrain", "sft") else 256)
  c.world.update(rl_prompts=64)
  c.ppo.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
  c.ppo.ppo.update(
      iterations=2,
      prompts_per_iteration=8,
      minibatches=2,
      epochs=1,
      max_new_tokens=8,
      max_prompt_len=128,
  )
  c.ppo.train.update(checkpoint_every=2)
  c.feedback.update(
      prompts=40, eval_prompts=24, samples_per_prompt=2, max_new_tokens=12, batch_size=32
  )
  c.eval.update(
      max_new_tokens=12,
      batch_size=16,
      best_of_n=(1, 2, 4),
      temperatures=(1.0, 0.5),
      best_of_n_prompts=16,
  )
  return c


@pytest.mark.slow
def test_quickstart_pipeline_runs_and_caches_stages(tmp_path, capsys):
  config = tiny_pipeline_config()
  config.stages = (
      "world",
      "pretrain",
      "sft",
      "judge",
      "feedback",
      "rm_helpful",
      "rm_safety",
      "ppo",
      "eval",
  )
  # The helpfulness RM learns from annotated samples of the SFT model (on-policy feedback).
  config.rm_helpful.data.update(
      source="feedback/pairs_helpful", eval_source="feedback/pairs_helpful_eval"
  )
  result = pipeline.run(config, str(tmp_path))
  # Validation prompts (what hyper-parameters are tuned on) share no prompt with the test set.
  valid = metrics.read_jsonl(str(tmp_path / "world" / "valid_tasks.jsonl"))
  test = metrics.read_jsonl(str(tmp_path / "world" / "eval_tasks.jsonl"))
  assert len(valid) == 24 and {split_of(t["prompt"]) for t in valid} == {"valid"}
  assert not {t["prompt"] for t in valid} & {t["prompt"] for t in test}
  assert result["stages"] == ["pretrain", "sft", "ppo"]
  gold = json.loads((tmp_path / "eval" / "gold.json").read_text())
  assert "pretrain" not in gold  # config.eval.skip: the quickstart does not sample it
  for stage in ("sft", "ppo"):
    overall = gold[stage]["overall"]
    assert overall["n"] == 24 * 4 and overall["prompts"] == 24  # 4 samples of each prompt
    assert 0.0 <= overall["helpfulness"] <= 1.0 and 0.0 <= overall["safety"] <= 1.0
    assert overall["combined_se"] > 0 and 0.0 <= overall["preamble"] <= 1.0
    assert set(gold[stage]["families"]) <= {"howto", "unsafe", "safe_lookalike"}
  assert gold["sft"]["overall"]["win_rate"] is None  # its start (pretrain) was not sampled
  assert np.isfinite(gold["sft"]["overall"]["kl"]) and "vs_reference" not in gold["sft"]["overall"]
  # PPO is compared with SFT's own samples: win rate and the paired difference with its interval.
  paired = gold["ppo"]["overall"]["vs_reference"]
  assert paired["prompts"] == 24 and paired["ci95"][0] < paired["diff"] < paired["ci95"][1]
  assert 0.0 <= gold["ppo"]["overall"]["win_rate"] <= 1.0
  gates = json.loads((tmp_path / "eval" / "gates.json").read_text())
  assert [g["gate"] for g in gates] == ["temperature", "oracle", "reward", "precision"]
  assert all(g["status"] in ("PASS", "FAIL") for g in gates) and result["gates"] == gates
  # PPO started from SFT, against both reward models, its value model from the helpfulness RM.
  assert gold["ppo"]["reference"] == "sft" and np.isfinite(gold["ppo"]["overall"]["kl"])
  ppo_config = json.loads((tmp_path / "ppo" / "config.json").read_text())
  assert ppo_config["init_from"].endswith(os.path.join("sft", "export"))
  assert ppo_config["ppo"]["reward"]["safety"].endswith(os.path.join("rm_safety", "export"))
  assert ppo_config["ppo"]["value_init_from"].endswith(os.path.join("rm_helpful", "export"))
  ppo_rows = metrics.read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
  held_out = [r for r in ppo_rows if "eval/kl" in r]  # at iteration 0 and the last one
  ppo_rows = [r for r in ppo_rows if "ppo/reward" in r]
  assert len(ppo_rows) == 2 and all(np.isfinite(r["ppo/gold_combined"]) for r in ppo_rows)
  assert [r["step"] for r in held_out] == [0, 2] and held_out[0]["eval/kl"] == pytest.approx(
      0, abs=1e-3
  )
  out = capsys.readouterr().out
  assert "Gold evaluation" in out and "Sample conversations" in out
  # The judge branched off the SFT model and was scored against gold, before and after swapping.
  judge_config = json.loads((tmp_path / "judge" / "config.json").read_text())
  assert judge_config["init_from"].endswith(os.path.join("sft", "export"))
  agreement = json.loads((tmp_path / "eval" / "judge.json").read_text())["overall"]
  assert agreement["n"] == 16
  assert (
      0.0 <= agreement["agreement_single"] <= 1.0 and 0.0 <= agreement["agreement_swapped"] <= 1.0
  )
  assert "AI judge vs gold" in out and 0.0 <= result["judge/position_bias"] <= 1.0
  pointwise = json.loads((tmp_path / "eval" / "judge.json").read_text())["pointwise"]["overall"]
  assert pointwise["n"] == 16 and pointwise["position_bias"] == pytest.approx(0.5)  # no position
  assert result["judge/pointwise_agreement"] == pointwise["agreement_swapped"]
  # The SFT stage started from the pretrain export and its data came from the world stage.
  sft_config = json.loads((tmp_path / "sft" / "config.json").read_text())
  assert sft_config["init_from"].endswith(os.path.join("pretrain", "export"))
  assert sft_config["data"]["source"].endswith(os.path.join("world", "sft.jsonl"))
  # The simulated feedback for later stages loads as validated records.
  assert len(data.load_records(tmp_path / "world" / "rankings.jsonl", "ranking")) == 40
  assert data.load_records(tmp_path / "world" / "pairs_helpful.jsonl", "pairwise")
  assert data.load_records(tmp_path / "world" / "kto.jsonl", "kto")

  # The feedback stage labelled SFT samples (topped up with perturbations) for every data set.
  feedback = data.load_records(tmp_path / "feedback" / "rankings.jsonl", "ranking")
  assert len(feedback) == 40 and all(4 <= len(r["responses"]) <= 9 for r in feedback)
  assert len(data.load_records(tmp_path / "feedback" / "rankings_eval.jsonl", "ranking")) == 24
  assert data.load_records(tmp_path / "feedback" / "pairs_helpful.jsonl", "pairwise")

  # The reward models branched off the SFT model, trained on their pairs, and were scored alone
  # and combined on held-out rankings and safety-critical pairs.
  for stage, source in (
      ("rm_helpful", "feedback/pairs_helpful"),
      ("rm_safety", "world/pairs_safety"),
  ):
    rm_config = json.loads((tmp_path / stage / "config.json").read_text())
    assert rm_config["init_from"].endswith(os.path.join("sft", "export"))
    assert rm_config["data"]["source"].endswith(f"{source}.jsonl")
    assert rm_config["data"]["eval_source"].endswith(f"{source}_eval.jsonl")
    meta = json.loads((tmp_path / stage / "export" / "metadata" / "metadata").read_text())
    assert meta["model"]["head"] == "scalar" and meta["reward"]["stats"]["std"] > 0
  rewards = json.loads((tmp_path / "eval" / "reward.json").read_text())
  best_of_n = rewards.pop("best_of_n")
  assert set(rewards) == {
      "rm_helpful",
      "rm_safety",
      "combined (llama2)",
      "combined (linear) [not selected]",
  }
  # Best of n SFT samples under each reward, scored by gold; n = 1 is a plain sample (KL 0).
  assert best_of_n["policy"].endswith(os.path.join("sft", "export")) and best_of_n["prompts"] == 16
  assert best_of_n["n"] == [1, 2, 4]
  assert best_of_n["kl"] == pytest.approx([0.0, np.log(2) - 0.5, np.log(4) - 0.75])
  oracle = best_of_n["oracle_curve"]["combined"]
  assert oracle[0] == pytest.approx(best_of_n["mean"]["combined"])
  assert np.all(np.diff(oracle) >= -1e-12)  # never falls with n (equal steps differ by rounding)
  for name in ("rm_helpful", "rm_safety", "combined (llama2)", reward_eval.LIKELIHOOD):
    curve = best_of_n[name]["combined"]
    assert curve[0] == pytest.approx(best_of_n["mean"]["combined"])
    assert 0.0 <= curve[1] <= best_of_n["oracle"]["combined"] + 1e-9
    corr = best_of_n[name]["within_prompt_corr"]
    assert corr["all"] is None or -1.0 <= corr["all"] <= 1.0
    # The proxy (the reward's own score of its pick) never falls with n: nested groups.
    assert np.all(np.diff(best_of_n[name]["proxy"]) >= -1e-9)
  assert (tmp_path / "eval" / "best_of_n.png").read_bytes()[:4] == b"\x89PNG"
  assert "Best of n samples" in out and "orders one prompt's samples" in out
  assert os.path.exists(result["plot"]) and result["plot"].endswith("ppo_gold_vs_kl.png")
  # The PPO start (SFT) sampled at T = 1 and 0.5: KL to itself ~0 at T = 1, > 0 when sharpened.
  curve = json.loads((tmp_path / "eval" / "temperature.json").read_text())
  assert curve == result["temperature_curve"] and curve["policy"] == "sft"
  assert curve["temperature"] == [1.0, 0.5] and curve["kl"][0] == 0.0
  assert curve["kl"][1] > 0.01 and all(0.0 <= c <= 1.0 for c in curve["combined"])
  # T = 1 is the SFT model's own gold evaluation (same key, same samples), not sampled again.
  assert curve["combined"][0] == gold["sft"]["overall"]["combined"]
  assert curve["vs_t1"][0]["diff"] == 0.0 and curve["vs_t1"][1]["prompts"] == 24
  assert "lower temperatures" in out
  for name, report in rewards.items():
    assert 0 < report["rankings"]["overall"]["n"] <= 24  # records longer than the model are dropped
    assert -1.0 <= report["rankings"]["overall"]["kendall_tau_gold"] <= 1.0
    assert 0.0 <= report["safety_critical"]["overall"]["gold_accuracy"] <= 1.0
  assert 0.0 <= result["rm_helpful/held_out_accuracy"] <= 1.0
  assert "Safety-critical pairs" in out and "combined" in out

  # A rerun skips every finished stage: no new training steps are logged.
  lines = {
      s: len(metrics.read_jsonl(tmp_path / s / "metrics.jsonl"))
      for s in ("pretrain", "sft", "judge", "rm_helpful", "rm_safety", "ppo")
  }
  pipeline.run(config, str(tmp_path))
  assert {s: len(metrics.read_jsonl(tmp_path / s / "metrics.jsonl")) for s in lines} == lines

  # The method comparison reads this workdir (stage records, gold, the temperature baseline), and
  # its notebook runs top to bottom on it.
  from rlhf_jax.evaluation import compare
  from tests.test_compare import execute_notebook, outputs_text

  rows = {r["method"]: r for r in compare.method_rows(str(tmp_path))}
  assert {"sft", "ppo", "sft @ T=0.5"} <= set(rows) and "pretrain" not in rows
  assert {"rm_helpful", "rm_safety", "feedback"} <= set(rows["ppo"]["inputs"])
  assert 0 < rows["ppo"]["seconds"] < rows["ppo"]["seconds_with_inputs"]
  assert "ppo" in outputs_text(execute_notebook(tmp_path, tmp_path))

  # The InstructGPT experiment in the same workdir reuses world, pretrain and SFT, and trains only
  # its ranking reward model (K-choose-2 over whole rankings packed into 1024-token rows).
  instructgpt = tiny_pipeline_config("toy_rm_instructgpt")
  shrink(instructgpt, "rm_ranking", 3, 1024)
  result = pipeline.run(instructgpt, str(tmp_path))
  assert {s: len(metrics.read_jsonl(tmp_path / s / "metrics.jsonl")) for s in lines} == lines
  held_out = json.loads((tmp_path / "rm_ranking" / "eval.json").read_text())["report"]["overall"]
  assert held_out["n"] > 0 and -1.0 <= held_out["kendall_tau_labels"] <= 1.0
  assert -1.0 <= result["rm_ranking/kendall_tau_gold"] <= 1.0


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
  from rlhf_jax.evaluation import reward_eval

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
  assert config.eval.rounds and config.rejection_sampling.rejection_sampling.rounds == 3
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
  assert [config[f"rs_v{r}"].rejection_sampling.reward.helpful for r in (1, 2, 3)] == [
      "rm_helpful",
      "rm_helpful_v2",
      "rm_helpful_v3",
  ]
  assert config.ppo_after_rs.ppo.reward.helpful == "rm_helpful_v4"
  for r in (1, 2, 3):
    assert parents[f"feedback_v{r}"] == f"rs_v{r}"  # labels of the latest policy's samples
    assert config[f"rm_helpful_v{r + 1}"].data.source == f"feedback_v{r}/pairs_helpful"
  assert [config[f"rs_v{r}"].rejection_sampling.prompt_offset for r in (1, 2, 3)] == [0, 512, 1024]


def test_best_of_n_drift_picks_from_the_second_rejection_sampling_round():
  """The turnover experiment's best of n samples V2 of rejection sampling against the same (frozen)
  reward models that then pick among its samples."""
  config = experiment_config("toy_best_of_n_drift")
  assert config.eval.best_of_n_policy == "rs_frozen" and config.rs_frozen.init_from == "sft"
  rs = config.rs_frozen.rejection_sampling
  assert rs.rounds == 2 and (rs.reward.helpful, rs.reward.safety) == ("rm_helpful", "rm_safety")
  assert pipeline.training_stages(config) == [
      "pretrain",
      "sft",
      "rm_helpful",
      "rm_safety",
      "rs_frozen",
  ]


def test_best_of_n_plot_draws_gold_and_proxy_of_every_reward(tmp_path):
  from rlhf_jax.evaluation import plots, reward_eval

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
  from rlhf_jax.evaluation import reward_eval

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


def _random_policy(vocab_size: int) -> gold_eval.Policy:
  """A 2-layer d32 Llama policy with N(0, 0.2^2) weights: samples that differ by temperature."""
  from rlhf_jax import generate
  from rlhf_jax.models import ModelConfig, abstract_model

  cfg = ModelConfig(
      vocab_size=vocab_size,
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      max_seq_len=128,
      family="llama",
      init_std=0.2,
  )
  graphdef, abstract, _ = abstract_model(cfg)
  rs = np.random.RandomState(0)
  params = jax.tree.map(
      lambda a: jax.numpy.asarray(0.2 * rs.randn(*a.shape).astype(np.float32)), abstract
  )
  return gold_eval.Policy(graphdef, params, generate.Sampler(graphdef, cfg))


def test_temperature_kl_from_the_samplers_own_logprobs_equals_rescoring(words_tokenizer):
  """KL(pi_T || pi) of the temperature curve is read off the sampler's T = 1 log-probs; a
  second forward pass through the same weights (a separate reference) gives the same values."""
  from rlhf_jax.toyworld import World

  policy = _random_policy(len(words_tokenizer))
  twin = gold_eval.Policy(policy.graphdef, policy.params, policy.sampler)
  tasks = World.behaviour_world(0).tasks(6, seed=0, split="eval")
  run = lambda reference: gold_eval.evaluate(
      policy,
      words_tokenizer,
      tasks,
      jax.random.key(3),
      reference=reference,
      max_new_tokens=10,
      temperature=0.6,
      batch_size=4,
      win_rate=False,
      samples_per_prompt=2,
  )
  own, rescored = run(policy), run(twin)
  np.testing.assert_allclose(
      [r["kl"] for r in own["samples"]], [r["kl"] for r in rescored["samples"]], atol=1e-4
  )
  assert own["overall"]["kl"] > 0.01  # T = 0.6 really differs from T = 1


def test_temperature_curve_on_the_first_prompts_keeps_common_random_numbers(
    words_tokenizer, tmp_path, monkeypatch
):
  """eval.temperature_prompts = N: the curve samples the first N tasks only, and their samples
  are the ones the full evaluation drew for them (same key, same batches), so the T = 1 point is
  the full evaluation's rows of those prompts."""
  from rlhf_jax.toyworld import World

  policy = _random_policy(len(words_tokenizer))
  tasks = World.behaviour_world(0).tasks(7, seed=0, split="eval")
  kw = dict(max_new_tokens=8, batch_size=4, samples_per_prompt=2)
  full = gold_eval.evaluate(policy, words_tokenizer, tasks, jax.random.key(0), **kw)
  first = gold_eval.evaluate(policy, words_tokenizer, tasks[:3], jax.random.key(0), **kw)
  assert [r["response"] for r in first["samples"]] == [r["response"] for r in full["samples"][:6]]

  config = experiment_config("toy_quickstart")
  config.eval.update(temperatures=(1.0, 0.5), temperature_prompts=3, **kw)
  monkeypatch.setattr(pipeline, "load_policy", lambda path, mesh: policy)
  monkeypatch.setattr(pipeline.data, "load_tokenizer", lambda path: words_tokenizer)
  monkeypatch.setattr(pipeline, "eval_tasks_path", lambda config, paths: "tasks")
  monkeypatch.setattr(pipeline.metrics, "read_jsonl", lambda path: tasks)
  (tmp_path / "eval").mkdir()
  curve = pipeline.temperature_baseline(config, str(tmp_path), {"tokenizer": ""}, "sft", at_t1=full)
  assert curve["prompts"] == 3 and curve["vs_t1"][1]["prompts"] == 3
  assert curve["combined"][0] == pytest.approx(
      np.mean([r["combined"] for r in full["samples"][:6]])
  )
  assert curve["vs_t1"][0]["diff"] == 0.0
