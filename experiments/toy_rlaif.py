"""RLAIF (Lee et al. 2023) in the toy world: the AI judge (trained from the SFT model on a limited
number of gold-labelled comparisons) labels pairs of the SFT model's samples; a reward model learns
the judge's soft labels; PPO from SFT against it; then the gold evaluation.

  python -m rlhf_jax.run --config=experiments/toy_rlaif.py --workdir=runs/quickstart
  python -m rlhf_jax.run --config=experiments/toy_rlaif.py:direct --workdir=runs/quickstart

Stages: judge -> ai_feedback (WORKDIR/ai_feedback/summary.json: judge-gold agreement on the pairs
it labelled) -> rm_ai -> ppo_rlaif -> eval. `:direct` adds direct RLAIF, ppo_rlaif_direct: PPO with
no reward model, the judge comparing each prompt's two samples (`ppo.reward.judge`).
"""

from rlhf_jax.configs.toy import ai_feedback_stage, ai_reward_stage, ppo_stage, toy_pipeline_config


def get_config(arg=None):
  c = toy_pipeline_config()
  c.ai_feedback = ai_feedback_stage(judge="judge", prompts=2000, eval_prompts=200)
  c.rm_ai = ai_reward_stage("ai_feedback/pairs", steps=150)
  c.ppo_rlaif = ppo_stage(init_from="sft")
  c.ppo_rlaif.update(value_init_from="rm_ai")
  c.ppo_rlaif.reward.update(helpful="rm_ai", safety="")
  stages = ["world", "pretrain", "sft", "judge", "ai_feedback", "rm_ai", "ppo_rlaif"]
  if arg == "direct":
    c.ppo_rlaif_direct = ppo_stage(init_from="sft", beta=0.03)  # its reward in [0, 1], unwhitened
    c.ppo_rlaif_direct.update(
        samples_per_prompt=2, prompts_per_iteration=16, reward_baseline="none", value_init_from=""
    )
    c.ppo_rlaif_direct.reward.update(helpful="", safety="", judge="judge")
    stages.append("ppo_rlaif_direct")
  c.stages = (*stages, "eval")
  return c
