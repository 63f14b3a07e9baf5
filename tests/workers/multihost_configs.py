"""Configs shared by the multi-host test and its worker processes (tests/workers/multihost_run.py)."""

from rlhf_jax.configs.base import base_config

STEPS = 8


def sft_config():
  c = base_config()
  c.model.update(
      vocab_size=0,
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      max_seq_len=64,
  )
  c.mesh.shape = (2, 2, 2)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.train.update(
      steps=STEPS,
      batch_size=16,
      seq_len=64,
      log_every=2,
      eval_every=STEPS,
      eval_batches=1,
      checkpoint_every=STEPS // 2,
      async_checkpoint=True,
  )
  c.data.update(source="toy", toy_num_records=200, tokenizer_vocab_size=384, packing=True)
  c.sample.update(num_examples=0)
  return c


def dpo_config(tokenizer_dir: str, source: str, init_from: str):
  c = base_config()
  c.algorithm = "dpo"
  c.init_from = init_from
  c.model.vocab_size = 0
  c.mesh.shape = (2, 2, 2)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.train.update(
      steps=STEPS,
      batch_size=8,
      seq_len=128,
      log_every=2,
      eval_every=STEPS,
      eval_batches=1,
      checkpoint_every=STEPS // 2,
      async_checkpoint=True,
  )
  c.data.update(
      kind="pairwise",
      source=source,
      tokenizer=tokenizer_dir,
      eval_fraction=0.25,
      packing=True,
      prompt_overflow="skip",
  )
  c.reward.comparisons_per_row = 3
  c.dpo.reference = "per_batch"
  c.dpo.sigmoid.beta = 0.5
  return c
