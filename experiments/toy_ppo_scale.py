"""PPO and GRPO at batch sizes an accelerator makes cheap: 512 prompts per iteration instead of 32.

  python -m rlhf_jax.run --config=experiments/toy_ppo_scale.py --workdir=runs/quickstart

Every stage starts from the quickstart's SFT model. On the 2-core CPU an iteration of 512 prompts
takes minutes; on one GPU about a second (docs/toyworld.md, "PPO at scale, on a GPU"). The question each stage answers:
  ppo_gold_512    PPO on the gold reward (an oracle reward model): does a large batch find the
                  sharpening (SFT at T = 0.7 beats SFT at T = 1 by +0.07 gold) that 32 prompts
                  per iteration did not?
  ppo_rm_512_b0p3 the same PPO on the Llama 2 combination of the two reward models, beta 0.3
  ppo_rm_512_b0p1 ... beta 0.1
  grpo_gold_128x8 GRPO on the gold reward, 128 prompts x 8 samples (the group baseline)
  ppo_op_512_b0p3 PPO on reward models trained on feedback about the SFT model's own samples
  ppo_op_512_b0p1 (the "feedback" stage: 4 samples per prompt on 4,000 prompts, annotated by the
                  world's annotators; Llama 2 / InstructGPT collect preferences this way), beta
                  0.3 and 0.1; the value model starts from the on-policy helpfulness RM
Held-out gold and KL are logged every 10 iterations (`eval/*` rows of each stage's metrics.jsonl,
the same 256 tasks and key at every evaluation, iteration 0 = the SFT model).
"""

from rlhf_jax.configs.toy import group_stage, ppo_stage, reward_stage, toy_pipeline_config

ITERATIONS = 30
PROMPTS = 512


def big_ppo(*, beta: float, gold: bool = False, lr: float = 5e-5, on_policy_rms: bool = False):
  s = ppo_stage(iterations=ITERATIONS, beta=beta, lr=lr, init_from="sft")
  # Mini-batches of 128 rows, 2 epochs: 8 updates per iteration.
  s.update(prompts_per_iteration=PROMPTS, epochs=2, minibatches=4, eval_every=10)
  s.reward.gold = gold
  if on_policy_rms:
    s.reward.update(helpful="rm_helpful_on_policy", safety="rm_safety_on_policy")
    s.value_init_from = "rm_helpful_on_policy"
  return s


def get_config():
  c = toy_pipeline_config()
  c.ppo_gold_512 = big_ppo(beta=0.05, gold=True)
  c.ppo_rm_512_b0p3 = big_ppo(beta=0.3, gold=False)
  c.ppo_rm_512_b0p1 = big_ppo(beta=0.1, gold=False)
  c.grpo_gold_128x8 = group_stage(
      "grpo", iterations=ITERATIONS, prompts=128, samples=8, init_from="sft"
  )
  c.grpo_gold_128x8.update(minibatches=4, eval_every=10)
  c.grpo_gold_128x8.reward.gold = True
  c.rm_helpful_on_policy = reward_stage("feedback/pairs_helpful", steps=300)
  c.rm_safety_on_policy = reward_stage("feedback/pairs_safety", steps=200)
  c.ppo_op_512_b0p3 = big_ppo(beta=0.3, on_policy_rms=True)
  c.ppo_op_512_b0p1 = big_ppo(beta=0.1, on_policy_rms=True)
  c.stages = (
      "world",
      "pretrain",
      "sft",
      "rm_helpful",
      "rm_safety",
      "feedback",
      "rm_helpful_on_policy",
      "rm_safety_on_policy",
      "ppo_gold_512",
      "ppo_rm_512_b0p3",
      "ppo_rm_512_b0p1",
      "grpo_gold_128x8",
      "ppo_op_512_b0p3",
      "ppo_op_512_b0p1",
      "eval",
  )
  return c
