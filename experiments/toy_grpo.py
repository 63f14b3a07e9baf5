"""GRPO and RLOO from the SFT model against the Llama 2 combination of the helpfulness and safety
reward models: PPO's loop without a value model, 16 prompts x 4 samples per iteration, each
sample's advantage taken against its prompt's other samples (GRPO: normalised by the group's std,
KL to SFT in the loss; RLOO: leave-one-out mean, KL in the reward). Then the gold evaluation.

  python -m rlhf_jax.run --config=experiments/toy_grpo.py --workdir=runs/quickstart

Reuses the quickstart's world, pretrain, SFT and reward-model stages. Variants by override, e.g.
`--config.grpo.reward.gold=True` (the toy world's gold reward: an oracle),
`--config.grpo.scale_rewards=False` (Dr. GRPO), `--config.stages=...` without "rloo".
"""

from rlhf_jax.configs.toy import group_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.grpo = group_stage("grpo", init_from="sft")
  c.rloo = group_stage("rloo", beta=0.05, init_from="sft")
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "grpo", "rloo", "eval")
  return c
