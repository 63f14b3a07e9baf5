"""Reward over-optimisation and the KL controller: PPO from the SFT model at several fixed KL
coefficients (beta), and once with Ziegler et al.'s adaptive controller, each its own stage
branching off SFT with the same reward models, prompts and budget (120 iterations x 32 prompts,
as `experiments/toy_compare.py`'s "ppo", which is the beta = 0.3 stage and is shared with it).

  python -m rlhf_jax.run --config=experiments/toy_ppo_beta_sweep.py --workdir=runs/compare

The eval stage writes WORKDIR/eval/ppo_gold_vs_kl.png: proxy reward, gold helpfulness and gold
combined against KL for every beta (validation prompts, every 10 iterations). With a weak penalty
the proxy reward keeps rising while gold stops rising or falls: the reward models are only
reliable near the SFT distribution. WORKDIR/ppo_adaptive/metrics.jsonl holds the controller's
beta (`ppo/beta`) and the KL it steers (`ppo/kl`) at every iteration. "ppo_gold_reward" runs PPO
against the gold reward itself (an oracle reward model): the upper bound for the sweep.
"""

from rlhf_jax.configs.toy import ppo_stage, toy_pipeline_config

BETAS = {"ppo": 0.3, "ppo_beta_0p1": 0.1, "ppo_beta_0p03": 0.03, "ppo_beta_0p01": 0.01}
ITERATIONS = 120
# The adaptive controller's target KL (nats per response) and horizon: beta changes by at most
# 32 / 128 x 20% = 5% per iteration of 32 responses, so 120 iterations can move it ~300-fold (with
# Ziegler et al.'s horizon of 10,000 it could move by only 8%).
ADAPTIVE_TARGET, ADAPTIVE_HORIZON = 1.0, 128


def get_config():
  c = toy_pipeline_config()
  for name, beta in BETAS.items():
    c[name] = ppo_stage(iterations=ITERATIONS, beta=beta, init_from="sft")
  c.ppo_adaptive = ppo_stage(iterations=ITERATIONS, beta=0.1, init_from="sft")
  c.ppo_adaptive.kl.update(adaptive=True, target=ADAPTIVE_TARGET, horizon=ADAPTIVE_HORIZON)
  c.ppo_gold_reward = ppo_stage(iterations=ITERATIONS, beta=0.05, init_from="sft")
  c.ppo_gold_reward.reward.gold = True
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "rm_helpful",
      "rm_safety",
      *BETAS,
      "ppo_adaptive",
      "ppo_gold_reward",
      "eval",
  )
  return c
