"""Checkpointer and params exports on 8 fake CPU devices.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/train/test_checkpoint.py.
"""

import numpy as np
import pytest

from rlhf_jax.train import checkpoint as ckpt_lib


def test_too_little_disk_fails_before_training_naming_the_numbers(tmp_path, monkeypatch):
  from rlhf_jax.algorithms import sft
  from tests.helpers.sft import tiny_config

  usage = ckpt_lib.shutil.disk_usage(tmp_path)
  monkeypatch.setattr(
      ckpt_lib.shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20)
  )  # 3 MiB
  config = tiny_config(steps=4)
  with pytest.raises(
      ckpt_lib.WorkdirError,
      match=r"has 0\.00 GiB free, but this run needs about 0\.0\d GiB: 3 \+ 1 "
      r"checkpoints of .*keep_checkpoints=3",
  ):
    sft.train(config, str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "export").exists()
  assert not list((tmp_path / "checkpoints").glob("*"))  # no step was trained or saved
  # A resumed run's checkpoints are already on disk: only the new ones need room.
  state = {"w": np.zeros((2**18,), np.float32)}  # 1 MiB
  with pytest.raises(ckpt_lib.WorkdirError, match="3 \\+ 1 checkpoints of 0.00 GiB"):
    ckpt_lib.check_free_space(tmp_path / "resumed", state, keep=3)  # 4 MiB > 3 MiB
  for step in ("1", "2"):
    (tmp_path / "resumed" / "checkpoints" / step).mkdir(parents=True)
  ckpt_lib.check_free_space(tmp_path / "resumed", state, keep=3)  # 2 more: 2 MiB
