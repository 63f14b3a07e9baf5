"""Llama 2's iterated rejection sampling: each round samples K = 8 responses per prompt from the
current policy, keeps the best under the Llama 2 combination of the helpfulness and safety reward
models (best across all rounds so far), and fine-tunes on the kept set.

  python -m rlhf_jax.run --config=experiments/toy_rejection_sampling.py --workdir=runs/quickstart

WORKDIR/rejection_sampling/rounds.json has, per round, the reward and gold of the policy's own
sample and of the kept best-of-K set; the gold table compares the final policy with SFT.
"""

from rlhf_jax.toy_configs import toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "rejection_sampling", "eval")
  return c
