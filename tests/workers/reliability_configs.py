"""Tiny configs of the reliability tests (tests/integration/train/test_reliability.py) and their
worker processes (tests/workers/kill_worker.py); also an experiment file for the CLI:

  python -m rlhf_jax.run --config=tests/workers/reliability_configs.py:sft --workdir=W

`get_config(name)` takes "sft" (toy data, needs nothing), "table" (the reliability table's run) or "reward" / "dpo" / "ppo", whose input
paths (`INPUT_KEYS`: tokenizer, LM export, pairs, prompts, reward-model export) come from the JSON
file named by the RELIABILITY_INPUTS environment variable.
Every run checkpoints often and logs every step, so a kill lands between many saves.
"""

import json
import os

from rlhf_jax.configs.base import base_config
from tests.helpers.configs import TINY_MODEL, pairwise_data, run_config

STEPS = 12
INPUT_KEYS = ("tokenizer", "lm", "pairs", "prompts", "rm")
TINY = TINY_MODEL


def _common(algorithm, *, batch_size=8, seq_len=64):
  c = run_config(
      algorithm,
      steps=STEPS,
      batch_size=batch_size,
      seq_len=seq_len,
      log_every=1,
      checkpoint_every=3,
      async_checkpoint=True,
      warmup_steps=2,
  )
  c.train.keep_checkpoints = 2
  return c


def sft_config():
  c = _common("sft", batch_size=16)
  c.model.update(**TINY)
  c.data.update(source="toy", toy_num_records=200, tokenizer_vocab_size=384, packing=True)
  c.sample.update(num_examples=0)
  return c


def _pairs_config(algorithm, inputs):
  c = pairwise_data(_common(algorithm, seq_len=128), inputs["pairs"], inputs["tokenizer"])
  c.init_from = inputs["lm"]
  c.reward.comparisons_per_row = 3
  return c


def reward_config(inputs):
  c = _pairs_config("reward", inputs)
  c.reward.update(margins="small", center_coef=0.01)
  return c


def dpo_config(inputs):
  c = _pairs_config("dpo", inputs)
  c.dpo.reference = "precompute"
  c.dpo.sigmoid.beta = 0.5
  return c


def ppo_config(inputs, iterations=8):
  c = base_config()
  c.algorithm = "ppo"
  c.init_from = inputs["lm"]
  c.model.vocab_size = 0
  # Not (2, 2, 2): XLA's CPU collectives can deadlock in the PPO update there (tests/helpers/ppo.py).
  c.mesh.shape = (4, 1, 2)
  c.optim.update(lr=1e-3, warmup_steps=1)
  c.data.update(source=inputs["prompts"], tokenizer=inputs["tokenizer"])
  c.train.update(checkpoint_every=2, keep_checkpoints=2, async_checkpoint=True)
  c.ppo.update(
      iterations=iterations,
      prompts_per_iteration=8,
      minibatches=2,
      epochs=2,
      max_new_tokens=8,
      max_prompt_len=96,
      value_init_from=inputs["rm"],
      eval_every=0,
  )
  c.ppo.reward.helpful = inputs["rm"]
  return c


def ppo_stale_config(inputs, iterations=8):
  """PPO sampling on 4 devices of its own, one step off-policy: its checkpoints also hold the
  behaviour weights, and the prompt stream from before the batch sampled ahead."""
  c = ppo_config(inputs, iterations)
  c.mesh.shape = (2, 1, 2)  # the 4 training devices
  c.ppo.update(rollout_devices=4, staleness=1)
  return c


def table_config():
  """The reliability table's run (tests/integration/train/test_fault_table.py): tiny SFT, 4 steps,
  a checkpoint every 2, on the data file and tokenizer that --config.data.source and
  --config.data.tokenizer name."""
  c = run_config(
      "sft",
      steps=4,
      batch_size=8,
      seq_len=64,
      log_every=1,
      checkpoint_every=2,
      async_checkpoint=True,
      warmup_steps=1,
  )
  c.model.update(**TINY)
  c.train.keep_checkpoints = 2
  c.data.update(eval_fraction=0.1)
  c.sample.update(num_examples=0)
  return c


def get_config(name="sft"):
  if name == "sft":
    return sft_config()
  if name == "table":
    return table_config()
  with open(os.environ["RELIABILITY_INPUTS"]) as f:
    inputs = json.load(f)
  return {
      "reward": reward_config,
      "dpo": dpo_config,
      "ppo": ppo_config,
      "ppo_stale": ppo_stale_config,
  }[name](inputs)
