"""KTO training: data validation, mismatched pairs for the reference point z0 (no gradient through
it), the sharded loss equals the single-device one, and the driver learns an easy labelling.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_kto.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.algorithms import kto
from rlhf_jax.losses import preference
from tests.helpers.kto import CFG, kto_config, kto_records
from tests.helpers.preference import write_jsonl


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, "label", "expected a boolean"),
        ({"prompt": "p", "completion": "c"}, "label", "missing"),
        ({"prompt": "p", "response": "c", "label": True}, "completion", "missing"),
        ({"prompt": "p", "completion": " ", "label": False}, "completion", "is empty"),
    ],
)
def test_kto_records_are_validated_with_file_line_and_field(tmp_path, record, field, problem):
  good = {"prompt": "q", "completion": "a", "label": True}
  path = write_jsonl(tmp_path / "kto.jsonl", [good, record])
  with pytest.raises(data.RecordError, match=rf"kto.jsonl:2: field '{field}': {problem}"):
    data.load_records(path, "kto")


def test_mismatched_partners_differ_in_prompt_and_completion():
  records = kto_records(20)
  records[1] = {**records[1], "completion": records[0]["completion"]}  # a shared completion
  partner = kto.mismatched_partners(records, seed=3)
  assert np.array_equal(partner, kto.mismatched_partners(records, seed=3))  # seeded
  assert len(set(partner.tolist())) > len(records) // 2  # spread out, not one fixed record
  for i, j in enumerate(partner):
    assert records[j]["prompt"] != records[i]["prompt"]
    assert records[j]["completion"].strip() != records[i]["completion"].strip()
  pairs = kto.kto_to_pairs(records, seed=3)
  assert [(p["chosen"], p["label"]) for p in pairs] == [
      (r["completion"], r["label"]) for r in records
  ]
  same_prompt = [{"prompt": "p", "completion": f"c{i}", "label": True} for i in range(4)]
  with pytest.raises(ValueError, match="mismatched"):
    kto.mismatched_partners(same_prompt, seed=0)


def test_z0_is_the_clamped_mean_of_the_mismatched_pairs_and_gets_no_gradient():
  rng = np.random.default_rng(0)
  logps = jnp.asarray(rng.normal(-20, 3, (8, 2)), jnp.float32)
  ref = jnp.asarray(rng.normal(-20, 3, (8, 2)), jnp.float32)
  desirable = jnp.asarray(rng.random(8) < 0.5)
  weight = jnp.asarray([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)
  keep = np.asarray(weight, bool)
  loss_fn = jax.jit(lambda lp: kto.kto_batch_loss(CFG, lp, ref, desirable, weight))
  loss, got = loss_fn(logps)
  mean = np.mean((np.asarray(logps) - np.asarray(ref))[keep, 1])  # empty slots excluded
  np.testing.assert_allclose(got["kl"], max(mean, 0.0), rtol=1e-5)
  # Without gradient through z0: d loss / d (mismatched logps) = 0, and the examples' gradient is
  # kto_loss's with z0 a constant.
  grads = np.asarray(jax.grad(lambda lp: loss_fn(lp)[0])(logps))
  assert np.all(grads[:, 1] == 0)
  z = jnp.float32(mean)
  expected = jax.grad(lambda x: preference.kto_loss(x, ref[:, 0], desirable, z, weight=weight)[0])(
      logps[:, 0]
  )
  np.testing.assert_allclose(grads[:, 0], expected, rtol=1e-5, atol=1e-8)
  assert np.all(grads[~keep, 0] == 0) and np.all(grads[keep, 0] != 0)
  assert set(got) >= {"rewards/desirable", "rewards/undesirable", "rewards/accuracy", "kl"}
  # Shifting the mismatched pairs' log-ratios above 0 raises z0, which lowers the desirable
  # examples' value: the loss rises by the same path TRL's does.
  assert float(loss_fn(logps.at[:, 1].add(5.0))[0]) != float(loss)


@pytest.mark.parametrize(
    "update, match",
    [
        (dict(kind="pairwise"), "config.data.kind='pairwise': KTO trains on 'kto'"),
        (dict(reference="cached"), "config.kto.reference='cached'"),
        # Every numeric field's range is checked first (rlhf_jax/configs/ranges.py).
        (dict(beta=0.0), r"config.kto.beta=0.0 is out of range: must be a finite number > 0"),
        (
            dict(undesirable_weight=-1.0),
            "config.kto.undesirable_weight=-1.0 is out of range: must be a finite number >= 0",
        ),
    ],
)
def test_kto_driver_rejects_bad_configs_before_loading(
    tmp_path, words_tokenizer_dir, update, match
):
  # init_from names no export: the config fails before any model or data loads.
  config = kto_config(tmp_path, words_tokenizer_dir, str(tmp_path / "missing.jsonl"))
  update = dict(update)
  config.data.kind = update.pop("kind", "kto")
  config.kto.update(**update)
  with pytest.raises(ValueError, match=match):
    kto.train(config, str(tmp_path / "w"))
