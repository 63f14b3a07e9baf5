"""Llama 2's RLHF schedule on the toy world: rejection-sampling rounds (V1..V3), then PPO from the
last rejection-sampling policy (RLHF-V5 with PPO), against the Llama 2 combination of the
helpfulness and safety reward models.

  python -m rlhf_jax.run --config=experiments/toy_llama2_pipeline.py --workdir=runs/quickstart

The gold table shows SFT, each rejection-sampling round's policy (V1 against SFT, V2 against V1,
the stage itself, V3, against V2) and PPO (against V3).
"""

from rlhf_jax.toy_configs import ppo_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  # Its own stage name: the quickstart workdir's "ppo" (from SFT) must not be reused here.
  c.ppo_after_rs = ppo_stage(init_from="rejection_sampling")
  c.eval.rounds = True
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "rejection_sampling",
              "ppo_after_rs", "eval")
  return c
