"""Llama 2's margin loss against the plain Bradley-Terry loss on the same helpfulness pairs: the
margin m(level) asks for a larger score gap on pairs the annotator called clearly better.

  python -m rlhf_jax.run --config=experiments/toy_rm_llama2_margin.py --workdir=runs/quickstart

Trains three reward models from the same SFT model on the same data and steps (margins none,
"small" = {0, 1/3, 2/3, 1}, "large" = {0, 1, 2, 3}) and prints held-out accuracy by margin level.
"""

from rlhf_jax.configs.toy import reward_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_plain", "rm_helpful", "rm_large", "eval_rewards")
  c.rm_plain = reward_stage("pairs_helpful", margins="none")
  c.rm_helpful.margins = "small"  # the quickstart's helpfulness RM
  c.rm_large = reward_stage("pairs_helpful", margins="large")
  return c
