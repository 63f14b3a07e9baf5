"""PPO (InstructGPT / Llama 2 final stage) from the SFT model against the Llama 2 combination of
the helpfulness and safety reward models, with a per-token KL penalty to the SFT model.

  python -m rlhf_jax.run --config=experiments/toy_ppo.py --workdir=runs/quickstart

With the quickstart's workdir the world, pretrain, SFT and reward-model stages are reused; the
gold table then shows SFT and PPO side by side (win rate and KL of PPO against SFT).
"""

from rlhf_jax.configs.toy import toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "ppo", "eval")
  return c
