"""SFT of a small Llama-style model, from scratch, on the generated toy instructions.

About a minute on 2 CPU cores. `make quickstart` runs it and prints generations before and after.
"""

from rlhf_jax.configs.base import base_config


def get_config():
  c = base_config("sft")
  c.model.update(
      vocab_size=0,  # 0 = the toy tokenizer's size, rounded up to a multiple of 128
      num_layers=4,
      embed_dim=128,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=384,
      max_seq_len=128,
      family="llama",
  )
  c.optim.update(lr=3e-3, warmup_steps=20, weight_decay=0.01)
  c.train.update(
      steps=250, batch_size=32, seq_len=64, log_every=10, eval_every=50, checkpoint_every=50
  )
  c.data.update(source="toy", toy_num_records=6000, tokenizer_vocab_size=512, packing=True)
  c.sample.update(num_examples=8, max_new_tokens=24)
  return c
