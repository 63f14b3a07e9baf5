"""MetricsWriter, read_jsonl, Progress and format_table."""

import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.errors import DamagedFileError
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train.metrics import MetricsWriter, Progress, format_table, read_jsonl


def _tensorboard_scalars(logdir):
  """{tag: [(step, value), ...]} read from TFRecord event files (length, crc, data, crc)."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_jsonl_lines_values_and_nan_as_null(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    writer.write(1, {"loss": jnp.float32(0.25), "acc": np.float64(0.5), "tokens": 128})
    writer.write(2, {"loss": jnp.array(float("nan")), "kl": float("inf"), "ok": jnp.bool_(True)})
    writer.write(2, {"gold_reward": jnp.array([1.5])}, prefix="eval")
    writer.write(3, {"lr": 1e-4}, prefix="")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 4
  assert json.loads(lines[0]) == {
      "step": 1,
      "train/loss": 0.25,
      "train/acc": 0.5,
      "train/tokens": 128,
  }
  assert isinstance(json.loads(lines[0])["train/tokens"], int)
  assert '"train/loss": null' in lines[1] and '"train/kl": null' in lines[1]
  assert "NaN" not in lines[1] and "Infinity" not in lines[1]
  assert read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "train/loss": 0.25, "train/acc": 0.5, "train/tokens": 128},
      {"step": 2, "train/loss": None, "train/kl": None, "train/ok": True},
      {"step": 2, "eval/gold_reward": 1.5},
      {"step": 3, "lr": 1e-4},
  ]


def test_each_write_is_on_disk_before_close(tmp_path):
  writer = MetricsWriter(tmp_path, tensorboard=False)
  writer.write(7, {"loss": 1.0})
  assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 7, "train/loss": 1.0}]
  writer.close()
  assert not os.path.exists(tmp_path / "tb")


def test_resumed_run_appends_after_a_truncated_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # killed mid-write
  assert read_jsonl(path) == [{"step": 1, "train/loss": 2.0}]
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(2, {"loss": 1.5})
  assert path.read_text().splitlines()[-1] == '{"step": 2, "train/loss": 1.5}'
  with pytest.raises(DamagedFileError, match=r"metrics\.jsonl:2: not valid JSON"):
    read_jsonl(path)  # the cut line is now in the middle: that is corruption, not a kill


def test_bad_metric_values_are_rejected(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(
        ValueError, match=r"'train/logits' must be a numeric scalar.*shape \(2, 3\)"
    ):
      writer.write(1, {"logits": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="'train/name' must be a numeric scalar"):
      writer.write(1, {"name": "abc"})
    with pytest.raises(ValueError, match='named "step" needs a prefix'):
      writer.write(1, {"step": 1}, prefix="")


def test_tensorboard_event_file_has_the_scalars(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    for step in range(3):
      writer.write(step, {"loss": jnp.float32(1.0 / (step + 1))})
    writer.write(2, {"win_rate": 0.75}, prefix="eval")
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  scalars = _tensorboard_scalars(tmp_path / "tb")
  assert [step for step, _ in scalars["train/loss"]] == [0, 1, 2]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
  assert scalars["eval/win_rate"] == [(2, 0.75)]


def test_only_process_zero_writes(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with MetricsWriter(tmp_path / "run") as writer:
    writer.write(1, {"loss": 1.0})
  assert not os.path.exists(tmp_path / "run")
  with Progress(10) as bar:
    bar.update(tokens=5, metrics={"loss": 1.0})
  assert capsys.readouterr().err == ""


def test_progress_shows_rate_metrics_and_does_not_flood_logs(capsys):
  n_steps = 500
  with Progress(n_steps, initial=100, desc="sft", show=("loss", "kl")) as bar:
    for _ in range(100, n_steps):
      bar.update(tokens=jnp.int32(64), metrics={"loss": jnp.float32(0.5), "grad_norm": 3.0})
  err = capsys.readouterr().err
  assert "sft" in err and "500/500" in err
  assert "loss=0.5" in err and "tok/s=" in err
  assert "grad_norm" not in err and "kl=" not in err  # only the chosen metrics, when present
  # stderr is not a tty under pytest: the bar draws at start and at close, not 400 times.
  assert err.count("\r") <= 3


def test_progress_tokens_per_second_is_smoothed_rate(monkeypatch):
  bar = Progress(10)
  clock = [bar._last_time]
  monkeypatch.setattr(metrics_lib.time, "time", lambda: clock[0])
  for _ in range(5):
    clock[0] += 2.0
    bar._pending_tokens = 1000
    postfix = bar._postfix()
  assert postfix == "tok/s=500"
  bar.close()


def test_format_table_alignment():
  rows = [
      {"method": "sft", "gold_reward": 0.5, "win_rate": 0.25, "steps": 100},
      {"method": "dpo (beta=0.1)", "gold_reward": 1.23456, "steps": 2000},
      {
          "method": "ppo",
          "gold_reward": jnp.float32(-0.75),
          "win_rate": np.float64(0.5),
          "steps": np.int64(7),
      },
  ]
  table = format_table(rows, floatfmt=".2f")
  assert table.splitlines() == [
      "method          gold_reward  win_rate  steps",
      "--------------  -----------  --------  -----",
      "sft                    0.50      0.25    100",
      "dpo (beta=0.1)         1.23             2000",
      "ppo                   -0.75      0.50      7",
  ]
  chosen = format_table(rows, columns=["steps", "method"])
  assert chosen.splitlines()[0] == "steps  method"
  assert chosen.splitlines()[4] == "    7  ppo"


def test_format_table_keeps_one_line_per_row():
  table = format_table([{"prompt": "hi", "before": "a\nb", "after": "ok"}])
  assert table.splitlines()[2] == "hi      a\\nb    ok"
  assert format_table([], columns=["a", "bb"]) == "a  bb\n-  --"


def test_bfloat16_scalars_are_logged_as_floats(tmp_path):
  # A bf16-parameter run's grad norm is a bf16 scalar: numpy does not count it as a number.
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {"grad_norm": jnp.asarray(1.5, jnp.bfloat16)})
  (row,) = read_jsonl(tmp_path / "metrics.jsonl")
  assert row["train/grad_norm"] == 1.5


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
  path = tmp_path / "deep" / "state.json"
  metrics_lib.write_json({"step": 1}, path)  # creates the folder
  assert json.loads(path.read_text()) == {"step": 1}

  def fail(f):
    f.write('{"step": 2, "half": ')
    raise RuntimeError("killed mid-write")

  with pytest.raises(RuntimeError, match="killed mid-write"):
    metrics_lib.atomic_write(path, fail)
  assert json.loads(path.read_text()) == {"step": 1}
  assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left
  metrics_lib.write_jsonl([{"a": "é"}, {"b": 2}], path.with_suffix(".jsonl"))
  assert path.with_suffix(".jsonl").read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'
