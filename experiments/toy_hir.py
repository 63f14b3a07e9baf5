"""HIR (hindsight instruction relabeling) from the SFT model, then the gold evaluation: each round
samples the policy on fresh training prompts, rewrites every constrained prompt to the constraints
its response actually met (the toy world's checker is the feedback; no reward model, no RL), keeps
the samples that follow their (new) instruction by gold, and trains on them with SFT + a
contrastive term over instructions + an entropy bonus.

  python -m rlhf_jax.run --config=experiments/toy_hir.py --workdir=runs/quickstart

Reuses the quickstart's world, pretrain and SFT stages. WORKDIR/hir/rounds.json has, per round,
the fraction of samples that already followed their original instruction and the relabeled count;
WORKDIR/hir/round_<r>/relabeled.jsonl the training pairs with their negatives. Variants by
override, e.g. `--config.hir.contrastive_coef=0` (relabeled SFT only),
`--config.hir.negatives=0`.
"""

from rlhf_jax.configs.toy import hir_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.hir = hir_stage()
  c.stages = ("world", "pretrain", "sft", "hir", "eval")
  return c
