"""Reward models on a larger trunk than the policy: can a reward model that judges content make PPO
raise gold helpfulness?

  python -m rlhf_jax.run --config=experiments/toy_big_rm.py --workdir=runs/bigtrunk

Why: the toy policy (4 layers, width 128) rarely gets arithmetic right, and reward models started
from it order one prompt's samples by gold only where safety decides, not on arithmetic or word
lists (docs/toyworld.md, "PPO and rejection sampling (earlier world)"). A reward model cannot judge what its trunk cannot compute, so this
experiment pretrains a second trunk from scratch (6 layers, width 192: about 3x the policy's
parameters, the InstructGPT / Llama 2 practice of a reward model at least as large as the policy),
fine-tunes it on the SFT data, and trains the two reward models from it:
  pretrain_big, sft_big   the larger trunk (init_from="scratch": new weights of its own `model`)
  rm_helpful_big          helpfulness RM on annotated samples of the *small* SFT policy (the
                          "feedback" stage: on-policy pairs, which taught the small RM most about
                          facts), from sft_big
  rm_safety_big           safety RM on the world's safety pairs, from sft_big
  ppo_big_rm              (not in `stages` by default: add it, e.g. on a GPU) PPO on the small
                          SFT policy against the Llama 2 combination of the big reward models
                          (value model: the big helpfulness RM)
The reward evaluation's best of n uses the small SFT policy's samples (`eval.best_of_n_policy`), so
its table compares the small and the big reward models on the samples PPO will see.

What it found: docs/toyworld.md, "Why the reward models cannot lead PPO to the gold".
"""

from rlhf_jax.configs.toy import ppo_stage, reward_stage, stage, toy_pipeline_config

BIG = dict(num_layers=6, embed_dim=192, num_heads=6, num_kv_heads=3, mlp_dim=576)


def get_config():
  c = toy_pipeline_config()
  c.pretrain_big = stage("pretrain", lr=2e-3, warmup=30, steps=400, seq_len=128, log_every=20)
  c.pretrain_big.model.update(**BIG)
  c.pretrain_big.init_from = "scratch"
  c.pretrain_big.data.source = "pretrain"
  c.sft_big = stage("sft", lr=7e-4, warmup=10, steps=150, seq_len=128, log_every=10)
  c.sft_big.init_from = "pretrain_big"
  c.sft_big.data.source = "sft"
  c.rm_helpful_big = reward_stage("feedback/pairs_helpful", steps=200)
  c.rm_helpful_big.init_from = "sft_big"
  c.rm_safety_big = reward_stage("pairs_safety", steps=100)
  c.rm_safety_big.init_from = "sft_big"
  c.combine.update(helpful="rm_helpful_big", safety="rm_safety_big")
  c.ppo_big_rm = ppo_stage(iterations=60, beta=0.3, init_from="sft")
  c.ppo_big_rm.reward.update(helpful="rm_helpful_big", safety="rm_safety_big")
  c.ppo_big_rm.value_init_from = "rm_helpful_big"
  c.eval.best_of_n_policy = "sft"
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "feedback",
      "pretrain_big",
      "sft_big",
      "rm_helpful_big",
      "rm_safety_big",
      "eval_rewards",
  )
  return c
