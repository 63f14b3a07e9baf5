"""InstructGPT's reward model: rankings of K = 4..9 responses per prompt, every K-choose-2 pair of a
prompt in one batch element (each response scored once), loss averaged over the prompt's pairs.

  python -m rlhf_jax.run --config=experiments/toy_rm_instructgpt.py --workdir=runs/quickstart

With the quickstart's workdir the world, pretrain and SFT stages are reused. Prints Kendall tau of
the model's scores against the annotators' and the gold orderings on held-out rankings.
"""

from rlhf_jax.configs.toy import reward_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_ranking", "eval_rewards")
  # A ranking's responses together take up to ~820 tokens: rows of 1024 hold 2-3 prompts each.
  c.rm_ranking = reward_stage("rankings", kind="ranking", steps=150, seq_len=1024, batch_size=8)
  return c
