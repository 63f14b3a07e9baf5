"""The KTO tests' unpaired records and configs
(tests/{unit,integration}/algorithms/test_kto.py)."""

import numpy as np

from rlhf_jax.configs.base import base_config
from tests.helpers.preference import dpo_config, learnable_pairs


def kto_records(n, seed=0):
  """Each learnable pair as two unpaired records: the 'great' response desirable, the 'awful' one
  not (shuffled, so a batch holds both kinds)."""
  records = [
      r
      for p in learnable_pairs(n, seed)
      for r in (
          {"prompt": p["prompt"], "completion": p["chosen"], "label": True},
          {"prompt": p["prompt"], "completion": p["rejected"], "label": False},
      )
  ]
  order = np.random.default_rng(seed).permutation(len(records))
  return [records[i] for i in order]


CFG = base_config().kto


def kto_config(tmp_path, words_tokenizer_dir, source, steps=30, reference="precompute"):
  """The DPO tests' driver config, on unpaired KTO records."""
  c = dpo_config(tmp_path, words_tokenizer_dir, source, steps=steps)
  c.algorithm = "kto"
  c.data.kind = "kto"
  c.train.log_every = 5
  c.kto.update(beta=0.5, reference=reference)
  return c
