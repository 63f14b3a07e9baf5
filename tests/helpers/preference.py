"""The preference tests' tiny model, words, comparison records, LM export and reward-model / DPO
configs: shared by the reward-model, DPO, KTO, HIR, LoRA, shared-prompt, multi-host and reliability
tests (and tests/conftest.py's `words_tokenizer_dir`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import scoring
from rlhf_jax.models import ModelConfig, create_model, split_model
from rlhf_jax.train import checkpoint
from tests.helpers.configs import TINY_MODEL, pairwise_data, run_config

TINY = {**TINY_MODEL, "vocab_size": 384}
WORDS = ["sun", "moon", "star", "red", "blue", "cat", "dog", "tree", "rain", "snow", "fish", "bird"]


def pair_records(n, seed=0):
  """Pairs with margins 0..3, some without; distinct texts so each comparison is identifiable."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    a, b = rng.choice(WORDS, size=2, replace=False)
    record = {"prompt": f"Repeat: {a}, {b} ({i})", "chosen": f"{a}, {b}", "rejected": f"{b} {i}"}
    if i % 5:
      record["margin"] = int(i % 4)
    records.append(record)
  return records


def ranking_records(n, seed=0):
  rng = np.random.default_rng(seed)
  return [
      {
          "prompt": f"Give the first word of the list: {', '.join(rng.choice(WORDS, size=3))} ({i})",
          "responses": [
              f"{w} {i}" for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)
          ],
      }
      for i in range(n)
  ]


def alone_scores(graphdef, params, sequences, width=64, rows=64):
  """last_token_scores of each sequence in a row of its own: [N] numpy (fixed shapes: one compile)."""
  tokens = np.zeros((rows, width), np.int32)
  lengths = np.zeros(rows, np.int64)
  for row, s in enumerate(sequences):
    tokens[row, : len(s)], lengths[row] = s, len(s)
  seg = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  pos = np.where(seg > 0, np.arange(width)[None], 0)
  scores = _last_token_scores(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos)
  )
  return np.asarray(scores)[: len(sequences)]


_last_token_scores = jax.jit(scoring.last_token_scores, static_argnums=0)


def assert_metrics_close(got, expected, atol=1e-5):
  assert set(got) == set(expected)
  for name in expected:
    np.testing.assert_allclose(
        np.asarray(got[name]), np.asarray(expected[name]), atol=atol, rtol=1e-5, err_msg=name
    )


# ---------------------------------------------------------------- init from an LM export


def export_lm(path, words_tokenizer_dir=None, seed=3):
  cfg = ModelConfig(**TINY)
  _, params = split_model(create_model(cfg, seed))
  metadata = {"model": cfg.to_dict()}
  if words_tokenizer_dir is not None:
    metadata["words_tokenizer"] = str(words_tokenizer_dir)
  checkpoint.export_params(path, params, metadata=metadata)
  return params


# ---------------------------------------------------------------- driver


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _driver_config(algorithm, tmp_path, words_tokenizer_dir, source, kind, steps):
  """A 30-step run of `algorithm` from the tiny LM export at tmp_path/lm on the words pairs."""
  c = run_config(
      algorithm,
      steps=steps,
      batch_size=8,
      seq_len=128,
      log_every=10,
      checkpoint_every=steps,
      async_checkpoint=False,
      warmup_steps=3,
  )
  c.init_from = str(tmp_path / "lm")
  return pairwise_data(c, source, str(words_tokenizer_dir), kind=kind)


def rm_config(tmp_path, words_tokenizer_dir, source, kind="pairwise", steps=30):
  c = _driver_config("reward", tmp_path, words_tokenizer_dir, source, kind, steps)
  c.reward.update(
      margins="small" if kind == "pairwise" else "none",
      center_coef=0.01,
      max_responses=4,
      comparisons_per_row=3,
  )
  return c


def learnable_pairs(n, seed=0):
  """Chosen responses say 'great', rejected ones 'awful'; the rest of the text is shared noise."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    a, b, c = rng.choice(WORDS, size=3, replace=False)
    filler = f"{a} {b}" if rng.random() < 0.5 else f"{b} {c}"
    records.append(
        {
            "prompt": f"Describe the {a} and the {c}.",
            "chosen": f"{filler} great",
            "rejected": f"{filler} awful",
            "margin": int(rng.integers(0, 4)),
            "family": ["sky", "animals"][i % 2],
        }
    )
  return records


# ---------------------------------------------------------------- DPO


def dpo_config(tmp_path, words_tokenizer_dir, source, steps=30, reference="precompute"):
  c = _driver_config("dpo", tmp_path, words_tokenizer_dir, source, "pairwise", steps)
  c.reward.comparisons_per_row = 3
  c.dpo.reference = reference
  c.dpo.sigmoid.beta = 0.5
  return c
