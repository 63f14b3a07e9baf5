"""DPO training: response log-probs of packed comparison batches equal each response scored alone,
the driver learns an easy preference, and precomputed and per-batch reference log-probs train
the same policy.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_dpo.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.algorithms import dpo
from rlhf_jax.configs.base import base_config
from rlhf_jax.losses import preference
from tests.helpers.preference import dpo_config, learnable_pairs, write_jsonl


@pytest.mark.parametrize(
    "update, match",
    [
        (dict(kind="sft"), "DPO trains on 'pairwise'"),
        (dict(kind="ranking", ranking_pairs="worst"), "config.dpo.ranking_pairs='worst'"),
        (dict(reference="cached"), "config.dpo.reference='cached'"),
        (dict(loss_type="kto"), "config.dpo.loss_type='kto'"),
        (
            {"loss_type": "orpo", "orpo.label_smoothing": 0.1},
            r"config.dpo.orpo.label_smoothing is not a hyper-parameter of the 'orpo' loss \(beta\)",
        ),
        (
            {"loss_type": "simpo", "simpo.beta": 0.0},
            r"config.dpo.simpo.beta=0.0.*beta must be > 0",
        ),
        (
            {"loss_type": "simpo", "simpo.gamma": -1.0},
            r"config.dpo.simpo.gamma=-1.0.*gamma must be",
        ),
        ({"loss_type": "orpo", "orpo.beta": -0.1}, r"config.dpo.orpo.beta=-0.1.*beta must be > 0"),
        ({"loss_type": "cpl", "cpl.lam": 1.5}, r"config.dpo.cpl.lam=1.5.*lam must be in \(0, 1\]"),
        (
            {"loss_type": "sigmoid", "sigmoid.label_smoothing": 0.5},
            r"config.dpo.sigmoid.label_smoothing=0.5.*label_smoothing must be in \[0, 0.5\)",
        ),
    ],
)
def test_dpo_driver_rejects_bad_configs(tmp_path, words_tokenizer_dir, update, match):
  config = dpo_config(
      tmp_path, words_tokenizer_dir, write_jsonl(tmp_path / "p.jsonl", learnable_pairs(8))
  )
  update = dict(update)
  config.data.kind = update.pop("kind", "pairwise")
  for key, value in update.items():  # "simpo.beta": a loss's own block
    *block, field = key.split(".")
    (config.dpo[block[0]] if block else config.dpo)[field] = value
  with pytest.raises(ValueError, match=match):
    dpo.train(config, str(tmp_path / "w"))


def test_rankings_become_pairs_best_first():
  record = {"prompt": "p", "responses": ["a", "b", "c", "d"], "family": "facts"}
  best = dpo.ranking_to_pairs([record], "best_vs_rest")
  assert [(r["chosen"], r["rejected"]) for r in best] == [("a", "b"), ("a", "c"), ("a", "d")]
  assert all(r["prompt"] == "p" and r["family"] == "facts" and "responses" not in r for r in best)
  pairs = [(r["chosen"], r["rejected"]) for r in dpo.ranking_to_pairs([record], "all")]
  assert pairs == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]


def test_pair_loss_dispatches_to_the_pure_losses():
  """Each loss_type reads its own config block; SimPO / ORPO get the lengths (ORPO its token-mean
  chosen NLL over the used slots), and only the reference-based losses read the reference."""
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(1, 9, (6, 2)), jnp.int32)
  logps = jnp.asarray(-rng.uniform(0.2, 3.0, (6, 2)) * np.asarray(lengths), jnp.float32)
  ref = jnp.asarray(rng.normal(-10, 2, (6, 2)), jnp.float32)
  weight = jnp.asarray([1, 1, 0, 1, 1, 0], bool)
  w = np.asarray(weight, np.float32)
  cfg = base_config().dpo
  cfg.simpo.update(beta=2.5, gamma=0.7)
  cfg.orpo.beta = 0.3
  cfg.cpl.update(alpha=0.2, lam=0.6)
  c, r, lc, lr = logps[:, 0], logps[:, 1], lengths[:, 0], lengths[:, 1]
  nll = -np.sum(w * np.asarray(c)) / np.sum(w * np.asarray(lc))
  expected = {
      "simpo": preference.simpo_loss(c, r, lc, lr, beta=2.5, gamma=0.7, weight=weight),
      "orpo": preference.orpo_loss(c / lc, r / lr, jnp.float32(nll), beta=0.3, weight=weight),
      "cpl": preference.cpl_loss(
          c,
          r,
          alpha=0.2,
          lam=0.6,
          ref_chosen_logps=ref[:, 0],
          ref_rejected_logps=ref[:, 1],
          weight=weight,
      ),
      "sigmoid": preference.dpo_loss(c, r, ref[:, 0], ref[:, 1], beta=0.1, weight=weight),
  }
  for loss_type, (loss, loss_metrics) in expected.items():
    cfg.loss_type = loss_type
    got, got_metrics = dpo.pair_loss(cfg, logps, lengths, ref, weight)
    np.testing.assert_allclose(got, loss, rtol=1e-6, err_msg=loss_type)
    for key in loss_metrics:
      np.testing.assert_allclose(got_metrics[key], loss_metrics[key], rtol=1e-5, err_msg=key)
    assert dpo.uses_reference(cfg) == (loss_type in ("cpl", "sigmoid"))
    # The reference matters exactly when it is used.
    moved, _ = dpo.pair_loss(cfg, logps, lengths, ref.at[:, 0].add(3.0), weight)
    assert (float(moved) != float(got)) == dpo.uses_reference(cfg), loss_type
  np.testing.assert_allclose(expected["orpo"][1]["nll_loss"], nll, rtol=1e-6)
  cfg.update(loss_type="cpl", reference_free=True)
  assert not dpo.uses_reference(cfg)
