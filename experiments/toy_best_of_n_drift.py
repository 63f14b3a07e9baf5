"""Best-of-n over-optimisation (Gao et al. 2022) where it appears on the toy world: best of n =
1..16 samples of a policy that has moved away from where the reward models' labels are, picked by
each reward model and by their Llama 2 combination, scored by gold; WORKDIR/eval/best_of_n.png
draws gold and each reward's own score of its pick (the proxy) against sqrt(KL(best of n || policy)).

  python -m rlhf_jax.run --config=experiments/toy_best_of_n_drift.py --workdir=runs/quickstart

The policy is two rounds of rejection sampling against the quickstart's reward models (the same
512 prompts, best kept across rounds: `rs_frozen`, V2 of experiments/toy_rejection_sampling.py).
From the SFT model, best of n rises to n = 16 (experiments/toy_best_of_n.py); from V2, whose
samples carry the sign-offs that the reward models (trained on perturbation candidates) rank
above gold's view (x0.85), the proxy keeps rising with n while gold turns over after n = 2, with
unbiased annotators too (`--config.world.annotator_bias=0.0`). Measured: docs/toyworld.md, "Best
of n to 16, and biased annotators".
"""

from rlhf_jax.configs.toy import rejection_sampling_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.rs_frozen = rejection_sampling_stage(rounds=2)
  c.rs_frozen.init_from = "sft"
  c.eval.update(
      best_of_n=(1, 2, 4, 8, 16),
      best_of_n_prompts=512,
      reward_records=100,
      best_of_n_policy="rs_frozen",
  )
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "rs_frozen", "eval_rewards")
  return c
