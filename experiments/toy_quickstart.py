"""The main job (`make quickstart`): build the toy world, pretrain a small model on its text,
fine-tune it on demonstrations (SFT), and print the gold table for both plus sample conversations.

Stages cache their outputs in WORKDIR/<stage>: a rerun skips finished stages.
"""

import ml_collections

from rlhf_jax.configs import base_config


def get_config():
  c = ml_collections.ConfigDict()
  c.algorithm = "pipeline"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.stages = ("world", "pretrain", "sft", "eval")

  c.world = ml_collections.ConfigDict(dict(
      seed=0, pretrain_documents=20000, bad_habit_rate=0.3, sft_records=4000, sft_noise=0.15,
      eval_prompts=256, tokenizer_vocab_size=1024, preference_prompts=2000, annotator_noise=0.1,
      judge_comparisons=600, judge_eval_comparisons=200))

  model = dict(vocab_size=0, num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, mlp_dim=384,
               max_seq_len=256, family="llama")

  c.pretrain = base_config()
  c.pretrain.algorithm = "pretrain"
  c.pretrain.model.update(**model)
  c.pretrain.optim.update(lr=3e-3, warmup_steps=30, weight_decay=0.01)
  c.pretrain.train.update(steps=300, batch_size=32, seq_len=128, log_every=20, eval_every=150,
                          checkpoint_every=100)
  c.pretrain.data.update(packing=True)
  c.pretrain.sample.update(num_examples=0)

  c.sft = base_config()
  c.sft.algorithm = "sft"
  c.sft.model.update(**model)  # the architecture comes from the pretrain export; dtypes from here
  c.sft.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.01)
  c.sft.train.update(steps=150, batch_size=32, seq_len=128, log_every=10, eval_every=75,
                     checkpoint_every=100)
  c.sft.data.update(packing=True)
  c.sft.sample.update(num_examples=0)

  # The AI judge (add "judge" to c.stages): SFT from the SFT model on judge records.
  c.judge = base_config()
  c.judge.algorithm = "sft"
  c.judge.model.update(**model)
  c.judge.optim.update(lr=1e-3, warmup_steps=10, weight_decay=0.01)
  c.judge.train.update(steps=200, batch_size=32, seq_len=256, log_every=20, eval_every=100,
                       checkpoint_every=100)
  c.judge.data.update(packing=True)
  c.judge.sample.update(num_examples=0)

  c.eval = ml_collections.ConfigDict(dict(max_new_tokens=48, temperature=1.0, batch_size=64,
                                          num_samples_shown=8))
  return c
