"""KTO training: data validation, mismatched pairs for the reference point z0 (no gradient through
it), the sharded loss equals the single-device one, and the driver learns an easy labelling.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_kto.py.
"""

import json

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.algorithms import kto
from rlhf_jax.data.preference import comparison_batch, tokenize_comparisons
from rlhf_jax.models import ModelConfig, create_model, split_model
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.kto import CFG, kto_config, kto_records
from tests.helpers.preference import TINY, export_lm, write_jsonl


@pytest.mark.slow
def test_sharded_kto_loss_equals_one_device(words_tokenizer):
  """z0 is a mean over the whole (sharded) batch, as TRL gathers it across processes."""
  graphdef, params = split_model(create_model(ModelConfig(**TINY), 0))
  pairs = kto.kto_to_pairs(kto_records(8), seed=0)
  comparisons, _ = tokenize_comparisons(pairs, "pairwise", words_tokenizer, max_len=64)
  comparisons = [
      c._replace(
          margin=int(pairs[c.index]["label"]),
          ref_logps=np.asarray([-30.0 + c.index, -500.0], np.float32),
      )
      for c in comparisons
  ]
  batch = comparison_batch(comparisons, 128, 2)  # 16 rows
  loss_fn = jax.jit(kto.make_kto_loss_fn(graphdef, CFG))
  expected = jax.device_get(loss_fn(params, batch, None))
  mesh = sharding.make_mesh((8, 1, 1))
  got = jax.device_get(loss_fn(params, sharding.put_batch(batch, mesh), None))
  for key in expected[1]:
    np.testing.assert_allclose(got[1][key], expected[1][key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert expected[1]["kl"] > 0  # the reference point is in play


@pytest.mark.slow
def test_kto_learns_which_completions_are_desirable(tmp_path, words_tokenizer_dir):
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  source = write_jsonl(tmp_path / "kto.jsonl", kto_records(48))
  workdir = tmp_path / "run"
  config = kto_config(tmp_path, words_tokenizer_dir, source, steps=12)
  config.train.log_every = 3
  result = kto.train(config, str(workdir))
  params, meta = checkpoint.load_params(workdir / "export")
  assert meta["model"]["head"] == "lm" and meta["step"] == 12 and "lm_head" in params
  logged = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  # At step 0 the policy is the reference: every reward is 0 and the loss sigmoid(0) = 0.5. The
  # desirable completions' log-prob margin over the undesirable ones rises from there.
  margins = [r["train/rewards/desirable"] - r["train/rewards/undesirable"] for r in logged]
  assert margins[-1] > 2.0 and margins[-1] > margins[0] > 0, margins
  assert logged[-1]["train/loss"] < 0.2 and logged[0]["train/loss"] < 0.5, logged
  assert result["eval/rewards/accuracy"] >= 0.9, result
  assert result["eval/rewards/desirable"] > result["eval/rewards/undesirable"]
  report = json.loads((workdir / "eval.json").read_text())
  assert report["held_out"]["rewards/accuracy"] == result["eval/rewards/accuracy"]
  assert report["data"]["train"]["comparisons"] == 72
  assert report["data"]["eval"]["comparisons"] == 24
  assert report["data"]["train"]["desirable"] + report["data"]["train"]["undesirable"] == 72
