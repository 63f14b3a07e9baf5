"""The HIR tests' loss inputs and driver config
(tests/{unit,integration}/algorithms/test_hir.py)."""

import ml_collections
import numpy as np

from rlhf_jax.configs.base import driver_config
from rlhf_jax.configs.toy import hir_stage


def _loss_inputs(seed=0, b=4, g=3, t=6, v=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, g, t, v)).astype(np.float32) * 2
  targets = rng.integers(0, v, size=(b, g, t))
  targets[:, 1:] = targets[:, :1]  # one output y_b under every instruction
  mask = np.zeros((b, g, t), bool)
  mask[:, :, 2:5] = True  # the response tokens (prompts differ only before them)
  valid = np.array(
      [[True, True, True], [True, True, False], [True, False, False], [False, False, False]]
  )  # two, one, no negatives; a padding example
  return logits, targets, mask, valid


# --- driver ---------------------------------------------------------------------------------------


def hir_config(tmp_path, tokenizer_dir, source, **hir_fields) -> ml_collections.ConfigDict:
  c = driver_config(hir_stage(rounds=2, prompts=8, samples=2, steps=4, lr=1e-3, init_from=""))
  c.init_from = str(tmp_path / "lm")
  c.data.update(source=str(source), tokenizer=str(tokenizer_dir))
  c.train.update(batch_size=8, seq_len=96, log_every=1)
  c.hir.update(
      **{**dict(max_prompt_len=48, max_new_tokens=12, min_gold=0.0, negatives=2), **hir_fields}
  )
  return c
