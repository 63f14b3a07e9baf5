"""Configs shared by the multi-host test and its worker processes (tests/workers/multihost_run.py)."""

from tests.helpers.configs import TINY_MODEL, pairwise_data, run_config

STEPS = 8
RUN = dict(
    steps=STEPS, log_every=2, checkpoint_every=STEPS // 2, async_checkpoint=True, warmup_steps=2
)


def sft_config():
  c = run_config("sft", batch_size=16, seq_len=64, **RUN)
  c.model.update(TINY_MODEL)
  c.data.update(source="toy", toy_num_records=200, tokenizer_vocab_size=384, packing=True)
  c.sample.update(num_examples=0)
  return c


def dpo_config(tokenizer_dir: str, source: str, init_from: str):
  c = pairwise_data(run_config("dpo", batch_size=8, seq_len=128, **RUN), source, tokenizer_dir)
  c.init_from = init_from
  c.reward.comparisons_per_row = 3
  c.dpo.reference = "per_batch"
  c.dpo.sigmoid.beta = 0.5
  return c
