"""DPO training: response log-probs of packed comparison batches equal each response scored alone,
the driver learns an easy preference, and precomputed and per-batch reference log-probs train
the same policy.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_dpo.py.
"""

import json

import jax
import numpy as np
import pytest

from rlhf_jax import scoring, sharding
from rlhf_jax.algorithms import dpo
from rlhf_jax.data.preference import comparison_batch, pack_comparisons, tokenize_comparisons
from rlhf_jax.models import ModelConfig, create_model, split_model
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.preference import (
    TINY,
    dpo_config,
    export_lm,
    learnable_pairs,
    pair_records,
    write_jsonl,
)


@pytest.mark.slow
def test_comparison_logps_equal_each_response_scored_alone(words_tokenizer):
  """Packed rows (several pairs per row, each response its own segment): every slot's sum is the
  sum of log pi over exactly that response's SFT targets, as if it were scored alone."""
  graphdef, params = split_model(create_model(ModelConfig(**TINY), 0))
  comparisons, _ = tokenize_comparisons(pair_records(10), "pairwise", words_tokenizer, max_len=64)
  batch, count = pack_comparisons(comparisons, 256, rows=4, per_row=3, num_responses=2)
  assert count == len(comparisons) and batch["valid"].sum() == 2 * count
  sums, lengths = jax.jit(scoring.comparison_logps, static_argnums=0)(graphdef, params, batch)
  sums, lengths = np.asarray(sums), np.asarray(lengths)
  # Each slot by its whole sequence (prompt + response: distinct for every response here).
  slots = {}
  for r, p, k in zip(*np.nonzero(batch["valid"])):
    end = batch["score_index"][r, p, k]
    first = np.argmax(batch["segment_ids"][r] == batch["segment_ids"][r, end])
    slots[tuple(batch["tokens"][r, first : end + 1])] = (
        sums[r, p, k],
        lengths[r, p, k],
        batch["response_start"][r, p, k] - first,
    )
  assert len(slots) == 2 * count
  for c in comparisons:
    for seq in c.sequences:
      width = 64  # alone in a padded row of fixed width: one compilation for all
      tokens = np.zeros((1, width), np.int32)
      tokens[0, : len(seq)] = seq
      real = np.arange(width)[None] < len(seq)
      mask = real & (np.arange(width)[None] >= c.prompt_len)  # the SFT targets: response + EOS
      alone = scoring.sequence_logprob_sums(
          graphdef,
          params,
          tokens,
          real.astype(np.int32),
          np.arange(width, dtype=np.int32)[None],
          mask,
      )
      got, length, prompt_len = slots[tuple(seq)]
      assert prompt_len == c.prompt_len
      np.testing.assert_allclose(got, float(alone[0]), atol=1e-4, rtol=1e-5)
      assert length == len(seq) - c.prompt_len > 0
  assert np.all(sums[~batch["valid"]] == 0) and np.all(lengths[~batch["valid"]] == 0)


@pytest.mark.slow
def test_precomputed_reference_logps_follow_each_comparison_through_packing(words_tokenizer):
  graphdef, params = split_model(create_model(ModelConfig(**TINY), 1))
  comparisons, _ = tokenize_comparisons(pair_records(11), "pairwise", words_tokenizer, max_len=64)
  logps = jax.jit(lambda batch: scoring.comparison_logps(graphdef, params, batch)[0])
  mesh = sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2])
  # 2 rows x up to 2 pairs per pass: the 11 comparisons take 3 passes, the last one part-filled.
  filled = dpo.precompute_reference(logps, comparisons, seq_len=256, rows=2, per_row=2, mesh=mesh)
  assert [c.index for c in filled] == [c.index for c in comparisons]
  one_per_row = comparison_batch(comparisons, 128, 2)
  expected = np.asarray(logps(one_per_row))[:, 0]  # [11, 2]
  np.testing.assert_allclose(np.stack([c.ref_logps for c in filled]), expected, atol=1e-4)
  with pytest.raises(ValueError, match="not unique"):
    dpo.precompute_reference(logps, comparisons[:2] * 2, seq_len=256, rows=2, per_row=2, mesh=mesh)


@pytest.mark.slow
def test_dpo_learns_an_easy_preference_with_either_reference_mode(tmp_path, words_tokenizer_dir):
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  source = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(64))
  results, params = {}, {}
  for mode in ("precompute", "per_batch"):
    workdir = tmp_path / mode
    results[mode] = dpo.train(
        dpo_config(tmp_path, words_tokenizer_dir, source, reference=mode), str(workdir)
    )
    params[mode], meta = checkpoint.load_params(workdir / "export")
    assert meta["model"]["head"] == "lm" and meta["step"] == 30
    logged = metrics.read_jsonl(workdir / "metrics.jsonl")
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert losses[0] < 0.75 and losses[-1] < 0.5 * losses[0], losses  # ln 2 = 0.69 at the start
    held_out = results[mode]
    assert held_out["eval/rewards/accuracy"] >= 0.9, held_out
    assert held_out["eval/rewards/margin"] > 0
  # The same loss whichever way the reference log-probs were computed: the same policy.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=0),
      params["precompute"],
      params["per_batch"],
  )
  np.testing.assert_allclose(
      results["precompute"]["eval/loss"], results["per_batch"]["eval/loss"], rtol=1e-3
  )
  # Rankings of 3 (great > fine > awful) train as their best-vs-rest pairs.
  rankings = [
      {
          "prompt": r["prompt"],
          "responses": [r["chosen"], r["chosen"].replace("great", "fine"), r["rejected"]],
      }
      for r in learnable_pairs(32)
  ]
  config = dpo_config(
      tmp_path, words_tokenizer_dir, write_jsonl(tmp_path / "rankings.jsonl", rankings), steps=10
  )
  config.data.kind = "ranking"
  result = dpo.train(config, str(tmp_path / "ranking"))
  data_stats = json.loads((tmp_path / "ranking" / "eval.json").read_text())["data"]
  assert data_stats["train"]["comparisons"] == 2 * 24 and data_stats["eval"]["comparisons"] == 2 * 8
  assert result["step"] == 10 and np.isfinite(result["eval/loss"])


@pytest.mark.slow
def test_orpo_trains_without_a_reference(tmp_path, words_tokenizer_dir, monkeypatch):
  """The driver path of a reference-free loss (ORPO: lengths and the SFT term too) end to end; the
  reference is never computed. (SimPO and CPL differ only in `pair_loss`, tested above; CPL reads
  the reference as the sigmoid loss does.)"""
  export_lm(tmp_path / "lm", words_tokenizer_dir)
  source = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(32))
  monkeypatch.setattr(dpo, "attach_reference", lambda *a, **k: pytest.fail("reference computed"))
  config = dpo_config(tmp_path, words_tokenizer_dir, source, steps=8)
  config.train.log_every = 4
  config.dpo.loss_type = "orpo"
  config.dpo.orpo.beta = 0.5
  result = dpo.train(config, str(tmp_path / "orpo"))
  assert result["step"] == 8 and (tmp_path / "orpo" / "export").exists()
  logged = [r for r in metrics.read_jsonl(tmp_path / "orpo" / "metrics.jsonl") if "train/loss" in r]
  assert logged[-1]["train/loss"] < logged[0]["train/loss"], logged
  assert logged[-1]["train/nll_loss"] < logged[0]["train/nll_loss"], logged  # the SFT term
  assert result["eval/rewards/margin"] > 0 and result["eval/rewards/accuracy"] >= 0.75, result
  assert 0 < result["eval/nll_loss"] < result["eval/loss"]
