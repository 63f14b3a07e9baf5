"""Llama 2's iterated rejection sampling: each round samples K = 8 responses per prompt from the
current policy, keeps the best under the Llama 2 combination of the helpfulness and safety reward
models (best across all rounds so far), and fine-tunes on the kept set.

  python -m rlhf_jax.run --config=experiments/toy_rejection_sampling.py --workdir=runs/quickstart

WORKDIR/rejection_sampling/rounds.json has, per round, the reward and gold of the policy's own
sample and of the kept best-of-K set; the gold table shows each round's policy against the round
before it (`eval.rounds`). The reward models stay the first round's throughout; for Llama 2's
schedule, which retrains them on each round's samples, see experiments/toy_llama2_pipeline.py.
"""

from rlhf_jax.configs.toy import toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.eval.rounds = True
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "rejection_sampling", "eval")
  return c
