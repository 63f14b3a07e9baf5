"""DPO-family hyper-parameters chosen on the validation prompts, then reported on the test prompts.

  # 1. train every variant and score it on the validation prompts (choose here)
  python -m rlhf_jax.run --config=experiments/toy_dpo_sweep.py --workdir=runs/compare \
      --config.eval.split=valid
  # 2. the chosen variants on the test prompts (the default split)
  python -m rlhf_jax.run --config=experiments/toy_dpo_sweep.py --workdir=runs/compare \
      --config.stages='("world","pretrain","sft","feedback","dpo_on_b0p1","eval")'

"feedback" samples 4 responses per preference prompt from the SFT model and has the world's
annotators rank them (topped up with perturbation candidates to 4-9 per prompt): DPO then trains
on pairs of the SFT model's own samples, as the DPO paper's and Llama 2's preference data are,
instead of the world stage's rankings of perturbation candidates ("dpo_perturbations"). Each
ranking becomes its best-vs-rest pairs. All variants: 8 packed rows a step, lr 5e-5, from SFT,
the reference's log-probs per batch.

What it chose (toy_compare.py's "dpo" and "cdpo": beta 0.3, 300 steps; "kto": beta 0.3) and the
validation figures behind the choice: docs/toyworld.md, "DPO family on policy samples".
"""

from rlhf_jax.configs.toy import dpo_stage, kto_stage, toy_pipeline_config

SOURCE = "feedback/rankings"
# name -> (loss_type, beta, label_smoothing, steps)
VARIANTS = {
    "dpo_on_b0p03": ("sigmoid", 0.03, 0.0, 150),
    "dpo_on_b0p1": ("sigmoid", 0.1, 0.0, 150),
    "dpo_on_b0p3": ("sigmoid", 0.3, 0.0, 150),
    "dpo_on_b0p1_s300": ("sigmoid", 0.1, 0.0, 300),  # twice the pairs
    "dpo_on_b0p3_s300": ("sigmoid", 0.3, 0.0, 300),
    "cdpo_on_b0p1": ("sigmoid", 0.1, 0.1, 150),  # cDPO: 10% of the labels assumed flipped
    "ipo_on_t0p1": ("ipo", 0.1, 0.0, 150),  # IPO's tau
}
# Methods that diverged or barely moved on the world's perturbation rankings (toy_compare.py), on
# the SFT model's own samples: KTO on the annotators' thumbs up / down of them, SimPO at 10x
# toy_compare's lr, CPL and ORPO at their toy_compare settings.
OTHERS = ("kto_on", "kto_on_lr1em5", "kto_on_beta0p3", "simpo_on", "cpl_on", "orpo_on")


def get_config():
  c = toy_pipeline_config()
  for name, (loss_type, beta, smoothing, steps) in VARIANTS.items():
    smoothing = {"label_smoothing": smoothing} if loss_type == "sigmoid" else {}
    c[name] = dpo_stage(SOURCE, loss_type=loss_type, steps=steps, beta=beta, **smoothing)
    c[name].reference = "per_batch"
  # The off-policy reference: DPO on the world's rankings of perturbation candidates (toy_compare's
  # "dpo" before this sweep chose on-policy pairs at beta 0.1).
  c.dpo_perturbations = dpo_stage(beta=0.3)
  c.dpo_perturbations.reference = "per_batch"
  c.kto_on = kto_stage("feedback/kto")
  # KTO diverged at lr 5e-5 on the SFT model's samples (toy_compare.py: KL 8.2, -0.079): a smaller
  # step, or a larger beta (a tighter hold on the reference).
  c.kto_on_lr1em5 = kto_stage("feedback/kto", lr=1e-5)
  c.kto_on_beta0p3 = kto_stage("feedback/kto", beta=0.3)
  for name in ("kto_on", "kto_on_lr1em5", "kto_on_beta0p3"):
    c[name].reference = "per_batch"
  c.simpo_on = dpo_stage(SOURCE, loss_type="simpo", lr=5e-5)
  c.cpl_on = dpo_stage(SOURCE, loss_type="cpl", alpha=0.3)
  c.cpl_on.reference = "per_batch"
  c.orpo_on = dpo_stage(SOURCE, loss_type="orpo")
  c.eval.rewards = False  # the gold table only
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "dpo_perturbations",
      "feedback",
      *VARIANTS,
      *OTHERS,
      "eval",
  )
  return c
