"""HIR: the loss against a NumPy reference, relabeling of hand-written toy-world samples, the
fixed-shape batches, config errors, and a tiny end-to-end run (rerun skips finished rounds).

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_hir.py.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax.algorithms import hir
from rlhf_jax.data import encode_prompt
from rlhf_jax.losses import hir as hir_losses
from rlhf_jax.models import ModelConfig, create_model, split_model
from rlhf_jax.toyworld import World
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.hir import _loss_inputs, hir_config
from tests.helpers.preference import TINY, write_jsonl


@pytest.mark.slow
def test_hir_loss_on_listed_response_tokens_equals_the_full_head(words_tokenizer):
  """With the response tokens listed (hir_batch's logit_budget, as the driver batches) the LM head
  runs on those slots only: the loss, its metrics and its gradients equal the full head's."""
  records = [
      {
          "prompt": "Repeat: cat dog",
          "completion": "cat dog",
          "negatives": ["Repeat: sun", "Repeat: owl hat", "Repeat: moon"],
      },
      {"prompt": "Repeat: sun", "completion": "sun", "negatives": []},
  ]
  examples, _ = hir.tokenize_records(records, words_tokenizer, seq_len=40, negatives=2)
  budget = hir.logit_budget_for([s for e in examples for s in e.sequences], 40)
  assert budget < 40
  plain = hir.hir_batch(examples, 40, slots=3)
  listed = hir.hir_batch(examples, 40, slots=3, logit_budget=budget)
  assert listed["logit_index"].shape == (2, 3, budget)
  for key in plain:
    np.testing.assert_array_equal(listed[key], plain[key])
  # The listed targets are the loss-masked tokens, each predicted from the slot before it.
  np.testing.assert_array_equal(listed["logit_mask"].sum(-1), plain["loss_mask"].sum(-1))
  cfg = ModelConfig(**{**TINY, "vocab_size": len(words_tokenizer)})
  graphdef, params = split_model(create_model(cfg, 0))
  loss_fn = hir.make_hir_loss_fn(
      graphdef, ml_collections.ConfigDict(dict(contrastive_coef=1.0, entropy_coef=0.1))
  )
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None), has_aux=True))
  (want, want_metrics), want_grads = grad(params, plain)
  (got, got_metrics), got_grads = grad(params, listed)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for key in want_metrics:
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_grads, want_grads
  )


def export_tiny_lm(path):
  cfg = ModelConfig(**{**TINY, "max_seq_len": 128})
  _, params = split_model(create_model(cfg, 0))
  checkpoint.export_params(path, params, metadata={"model": cfg.to_dict()})


@pytest.mark.slow
def test_hir_runs_rounds_and_a_rerun_skips_them(
    tmp_path, words_tokenizer_dir, words_tokenizer, compilation_cache
):
  export_tiny_lm(tmp_path / "lm")
  short = lambda n, families: [
      t
      for t in World(0).tasks(n, seed=0, families=families)
      if len(encode_prompt(words_tokenizer, t["prompt"])) <= 48
  ]
  constrained, others = short(400, ["constrained"])[:4], short(40, ["arithmetic", "word_list"])[:12]
  tasks = constrained[:2] + others[:6] + constrained[2:] + others[6:]  # 8 prompts a round
  assert len(tasks) == 16
  source = write_jsonl(tmp_path / "tasks.jsonl", tasks)
  workdir = tmp_path / "hir"
  result = hir.train(hir_config(tmp_path, words_tokenizer_dir, source), str(workdir))
  rounds = json.loads((workdir / "rounds.json").read_text())
  assert [r["round"] for r in rounds] == [1, 2] and result["rounds"] == 2
  for r in (1, 2):
    records = metrics.read_jsonl(workdir / f"round_{r}" / "relabeled.jsonl")
    assert len(records) == rounds[r - 1]["kept"] > 0
    for record in records:  # fresh prompts each round; every constraint of x* is met
      assert record["original_prompt"] in {t["prompt"] for t in tasks[(r - 1) * 8 : r * 8]}
    logged = [
        m for m in metrics.read_jsonl(workdir / f"round_{r}" / "metrics.jsonl") if "train/loss" in m
    ]
    assert len(logged) == 4 and all(np.isfinite(m["train/loss"]) for m in logged)
  _, meta = checkpoint.load_params(workdir / "export")
  assert meta["step"] == 4
  # A rerun finds every round exported: nothing sampled or trained again.
  mtime = (workdir / "round_1" / "relabeled.jsonl").stat().st_mtime_ns
  again = hir.train(hir_config(tmp_path, words_tokenizer_dir, source), str(workdir))
  assert again == result and (workdir / "round_1" / "relabeled.jsonl").stat().st_mtime_ns == mtime


def test_hir_loss_sharded_over_8_devices_equals_unsharded():
  """The batch split over 8 devices (examples on the "data" axis) gives the one-device loss,
  metrics and gradients."""
  logits, targets, mask, valid = _loss_inputs()
  rep = lambda x: np.concatenate([x, x], axis=0)  # 8 examples: one per device
  logits, targets, mask, valid = rep(logits), rep(targets), rep(mask), rep(valid)
  fn = jax.jit(
      jax.value_and_grad(
          lambda x, t, m, v: hir_losses.hir_loss(
              x, t, m, v, contrastive_coef=0.7, entropy_coef=0.05
          ),
          has_aux=True,
      )
  )
  (loss, metrics), grads = fn(*map(jnp.asarray, (logits, targets, mask, valid)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda x: jax.device_put(
      x,
      jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
      ),
  )
  sharded = [put(x) for x in (logits, targets, mask, valid)]
  assert len(sharded[0].sharding.device_set) == 8
  (sh_loss, sh_metrics), sh_grads = fn(*sharded)
  np.testing.assert_allclose(sh_loss, loss, rtol=1e-5, atol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(sh_metrics[key], metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(sh_grads, grads, rtol=1e-4, atol=1e-7)
