"""Tool use through the pipeline (experiments/toy_tools.py at a tiny size): a world with tools
writes tool demonstrations and a tokenizer with the call tokens, GRPO's rollouts run the tools
and log their rates, the gold table samples with the tools and reports how often each family
called, and the tool-use plot is written. What GRPO learns is measured in docs/toyworld.md."""

import json

import pytest

from rlhf_jax.algorithms import pipeline
from rlhf_jax.data import load_tokenizer
from rlhf_jax.train import metrics
from tests.helpers.pipeline import experiment_config


def tiny_tools_config():
  c = experiment_config("toy_tools")
  c.mesh.shape = (-1, 1, 1)
  c.world.update(
      pretrain_documents=400,
      sft_records=300,
      eval_prompts=16,
      valid_prompts=16,
      tokenizer_vocab_size=400,
      preference_prompts=16,
      preference_eval_prompts=8,
      judge_comparisons=8,
      judge_eval_comparisons=8,
      rl_prompts=32,
      tool_demo_rate=1.0,
  )
  for stage, steps in (("pretrain", 10), ("sft", 40)):
    c[stage].model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
    c[stage].train.update(steps=steps, batch_size=16, log_every=5, eval_every=steps)
    c[stage].train.update(eval_batches=1, checkpoint_every=steps)
  c.grpo_tools.update(
      iterations=2, prompts_per_iteration=4, samples_per_prompt=4, max_new_tokens=32, eval_every=2
  )
  c.grpo_tools.update(eval_prompts=8)
  c.grpo_tools.train.update(checkpoint_every=2)
  c.eval.update(batch_size=16, samples_per_prompt=2)
  return c


@pytest.mark.slow
def test_the_tool_pipeline_runs_tools_in_training_and_evaluation(tmp_path):
  config = tiny_tools_config()
  pipeline.run(config, str(tmp_path))
  tokenizer = load_tokenizer(tmp_path / "world" / "tokenizer")
  assert tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>", "<|tool|>"]) == [7, 8, 9]
  sft = metrics.read_jsonl(tmp_path / "world" / "sft.jsonl")
  demos = [r for r in sft if "messages" in r]
  assert demos and all(r["family"] in ("arithmetic", "facts") for r in demos)
  assert all(r["messages"][2]["role"] == "tool" for r in demos)
  rows = metrics.read_jsonl(tmp_path / "grpo_tools" / "metrics.jsonl")
  trained = [r for r in rows if "ppo/reward" in r]
  assert len(trained) == 2
  for r in trained:
    assert 0.0 <= r["ppo/tool_call_rate"] <= 1.0 and r["ppo/tool_calls"] <= 2.0
    ended = sum(r[f"ppo/tool_ended_{how}"] for how in ("eos", "length", "turns", "environment"))
    assert ended == pytest.approx(1.0)
  held_out = [r for r in rows if "eval/arithmetic_tool_call_rate" in r]
  assert [r["step"] for r in held_out] == [0, 2]
  gold = json.loads((tmp_path / "eval" / "gold.json").read_text())
  for stage in ("sft", "grpo_tools"):
    assert 0.0 <= gold[stage]["overall"]["tool_call_rate"] <= 1.0
    assert set(gold[stage]["families"]) == {"arithmetic", "facts"}
  assert (tmp_path / "eval" / "tool_use.png").stat().st_size > 0
