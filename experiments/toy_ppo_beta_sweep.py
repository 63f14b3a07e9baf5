"""Reward over-optimisation: PPO from the SFT model at several KL coefficients (beta), each its own
stage branching off SFT with the same reward models, prompts and budget.

  python -m rlhf_jax.run --config=experiments/toy_ppo_beta_sweep.py --workdir=runs/quickstart

The eval stage writes WORKDIR/eval/ppo_gold_vs_kl.png: proxy reward, gold helpfulness and gold
combined against KL for every beta. With a weak penalty the proxy reward keeps rising while gold
peaks early and falls (the reward models are only reliable near the SFT distribution); a strong
penalty holds the policy where the proxy and gold still agree. "ppo_gold_reward" runs the same
PPO against the gold reward itself (an oracle reward model): the upper bound for the sweep.
"""

from rlhf_jax.toy_configs import ppo_stage, toy_pipeline_config

BETAS = {"ppo_beta_0p02": 0.02, "ppo_beta_0p1": 0.1, "ppo_beta_0p3": 0.3}


def get_config():
  c = toy_pipeline_config()
  for name, beta in BETAS.items():
    c[name] = ppo_stage(beta=beta, init_from="sft")
  c.ppo_gold_reward = ppo_stage(beta=0.05, init_from="sft")
  c.ppo_gold_reward.ppo.reward.gold = True
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", *BETAS, "ppo_gold_reward",
              "eval")
  return c
