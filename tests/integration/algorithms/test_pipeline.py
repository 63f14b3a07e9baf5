"""The toy-world pipeline end to end (reduced sizes) and the gold-evaluation summaries.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_pipeline.py.
"""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.algorithms import pipeline
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.evaluation import reward_eval
from rlhf_jax.toyworld import split_of
from rlhf_jax.train import metrics
from tests.helpers.pipeline import experiment_config


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


GOLD_FUNCTION = "rlhf_jax.toyworld.verifiers:gold"


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
  c.ppo.update(
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
      best_of_n_functions=(GOLD_FUNCTION,),
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
  for mode in ("pointwise", "score"):
    graded = json.loads((tmp_path / "eval" / "judge.json").read_text())[mode]["overall"]
    assert graded["n"] == 16 and graded["position_bias"] == pytest.approx(0.5)  # no position
    assert result[f"judge/{mode}_agreement"] == graded["agreement_swapped"]
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
  # A reward function picks too: the gold function's best of n is the oracle's.
  np.testing.assert_allclose(best_of_n[GOLD_FUNCTION]["combined"], oracle, atol=1e-12)
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
  for _name, report in rewards.items():
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
  from tests.helpers.compare import execute_notebook, outputs_text

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
