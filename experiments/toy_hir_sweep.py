"""HIR's training budget chosen on the validation prompts, then reported on the test prompts: the
earlier default (2 rounds x 24 steps at lr 1e-4) and longer schedules; the last is now
`hir_stage`'s default (toy_compare.py's "hir"). The behaviour
world's conditional axis is the prompt's "(brief)" / "(detailed)" tag, which the demonstrations
ignore (the SFT model follows it half the time) and HIR relabels to the tag each sample followed;
`follows_tag` in the gold table is the share of tagged prompts whose tag the response follows.

  python -m rlhf_jax.run --config=experiments/toy_hir_sweep.py --workdir=runs/compare \
      --config.eval.split=valid
"""

from rlhf_jax.configs.toy import hir_stage, toy_pipeline_config

# name -> (rounds, steps per round, lr)
VARIANTS = {"hir_r2_s24": (2, 24, 1e-4), "hir_r3_s64": (3, 64, 1e-4), "hir": (3, 64, 3e-4)}


def get_config():
  c = toy_pipeline_config()
  for name, (rounds, steps, lr) in VARIANTS.items():
    c[name] = hir_stage(rounds=rounds, steps=steps, lr=lr)
  c.eval.rewards = False
  c.stages = ("world", "pretrain", "sft", *VARIANTS, "eval")
  return c
