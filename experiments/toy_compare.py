"""Every alignment method from the same SFT model, scored by the toy world's gold reward on the same
test prompts (1,024 x 4 samples, paired differences to SFT): the comparison that
`notebooks/compare_alignment_methods.ipynb` tabulates. Tune a method on the validation prompts
first (`--config.eval.split=valid`), then report it on the test prompts (the default).

  python -m rlhf_jax.run --config=experiments/toy_compare.py --workdir=runs/compare
  python -m rlhf_jax.run --config=experiments/toy_compare.py:core --workdir=runs/compare

Stages already trained in the workdir are reused (each method's stage has the name and the config of
its own experiment, `experiments/toy_<method>.py`), so one method can be (re)run at a time with
`--config.stages=...`. `:core` leaves out the AI-feedback methods (judge, RLAIF, Constitutional AI).

Budgets (matched within each family; all start from `sft`, all the same seed):

| family | methods | budget |
| --- | --- | --- |
| online RL against the two reward models (Llama 2 combination) | ppo, grpo, rloo | 3,840 policy samples each (PPO 120 x 32; GRPO / RLOO 60 x 16 prompts x 4), KL penalty to SFT |
| best-of-K, then SFT | rejection_sampling, rest | 4,096 policy samples each (2 rounds / Grow steps x 256 fresh prompts x 8) |
| offline, human labels | dpo, cdpo, ipo, cpl, kto, simpo, orpo | the annotators' rankings of 4 SFT samples on each of 4,000 prompts (the `feedback` stage; KTO: their thumbs up / down of the same samples), 150 steps of 8 packed rows (DPO and cDPO: 300, chosen on the validation prompts) |
| no reward model, no labels | hir | 3,072 policy samples (3 rounds x 256 prompts x 4) relabeled by the world's checker and kept by gold >= 0.8 (oracle feedback), 3 x 64 steps |
| AI feedback (not in `:core`) | ppo_rlaif, ppo_rlaif_direct, cai_sl, ppo_cai | the judge (2,000 gold-labelled comparisons, read as expected 0-9 grades); 2,000 AI-labelled pairs (RLAIF), 512 revisions and 1,000 harmlessness pairs (CAI); PPO 3,840 samples as `ppo` |

RL-CAI (`ppo_cai`) starts from SL-CAI (`cai_sl`), so its KL and win rate are against SL-CAI.

The reward models (`rm_helpful`, `rm_safety`) are trained once and shared.
"""

from rlhf_jax.configs.toy import (
    ai_feedback_stage,
    ai_reward_stage,
    constitutional_sl_stage,
    dpo_stage,
    group_stage,
    hir_stage,
    kto_stage,
    ppo_stage,
    rejection_sampling_stage,
    rest_stage,
    toy_pipeline_config,
)

CORE = (
    "ppo",
    "grpo",
    "rloo",
    "rejection_sampling",
    "rest",
    "feedback",
    "dpo",
    "cdpo",
    "ipo",
    "cpl",
    "kto",
    "simpo",
    "orpo",
    "hir",
)
FEEDBACK = "feedback/rankings"  # the annotators' rankings of 4 SFT samples per preference prompt
AI_FEEDBACK = (
    "judge",
    "ai_feedback",
    "rm_ai",
    "ppo_rlaif",
    "ppo_rlaif_direct",
    "cai_sl",
    "cai_feedback",
    "rm_cai",
    "ppo_cai",
)


