"""Reward models that stay language models: the on-policy reward models of `toy_rm_on_policy.py`
trained with the GRM regulariser (Yang et al. 2024, `lm_coef` of a reward stage): beside the pairwise
loss, the trunk keeps predicting the chosen responses' tokens through the SFT model's LM head.

  python -m rlhf_jax.run --config=experiments/toy_rm_regularised.py --workdir=runs/quickstart

Why: the toy reward models order the SFT policy's samples by gold only where safety decides;
on facts, word lists and arithmetic they are near chance within a prompt, while the SFT model's
own log-probs order the same samples better (docs/toyworld.md, "The policy's own confidence knows more than
the reward models"). Pairwise training on a few thousand pairs is free to overwrite what the
trunk knew; the regulariser asks it to keep it. Stages (beside the on-policy pair):
  rm_helpful_lm, rm_safety_lm   the same data, steps and learning rate, lm_coef = `LM_COEF`
The reward evaluation then reports their within-prompt correlation with gold by task family and
best of n on the SFT policy's samples, to compare with the unregularised models' rows.
"""

from rlhf_jax.configs.toy import reward_stage, toy_pipeline_config

LM_COEF = 1.0


def get_config():
  c = toy_pipeline_config()
  c.rm_helpful_on_policy = reward_stage("feedback/pairs_helpful", steps=150)
  c.rm_safety_on_policy = reward_stage("feedback/pairs_safety", steps=100)
  c.rm_helpful_lm = reward_stage("feedback/pairs_helpful", steps=150)
  c.rm_safety_lm = reward_stage("feedback/pairs_safety", steps=100)
  for s in (c.rm_helpful_lm, c.rm_safety_lm):
    s.lm_coef = LM_COEF
  c.combine.update(helpful="rm_helpful_lm", safety="rm_safety_lm")
  c.eval.best_of_n_policy = "sft"
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "feedback",
      "rm_helpful_on_policy",
      "rm_safety_on_policy",
      "rm_helpful_lm",
      "rm_safety_lm",
      "eval_rewards",
  )
  return c
