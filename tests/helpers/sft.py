"""The SFT end-to-end tests' tiny experiment (tests/{unit,integration}/algorithms/test_sft.py;
also tests/integration/train/test_checkpoint.py's disk-space check)."""

from tests.helpers.configs import TINY_MODEL, run_config


def tiny_config(steps=40):
  c = run_config(
      "sft",
      steps=steps,
      batch_size=16,
      seq_len=64,
      log_every=5,
      eval_batches=2,
      checkpoint_every=steps // 2,
      async_checkpoint=True,
      warmup_steps=5,
  )
  c.model.update(TINY_MODEL)
  c.data.update(source="toy", toy_num_records=600, tokenizer_vocab_size=384, packing=True)
  c.sample.update(num_examples=0)
  return c
