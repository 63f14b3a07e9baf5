"""KTO from the SFT model on the simulated annotators' unpaired thumbs-up / thumbs-down labels of
single responses (combined helpfulness and safety), then the gold evaluation: preference learning
without pairs.

  python -m rlhf_jax.run --config=experiments/toy_kto.py --workdir=runs/quickstart

Reuses the quickstart's world, pretrain and SFT stages. Variants by override, e.g.
`--config.kto.beta=0.3`, `--config.kto.undesirable_weight=1.5`,
`--config.kto.reference=per_batch`, `--config.kto.optim.lr=1e-4`.
"""

from rlhf_jax.configs.toy import kto_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.kto = kto_stage()
  c.stages = ("world", "pretrain", "sft", "kto", "eval")
  return c
