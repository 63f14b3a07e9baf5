"""GRPO and RLOO from the SFT model against the Llama 2 combination of the helpfulness and safety
reward models: PPO's loop without a value model, 16 prompts x 4 samples per iteration, each
sample's advantage taken against its prompt's other samples (GRPO: normalised by the group's std,
KL to SFT in the loss; RLOO: leave-one-out mean, KL in the reward). Then the gold evaluation.

  python -m rlhf_jax.run --config=experiments/toy_grpo.py --workdir=runs/quickstart

  python -m rlhf_jax.run --config=experiments/toy_grpo.py:variants --workdir=runs/quickstart

Reuses the quickstart's world, pretrain, SFT and reward-model stages. `:variants` adds the GRPO
family's variants as stages of their own (`configs.toy.GROUP_VARIANTS`): dapo (clip-higher,
token-level loss, overlong penalty), dr_grpo (no std scaling, token sums over the budget) and gspo
(sequence-level importance ratio). Other variants by override, e.g. `--config.grpo.reward.gold=True`
(the toy world's gold reward: an oracle), `--config.grpo.loss_aggregation=seq-mean-token-mean`
(GRPO's original per-sample mean), `--config.stages=...` without "rloo".
"""

from rlhf_jax.configs.toy import GROUP_VARIANTS, group_stage, toy_pipeline_config


def get_config(arg=None):
  c = toy_pipeline_config()
  c.grpo = group_stage("grpo", init_from="sft")
  c.rloo = group_stage("rloo", beta=0.05, init_from="sft")
  methods = ["grpo", "rloo"]
  if arg == "variants":
    for name in GROUP_VARIANTS:
      if name != "grpo":
        c[name] = group_stage("grpo", init_from="sft", variant=name)
        methods.append(name)
  elif arg:
    raise ValueError(f"toy_grpo.py:{arg}: the argument is 'variants' or nothing")
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", *methods, "eval")
  return c
