"""Rollouts on devices of their own (`config.ppo.rollout_devices`) and one step off-policy
(`config.ppo.staleness`), on the 8 fake CPU devices: split 4 + 4 at staleness 0 trains what the
colocated run trains; staleness 1 is deterministic and resumes bit-identically after a stop."""

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.algorithms import ppo
from rlhf_jax.errors import ConfigError
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.ppo import group_config


def _config(exports, tokenizer_dir, **ppo_fields):
  c = group_config(exports, tokenizer_dir, "grpo", iterations=3)
  c.mesh.shape = (-1, 1, 1)
  c.ppo.update(minibatches=1)  # 8 rows: whole on 8 or 4 devices
  c.ppo.update(**ppo_fields)
  return c


def _export(workdir):
  params, _ = checkpoint.load_params(workdir / "export")
  return params


@pytest.mark.slow
def test_a_split_run_at_staleness_0_trains_what_the_colocated_run_trains(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  together, apart = tmp_path / "colocated", tmp_path / "split"
  ppo.train(_config(exports, tokenizer_dir), str(together))
  ppo.train(_config(exports, tokenizer_dir, rollout_devices=4), str(apart))
  rows = [metrics.read_jsonl(w / "metrics.jsonl") for w in (together, apart)]
  # The same samples (a row's draws depend on the key and the row, not the devices) ...
  for a, b in zip(*rows):
    assert a["ppo/length"] == b["ppo/length"] and a["ppo/eos_rate"] == b["ppo/eos_rate"]
    assert a["ppo/reward"] == pytest.approx(b["ppo/reward"], rel=1e-5)  # summed on 8 or 4
  # ... and the same updates, up to the order in which 8 or 4 devices sum the gradients (Adam
  # scales a near-zero gradient's rounding up to ~1e-6; an update of lr 1e-3 moves a weight 1e-3).
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
      _export(together),
      _export(apart),
  )


@pytest.mark.slow
def test_staleness_1_is_deterministic_and_resumes_bit_identically(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  config = lambda: _config(exports, tokenizer_dir, rollout_devices=4, staleness=1, epochs=2)
  straight, again, stopped = tmp_path / "straight", tmp_path / "again", tmp_path / "stopped"
  ppo.train(config(), str(straight))
  ppo.train(config(), str(again))
  jax.tree.map(np.testing.assert_array_equal, _export(straight), _export(again))
  c = config()
  c.train.stop_after_steps = 2
  ppo.train(c, str(stopped))
  assert [r["step"] for r in metrics.read_jsonl(stopped / "metrics.jsonl")] == [1, 2]
  ppo.train(config(), str(stopped))  # resumes with the saved behaviour weights
  jax.tree.map(np.testing.assert_array_equal, _export(straight), _export(stopped))
  # Off-policy: the rollouts of iterations 2 and 3 came from older weights than the update's,
  # so the run differs from the on-policy one.
  on_policy = tmp_path / "on_policy"
  ppo.train(_config(exports, tokenizer_dir, rollout_devices=4, epochs=2), str(on_policy))
  a, b = _export(straight), _export(on_policy)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "fields, error, match",
    [
        (dict(rollout_devices=8), sharding.ShardingConfigError, r"rollout_devices=8 must leave"),
        (
            dict(rollout_devices=3),
            sharding.ShardingConfigError,
            r"config.mesh.shape=\(4, 1, 1\) does not fit the 5 training devices",
        ),
        (dict(staleness=2), ConfigError, r"config.ppo.staleness=2: 0 \(on-policy\) or 1"),
        (dict(staleness=1, dynamic_sampling=True), ConfigError, r"dynamic_sampling cannot"),
    ],
)
def test_rollout_mesh_errors(tmp_path, exports, tokenizer_dir, fields, error, match):
  c = _config(exports, tokenizer_dir, **fields)
  if fields.get("rollout_devices") == 3:
    c.mesh.shape = (4, 1, 1)
  with pytest.raises(error, match=match):
    ppo.train(c, str(tmp_path / "run"))
