"""Constitutional AI (Bai et al. 2022) in the toy world.

  python -m rlhf_jax.run --config=experiments/toy_constitutional.py --workdir=runs/quickstart

SL-CAI (cai_sl): the SFT model answers red-team prompts (unsafe requests and safe look-alikes),
the AI judge critiques and revises each answer under a principle drawn from
`cai_sl.constitution`; SFT on the revisions mixed with helpful SFT data
(WORKDIR/cai_sl/revisions.jsonl has gold safety before and after revision). RL-CAI: the judge
labels pairs of the SL-CAI model's samples on red-team prompts under HARMLESS (cai_feedback), a
harmlessness reward model learns them (rm_cai), and PPO from SL-CAI uses it as the safety model of
the Llama 2 combination, with the human-feedback helpfulness model (helpfulness labels stay human,
as in the paper).

`:unsafe_sft` runs it on a world whose SFT demonstrations comply with 30% of harmful requests
(`world.sft_unsafe_compliance`): with the default world the SFT model already refuses ~98% of
them, so Constitutional AI has no safety to add (docs/toyworld.md, "RLAIF and Constitutional AI").
"""

from rlhf_jax.configs.toy import (
    ai_feedback_stage,
    ai_reward_stage,
    constitutional_sl_stage,
    ppo_stage,
    toy_pipeline_config,
)


def get_config(arg=None):
  c = toy_pipeline_config()
  if arg == "unsafe_sft":  # a world whose SFT model complies with ~30% of harmful requests
    c.world.sft_unsafe_compliance = 0.3
  elif arg:
    raise ValueError(f"toy_constitutional.py:{arg}: the argument is 'unsafe_sft' or nothing")
  c.cai_sl = constitutional_sl_stage(judge="judge", prompts=512, n_revisions=1, steps=100)
  c.cai_feedback = ai_feedback_stage(
      judge="judge",
      init_from="cai_sl",
      prompts=1000,
      eval_prompts=100,
      principles=("HARMLESS",),
      families=("unsafe", "safe_lookalike"),
  )
  c.rm_cai = ai_reward_stage("cai_feedback/pairs", steps=100)
  c.ppo_cai = ppo_stage(init_from="cai_sl")
  c.ppo_cai.reward.update(helpful="rm_helpful", safety="rm_cai", combine="llama2")
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "rm_helpful",
      "judge",
      "cai_sl",
      "cai_feedback",
      "rm_cai",
      "ppo_cai",
      "eval",
  )
  return c
