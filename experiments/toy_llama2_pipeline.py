"""Llama 2's RLHF schedule on the toy world: rejection-sampling rounds V1..V3, each against reward
models retrained on the annotators' labels of the latest policy's own samples, then PPO from V3.

  python -m rlhf_jax.run --config=experiments/toy_llama2_pipeline.py --workdir=runs/llama2

Round r (Llama 2, section 3.2.3 and 3.4): the policy V(r-1) (V0 = SFT) is sampled and its samples
labelled by the world's annotators (`feedback_v<r-1>`, 2,000 prompts x 4 samples, topped up with
perturbation candidates); a new helpfulness reward model is trained on those labels
(`rm_helpful_v<r>`, which starts from V(r-1), as Llama 2 initialises its reward models from the
latest chat model; round 1 uses the quickstart's `rm_helpful`); best of K = 8 under the Llama 2
combination of it and the safety model, on 512 prompts no earlier round saw, is fine-tuned into V(r)
(40 SFT steps from V(r-1)). PPO then starts from V3 against a reward model trained on V3's
samples. The safety model is trained once: the SFT model already refuses ~97% of unsafe requests.

Why the reward models are retrained: with the first round's models throughout
(`experiments/toy_rejection_sampling.py`, 3 rounds), the third round's best of 8 scored *lower*
gold than a random sample of V2: the models, trained on perturbation candidates, liked a sign-off
that gold penalises, and V2's samples sat where the models had seen no labels (docs/toyworld.md,
"Rejection sampling rounds and PPO after them"). Labels of the latest policy's samples are what
Llama 2 collected each week for exactly this reason.

The gold table shows SFT, V1 (against SFT), V2 (against V1), V3 (against V2) and PPO (against V3).
"""

from rlhf_jax.configs.toy import (
    ppo_stage,
    rejection_sampling_stage,
    reward_stage,
    toy_pipeline_config,
)

ROUNDS = 3
PROMPTS = 512  # per round, each round after the prompts of the rounds before it


def get_config():
  c = toy_pipeline_config()
  stages = ["world", "pretrain", "sft", "rm_helpful", "rm_safety"]
  policy, rm = "sft", "rm_helpful"
  for r in range(1, ROUNDS + 2):
    if r > 1:  # labels of the latest policy's samples -> a new helpfulness reward model
      feedback, rm = f"feedback_v{r - 1}", f"rm_helpful_v{r}"
      c[feedback] = c.feedback.copy_and_resolve_references()
      c[feedback].update(init_from=policy, prompts=2000)
      c[rm] = reward_stage(f"{feedback}/pairs_helpful", steps=c.rm_helpful.train.steps)
      c[rm].optim.lr = c.rm_helpful.optim.lr
      stages += [feedback, rm]
    if r > ROUNDS:
      break
    name = f"rs_v{r}"
    c[name] = rejection_sampling_stage(rounds=1, prompts=PROMPTS)
    c[name].init_from = policy
    c[name].update(prompt_offset=(r - 1) * PROMPTS)
    c[name].reward.helpful = rm
    stages.append(name)
    policy = name
  c.ppo_after_rs = ppo_stage(init_from=policy)
  c.ppo_after_rs.reward.helpful = rm
  c.ppo_after_rs.value_init_from = rm
  c.stages = (*stages, "ppo_after_rs", "eval")
  return c
