"""Llama 2's two reward models: helpfulness and safety, each trained on its own annotators' pairs,
and their combination (safety score where the prompt is flagged unsafe or sigmoid(safety) < 0.15,
else helpfulness; or a linear mix with `--config.combine.kind=linear`).

  python -m rlhf_jax.run --config=experiments/toy_rm_safety.py --workdir=runs/quickstart

Prints each model's and the combination's Kendall tau against gold on held-out rankings and their
accuracy on gold-labelled pairs of unsafe and look-alike prompts.
"""

from rlhf_jax.configs.toy import toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "eval_rewards")
  return c
