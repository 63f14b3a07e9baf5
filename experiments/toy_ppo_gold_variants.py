"""How much PPO itself can do: PPO from the SFT model against the toy world's gold reward (an
oracle reward model), at the batch sizes, learning rates and baselines of docs/toyworld.md's table.

  python -m rlhf_jax.run --config=experiments/toy_ppo_gold_variants.py --workdir=runs/quickstart

Every variant branches off SFT and evaluates held-out gold and KL every 5 or 10 iterations on the
same tasks and sampling key (`eval/*` rows); the eval stage adds the temperature baseline (the
SFT model sampled at T < 1) to WORKDIR/eval/ppo_gold_vs_kl.png.
"""

from rlhf_jax.configs.toy import ppo_stage, toy_pipeline_config

# name: (iterations, lr, prompts per iteration, samples per prompt, epochs)
VARIANTS = {
    "ppo_gold_32x1": (60, 2e-5, 32, 1, 4),
    "ppo_gold_8x4_rloo": (60, 2e-5, 8, 4, 4),
    "ppo_gold_128x1": (30, 2e-5, 128, 1, 2),
    "ppo_gold_128x1_lr1e4": (30, 1e-4, 128, 1, 2),
    "ppo_gold_32x4_rloo_lr1e4": (30, 1e-4, 32, 4, 2),
}


def get_config():
  c = toy_pipeline_config()
  for name, (iterations, lr, prompts, samples, epochs) in VARIANTS.items():
    s = ppo_stage(beta=0.05, lr=lr, iterations=iterations, init_from="sft")
    s.reward.gold = True
    s.update(
        prompts_per_iteration=prompts,
        samples_per_prompt=samples,
        epochs=epochs,
        minibatches=4,
        reward_baseline="rloo" if samples > 1 else "none",
        eval_every=10 if iterations == 60 else 5,
    )
    c[name] = s
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", *VARIANTS, "eval")
  return c
