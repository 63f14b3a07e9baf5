"""Optimiser, schedule, SFT loss and mixed precision: compared with plain references.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/train/test_train.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.common import shift_for_next_token, token_logprobs
from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.train import (
    make_schedule,
)
from tests.helpers.train import _optim_cfg


def test_sft_loss_matches_numpy():
  rs = np.random.RandomState(0)
  logits = rs.randn(3, 5, 7).astype(np.float32)
  targets = rs.randint(0, 7, (3, 5))
  mask = rs.rand(3, 5) > 0.4
  loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = (nll * mask).sum() / mask.sum()  # per token over the whole batch
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["loss_weight"] == mask.sum()
  acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["token_accuracy"], acc, rtol=1e-6)


def test_token_logprobs_with_temperature():
  logits = jnp.array([[[1.0, 2.0, 3.0]]])
  out = token_logprobs(logits, jnp.array([[2]]), temperature=0.5)
  expected = 6.0 - np.log(np.exp([2.0, 4.0, 6.0]).sum())
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)


def test_shift_stays_inside_documents():
  tokens = jnp.array([[1, 5, 6, 1, 7, 8, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
  loss_mask = jnp.array([[0, 1, 1, 0, 1, 1, 0]], bool)
  targets, mask = shift_for_next_token(tokens, loss_mask, segments)
  np.testing.assert_array_equal(targets, [[5, 6, 1, 7, 8, 0]])
  # The BOS of document 2 is never a target; padding never is.
  np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1, 0]])


def test_schedule_warmup_then_cosine():
  sched = make_schedule(
      _optim_cfg(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), 110
  )
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # half way through the decay
  np.testing.assert_allclose(sched(110), 0.1, atol=1e-6)
  lin = make_schedule(_optim_cfg(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear"), 100)
  np.testing.assert_allclose(lin(50), 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    make_schedule(_optim_cfg(schedule="exp"), 10)
