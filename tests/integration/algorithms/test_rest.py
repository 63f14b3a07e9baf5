"""ReST: the Improve steps' thresholds and filters against hand-worked and NumPy references, config
errors before anything loads, and the driver end to end on tiny models (files, shrinking kept sets,
each Improve step from the previous one, resume of an interrupted SFT, skipping finished steps).

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_rest.py.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax.algorithms import rest
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.ppo import MAX_PROMPT_LEN, TINY, base_driver_config

# ---------------------------------------------------------------- driver


def rest_config(exports, tokenizer_dir, **rest_overrides):
  c = base_driver_config("rest", exports, tokenizer_dir)
  c.data.packing = True
  c.train.update(
      steps=2,
      batch_size=8,
      seq_len=TINY["max_seq_len"],
      checkpoint_every=1,
      eval_every=2,
      eval_batches=1,
      log_every=1,
      async_checkpoint=False,
  )
  c.sample.num_examples = 0
  c.rest.update(
      **{
          **dict(
              grow_steps=2,
              prompts_per_grow=8,
              samples_per_prompt=3,
              max_new_tokens=8,
              max_prompt_len=MAX_PROMPT_LEN,
              batch_prompts=8,
              thresholds=(0.25, 0.5, 0.75),
          ),
          **rest_overrides,
      }
  )
  c.rest.reward.helpful = exports["helpful"]
  return c


def steps_logged(workdir):
  return {
      path: [r["step"] for r in metrics.read_jsonl(path) if "train/loss" in r]
      for path in sorted(str(p) for p in workdir.glob("grow_*/improve_*/metrics.jsonl"))
  }


@pytest.mark.slow
def test_driver_grows_improves_resumes_and_skips(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  workdir = tmp_path / "rest"
  interrupted = rest_config(exports, tokenizer_dir)
  interrupted.train.stop_after_steps = 1
  assert rest.train(interrupted, str(workdir)) == {"stopped_in": "grow_1/improve_1"}
  assert not (workdir / "grow_1" / "improve_1" / "export").exists()

  result = rest.train(rest_config(exports, tokenizer_dir), str(workdir))  # resumes that SFT
  assert result["grow_steps"] == 2
  logged = steps_logged(workdir)
  assert len(logged) == 6 and all(steps == [1, 2] for steps in logged.values()), logged
  rows = json.loads((workdir / "steps.json").read_text())
  assert [(r["grow"], r["improve"]) for r in rows] == [(g, k) for g in (1, 2) for k in range(4)]
  previous = str(exports["lm"])
  for g in (1, 2):
    samples = metrics.read_jsonl(workdir / f"grow_{g}" / "samples.jsonl")
    assert len(samples) == 8 * 3 and rows[4 * (g - 1)]["samples"] == 24
    rewards = np.array([s["reward"] for s in samples])
    assert all(np.isfinite(s["gold_combined"]) and "helpful" in s["scores"] for s in samples)
    improve = rows[4 * (g - 1) + 1 : 4 * g]
    # The taus are the Grow set's quantiles; each kept set is exactly its samples above tau.
    np.testing.assert_allclose(
        [r["tau"] for r in improve], np.quantile(rewards, [0.25, 0.5, 0.75]), atol=1e-5
    )
    for row in improve:
      kept = metrics.read_jsonl(workdir / f"grow_{g}" / f"improve_{row['improve']}" / "kept.jsonl")
      expected = [s for s in samples if s["reward"] >= row["tau"] - 1e-6 and s["completion"]]
      assert kept == expected and row["kept"] == len(kept)
      assert row["reward"] == pytest.approx(np.mean([s["reward"] for s in kept]))
      # Each Improve step fine-tunes the previous one's policy (across Grow steps too).
      config = json.loads(
          (workdir / f"grow_{g}" / f"improve_{row['improve']}" / "config.json").read_text()
      )
      assert config["init_from"] == previous and config["algorithm"] == "sft"
      previous = str(workdir / f"grow_{g}" / f"improve_{row['improve']}" / "export")
    counts = [r["kept"] for r in improve]
    assert counts[0] > counts[1] > counts[2] > 0, counts  # rising thresholds keep fewer
    assert improve[0]["reward"] < improve[1]["reward"] < improve[2]["reward"]
  final, _ = checkpoint.load_params(workdir / "export")
  last, _ = checkpoint.load_params(previous)
  jax.tree.map(np.testing.assert_array_equal, final, last)

  # A rerun skips every finished step: no sampling, no training.
  mtimes = {p: os.path.getmtime(p) for p in workdir.glob("grow_*/samples.jsonl")}
  assert rest.train(rest_config(exports, tokenizer_dir), str(workdir)) == result
  assert steps_logged(workdir) == logged
  assert {p: os.path.getmtime(p) for p in mtimes} == mtimes

  # A threshold above every reward: the error names it and the Grow step (no sampling: the
  # finished Grow set is reused).
  other = tmp_path / "too_high"
  shutil.copytree(workdir / "grow_1", other / "grow_1", ignore=shutil.ignore_patterns("improve_*"))
  too_high = rest_config(exports, tokenizer_dir, threshold_kind="absolute", thresholds=(1e6,))
  with pytest.raises(
      ValueError,
      match=r"config.rest.thresholds\[0\]=1000000.0 .* keeps no sample "
      r"of Grow step 1 \(24 samples",
  ):
    rest.train(too_high, str(other))