def get_config(arg=None):
  c = toy_pipeline_config()
  c.ppo = ppo_stage(iterations=120, init_from="sft")
  c.grpo = group_stage("grpo", init_from="sft")
  c.rloo = group_stage("rloo", beta=0.05, init_from="sft")
  c.rejection_sampling = rejection_sampling_stage(rounds=2, prompts=256)
  c.rejection_sampling.init_from = "sft"
  c.rejection_sampling.fresh_prompts = True
  c.rest = rest_stage(init_from="sft")
  # The DPO family trains on the annotators' rankings of the SFT model's own samples ("feedback":
  # 4 per prompt, best-vs-rest pairs; KTO on their thumbs up / down of the same samples), as the
  # DPO paper's and Llama 2's preference data are, at the settings chosen on the validation prompts
  # (experiments/toy_dpo_sweep.py). The reference's log-probs per batch: 150 steps see a fraction
  # of the pairs, so precomputing them over the whole set would cost more than it saves.
  # DPO and cDPO: beta 0.3 and 300 steps, chosen on the validation prompts among beta 0.1 / 0.3 x
  # 150 / 300 steps (experiments/toy_dpo_sweep.py; docs/toyworld.md, "DPO family on policy samples").
  c.dpo = dpo_stage(FEEDBACK, beta=0.3, steps=300)
  # cDPO: 10% of the labels assumed flipped.
  c.cdpo = dpo_stage(FEEDBACK, beta=0.3, label_smoothing=0.1, steps=300)
  c.ipo = dpo_stage(FEEDBACK, loss_type="ipo", beta=0.1)  # IPO's tau
  c.cpl = dpo_stage(FEEDBACK, loss_type="cpl", alpha=0.3)
  # KTO: beta 0.3, chosen on the validation prompts (at beta 0.1 it diverged; at lr 1e-5 it barely
  # moved).
  c.kto = kto_stage("feedback/kto", beta=0.3)
  c.simpo = dpo_stage(FEEDBACK, loss_type="simpo", lr=5e-5)  # 10x DPO's lr: at 5e-6 it barely moved
  c.orpo = dpo_stage(FEEDBACK, loss_type="orpo")
  for name in ("dpo", "cdpo", "ipo", "cpl"):
    c[name].reference = "per_batch"
  c.kto.reference = "per_batch"
  c.hir = hir_stage()
  c.judge.init_from = "sft"  # not the latest policy stage before it
  c.ai_feedback = ai_feedback_stage(judge="judge", prompts=2000, eval_prompts=200, init_from="sft")
  c.rm_ai = ai_reward_stage("ai_feedback/pairs", steps=150)
  c.rm_ai.init_from = "sft"
  c.ppo_rlaif = ppo_stage(iterations=120, init_from="sft")
  c.ppo_rlaif.update(value_init_from="rm_ai")
  c.ppo_rlaif.reward.update(helpful="rm_ai", safety="")
  # Direct RLAIF: no reward model, the judge compares each prompt's two samples (as many samples).
  # Its reward, P(beating the sibling), lies in [0, 1] and is not whitened as the reward models'
  # scores are, so PPO's beta 0.3 held it at SFT: beta 0.03 chosen on the validation prompts among
  # 0.3 / 0.1 / 0.03 (docs/toyworld.md, "RLAIF and Constitutional AI").
  c.ppo_rlaif_direct = ppo_stage(iterations=60, init_from="sft", beta=0.03)
  c.ppo_rlaif_direct.update(samples_per_prompt=2, value_init_from="")
  c.ppo_rlaif_direct.reward.update(helpful="", safety="", judge="judge")
  c.cai_sl = constitutional_sl_stage(judge="judge", init_from="sft")
  # RL-CAI: the judge's harmlessness labels on SL-CAI's samples of red-team prompts -> a safety
  # reward model beside the human-data helpfulness one -> PPO from SL-CAI.
  c.cai_feedback = ai_feedback_stage(
      judge="judge",
      init_from="cai_sl",
      prompts=1000,
      eval_prompts=100,
      principles=("HARMLESS",),
      families=("unsafe", "safe_lookalike"),
  )
  c.rm_cai = ai_reward_stage("cai_feedback/pairs", steps=100)
  c.rm_cai.init_from = "cai_sl"
  c.ppo_cai = ppo_stage(iterations=120, init_from="cai_sl")
  c.ppo_cai.reward.update(helpful="rm_helpful", safety="rm_cai", combine="llama2")
  c.eval.rewards = False  # the reward models' own reports: experiments/toy_quickstart.py has them
  methods = CORE if arg == "core" else (*CORE, *AI_FEEDBACK)
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", *methods, "eval")
  return c
