"""Reward models on feedback about the SFT model's own samples (InstructGPT, Llama 2) beside the
quickstart's reward models on perturbation candidates, on the same prompts, annotators and budget.

  python -m rlhf_jax.run --config=experiments/toy_rm_on_policy.py --workdir=runs/quickstart

The "feedback" stage samples 4 responses per preference prompt from the SFT model and has the
world's annotators label them, topped up with perturbation candidates to 4-9 per prompt. The
reward tables then show both pairs of models; the best-of-n table says which one picks better
SFT samples by gold -- the samples PPO and rejection sampling will optimise over.
"""

from rlhf_jax.configs.toy import reward_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.rm_helpful_on_policy = reward_stage("feedback/pairs_helpful", steps=150)
  c.rm_safety_on_policy = reward_stage("feedback/pairs_safety", steps=100)
  c.combine.update(helpful="rm_helpful_on_policy", safety="rm_safety_on_policy")
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "rm_helpful",
      "rm_safety",
      "feedback",
      "rm_helpful_on_policy",
      "rm_safety_on_policy",
      "eval_rewards",
  )
  return c
