"""RLAIF and Constitutional AI: the soft-label reward loss against NumPy, AI labelling of pairs and
sibling rewards on stub judges (principle choice, position swap, records), judge-gold agreement,
SL-CAI's revision records on a stub reviser, config errors, and tiny end-to-end runs (slow): PPO
with the judge as its reward, SL-CAI, and a reward model on soft labels.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_ai_feedback.py.
"""

import json

import jax
import pytest

from rlhf_jax import data
from rlhf_jax.algorithms import constitutional, ppo
from rlhf_jax.configs.base import base_config
from rlhf_jax.models import ModelConfig, create_model, split_model
from rlhf_jax.toyworld import World, judge
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import checkpoint, metrics

# --- end to end (slow) ------------------------------------------------------------------------------

TINY = ModelConfig(
    vocab_size=384,
    num_layers=1,
    embed_dim=32,
    num_heads=2,
    num_kv_heads=2,
    mlp_dim=64,
    max_seq_len=256,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tokenizer that keeps "A" / "B" whole, toy tasks, and one random LM export serving as both
  policy and judge."""
  world = World(0)
  root = tmp_path_factory.mktemp("rlaif")
  tasks = world.tasks(6, seed=0, families=["unsafe", "safe_lookalike"]) + world.tasks(
      2, seed=0, families=["arithmetic"]
  )
  texts = judge.tokenizer_texts(world, 40) + [t["prompt"] for t in world.tasks(50, seed=0)]
  data.train_tokenizer(texts, 384, root / "tok")
  _, params = split_model(create_model(TINY, 0))
  checkpoint.export_params(
      root / "lm",
      jax.device_get(params),
      metadata={"model": TINY.to_dict(), "tokenizer": str(root / "tok")},
  )
  with open(root / "tasks.jsonl", "w") as f:
    f.writelines(json.dumps(t) + "\n" for t in tasks)
  return {
      "root": root,
      "tok": str(root / "tok"),
      "lm": str(root / "lm"),
      "tasks": str(root / "tasks.jsonl"),
  }


def tiny_config(algorithm, tiny):
  c = base_config()
  c.algorithm, c.init_from, c.model.vocab_size = algorithm, tiny["lm"], 0
  c.mesh.shape = (4, 1, 2)
  c.data.update(source=tiny["tasks"], tokenizer=tiny["tok"])
  c.train.update(
      steps=1,
      batch_size=8,
      seq_len=128,
      log_every=1,
      eval_every=1,
      eval_batches=1,
      async_checkpoint=False,
  )
  c.sample.num_examples = 0
  return c


@pytest.mark.slow
def test_ppo_with_the_judge_as_reward_runs_and_rewards_are_sibling_win_probabilities(
    tmp_path, tiny
):
  c = tiny_config("ppo", tiny)
  c.ppo.update(
      iterations=2,
      prompts_per_iteration=4,
      samples_per_prompt=2,
      minibatches=1,
      epochs=1,
      max_new_tokens=4,
      max_prompt_len=96,
      value_model="policy_head",
  )
  c.ppo.reward.judge = tiny["lm"]
  assert ppo.train(c, str(tmp_path))["iterations"] == 2
  rows = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if "ppo/reward" in r]
  assert len(rows) == 2
  for r in rows:  # a prompt's two rewards sum to 1: the mean reward is exactly 1/2
    assert r["ppo/reward"] == pytest.approx(0.5, abs=1e-6)
  assert (tmp_path / "export").exists()


@pytest.mark.slow
def test_sl_cai_writes_revisions_and_fine_tunes_on_them(tmp_path, tiny):
  c = tiny_config("constitutional_sl", tiny)
  c.constitutional.update(
      judge=tiny["lm"],
      prompts=6,
      max_new_tokens=4,
      batch_size=32,
      helpful_source=tiny["tasks"].replace("tasks", "helpful"),
      helpful_fraction=0.25,
  )
  with open(c.constitutional.helpful_source, "w") as f:
    f.writelines(
        json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n" for w in ("yes", "no", "maybe")
    )
  result = constitutional.train(c, str(tmp_path))
  revisions = metrics.read_jsonl(tmp_path / "revisions.jsonl")
  assert len(revisions) == 6 and {r["family"] for r in revisions} <= {"unsafe", "safe_lookalike"}
  for r in revisions:
    assert len(r["steps"]) == 1 and r["steps"][0]["principle"] in judge.CONSTITUTION
    assert r["gold_before"] == world_lib.gold_scores(
        next(t for t in metrics.read_jsonl(tiny["tasks"]) if t["prompt"] == r["prompt"]),
        r["response"],
    )
  sft_data = metrics.read_jsonl(tmp_path / "sft_data.jsonl")
  assert sorted(r["source"] for r in sft_data) == ["helpful"] * 2 + ["revision"] * 6
  assert result["revision/n"] == 6 and (tmp_path / "export").exists()
