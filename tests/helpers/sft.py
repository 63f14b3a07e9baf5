"""The SFT end-to-end tests' tiny experiment (tests/{unit,integration}/algorithms/test_sft.py;
also tests/integration/train/test_checkpoint.py's disk-space check)."""

from rlhf_jax.configs.base import base_config


def tiny_config(steps=40):
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
  c.mesh.shape = (2, 2, 2)  # data, fsdp and tensor all exercised on the 8 fake devices
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.train.update(
      steps=steps,
      batch_size=16,
      seq_len=64,
      log_every=5,
      eval_every=steps,
      eval_batches=2,
      checkpoint_every=steps // 2,
      async_checkpoint=True,
  )
  c.data.update(source="toy", toy_num_records=600, tokenizer_vocab_size=384, packing=True)
  c.sample.update(num_examples=0)
  return c
