"""The main job (`make quickstart`): build the toy world, pretrain a small model on its text,
fine-tune it on demonstrations (SFT), train a helpfulness and a safety reward model from the SFT
model on simulated annotators' pairs (Llama 2 margin loss), and print the gold table for both
policies, sample conversations, and the reward models' held-out accuracy alone and combined.

Stages cache their outputs in WORKDIR/<stage>: a rerun skips finished stages.
"""

import ml_collections

from rlhf_jax.configs import base_config


def get_config():
  c = ml_collections.ConfigDict()
  c.algorithm = "pipeline"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "eval")

  c.world = ml_collections.ConfigDict(dict(
      seed=0, pretrain_documents=20000, bad_habit_rate=0.3, sft_records=4000, sft_noise=0.15,
      eval_prompts=256, tokenizer_vocab_size=1024, preference_prompts=4000,
      preference_eval_prompts=400, annotator_noise=0.1, judge_comparisons=600,
      judge_eval_comparisons=200))

  model = dict(vocab_size=0, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, mlp_dim=384,
               max_seq_len=256, family="llama")

  def stage(algorithm, *, lr, warmup, steps, seq_len, log_every):
    # Later stages take the architecture from the previous export; dtypes etc. come from `model`.
    s = base_config()
    s.algorithm = algorithm
    s.model.update(**model)
    s.optim.update(lr=lr, warmup_steps=warmup, weight_decay=0.01)
    s.train.update(steps=steps, batch_size=32, seq_len=seq_len, log_every=log_every,
                   eval_every=steps // 2, checkpoint_every=100)
    s.data.update(packing=True)
    s.sample.update(num_examples=0)
    return s

  c.pretrain = stage("pretrain", lr=3e-3, warmup=30, steps=300, seq_len=128, log_every=20)
  c.sft = stage("sft", lr=1e-3, warmup=10, steps=150, seq_len=128, log_every=10)
  # The AI judge (add "judge" to c.stages): SFT from the SFT model on judge records.
  c.judge = stage("sft", lr=1e-3, warmup=10, steps=200, seq_len=256, log_every=20)

  # Reward models branch from the SFT model (ALGORITHMS.md). Rows of 256 tokens packed with whole
  # pairs; the small centring term pins the scores' offset, which the Llama 2 combination reads
  # (its safety threshold is an absolute score).
  def reward_model(source, *, steps, margins="small"):
    s = stage("reward", lr=1e-4, warmup=10, steps=steps, seq_len=256, log_every=10)
    s.data.update(kind="pairwise", source=source, eval_source=f"{source}_eval")
    s.train.update(batch_size=16)
    s.reward.update(margins=margins, center_coef=0.01)
    return s

  c.rm_helpful = reward_model("pairs_helpful", steps=150)
  c.rm_safety = reward_model("pairs_safety", steps=100)
  c.combine = ml_collections.ConfigDict(dict(helpful="rm_helpful", safety="rm_safety", kind="llama2",
                                             safety_threshold=0.15, helpful_weight=1.0,
                                             safety_weight=1.0))

  c.eval = ml_collections.ConfigDict(dict(max_new_tokens=48, temperature=1.0, batch_size=64,
                                          num_samples_shown=8))
  return c
