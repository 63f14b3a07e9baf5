"""The main job (`make quickstart`): build the toy world, pretrain a small model on its text,
fine-tune it on demonstrations (SFT), train a helpfulness and a safety reward model from the SFT
model on simulated annotators' pairs (Llama 2 margin loss), and print the gold table for both
policies, sample conversations, and the reward models' held-out accuracy alone and combined.

Stages cache their outputs in WORKDIR/<stage>: a rerun skips finished stages.
"""

from rlhf_jax.toy_configs import toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "eval")
  return c
