"""The main job (`make quickstart`): build the behaviour world (docs/toyworld.md), pretrain a
small model on its text, fine-tune it on demonstrations (SFT), train a helpfulness and a safety
reward model from the SFT model on simulated annotators' pairs (Llama 2 margin loss), run PPO from
the SFT model against their Llama 2 combination, then print the reward models' held-out accuracy
alone and combined (and the gold of their best-of-n picks), the gold table of SFT and PPO (4
samples of each of 1,024 held-out prompts, standard errors, PPO's paired difference to SFT), the
SFT model's temperature curve, the gates (WORKDIR/eval/gates.json), sample conversations, and the
proxy/gold-vs-KL plot (WORKDIR/eval/ppo_gold_vs_kl.png). About 8 minutes on a 2-core CPU (docs/results.md, "Quickstart").

Stages cache their outputs in WORKDIR/<stage>: a rerun skips finished stages.
"""

from rlhf_jax.configs.toy import ppo_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "ppo", "eval")
  # 30 iterations fit the 10-minute budget; 40 gain little (docs/toyworld.md, "Measured").
  c.ppo = ppo_stage(iterations=30)
  c.eval.skip = ("pretrain",)  # the gold table compares SFT with PPO; pretraining is the means
  # The reward report's best of n = 1, 2, 4 SFT samples of 512 test prompts (the oracle gate reads
  # n = 4; experiments/toy_best_of_n.py goes to n = 16), the temperature curve on the first 512
  # test prompts (its paired differences have SE ~0.003): the 10-minute budget.
  c.eval.update(best_of_n=(1, 2, 4), best_of_n_prompts=512, temperature_prompts=512)
  c.eval.reward_records = 100  # held-out rankings / safety-critical pairs in the reward report
  return c
