"""DPO from the SFT model on the simulated annotators' rankings (helpfulness and safety in one
criterion), each ranking as its best-vs-rest pairs, then the gold evaluation: the offline
alternative to RLHF's reward models + PPO.

  python -m rlhf_jax.run --config=experiments/toy_dpo.py --workdir=runs/quickstart

Reuses the quickstart's world, pretrain and SFT stages. Variants by override, e.g.
`--config.dpo.loss_type=ipo`, `--config.dpo.sigmoid.label_smoothing=0.1` (cDPO),
`--config.dpo.sigmoid.beta=0.3`, `--config.dpo.reference=per_batch`.
"""

from rlhf_jax.configs.toy import dpo_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  # beta 0.3: the best of the DPO table in docs/results.md (0.570 combined at KL 0.23 to SFT).
  # `dpo_stage("pairs_helpful", kind="pairwise")`: helpfulness pairs only (unlearns refusals).
  c.dpo = dpo_stage(beta=0.3)
  c.stages = ("world", "pretrain", "sft", "dpo", "eval")
  return c
