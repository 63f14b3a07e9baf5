"""The memory planner: per-device bytes of params and optimizer state are exact (checked against a
real train state on the same mesh), frozen models and algorithms count what they hold, activations
respond to batch and remat, and the CLI plans on fake devices and says when a plan does not fit.
How close the compiled activations are to a GPU's measured peak is recorded in docs/real_models.md ("Memory
planner"), not tested: no GPU here.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in tests/integration/tools/test_plan.py.
"""

import pytest

from rlhf_jax import sharding
from rlhf_jax.tools import plan as plan_lib
from tests.helpers.plan import build_tiny


@pytest.fixture(scope="module")
def tiny():
  return build_tiny()


def test_bad_plans_name_what_to_change(tiny):
  mesh = sharding.make_mesh((1, 8, 1))
  with pytest.raises(ValueError, match="accum_steps=3"):
    plan_lib.plan(tiny, mesh, algorithm="sft", batch=8, seq_len=32, accum_steps=3)
  with pytest.raises(sharding.ShardingConfigError):
    plan_lib.plan(tiny, mesh, algorithm="sft", batch=4, seq_len=32)  # 4 rows over 8 batch shards
  with pytest.raises(ValueError, match="algorithm"):
    plan_lib.plan(tiny, mesh, algorithm="rlhf", batch=8, seq_len=32)
  with pytest.raises(ValueError, match="response_share=1.5"):
    plan_lib.plan(tiny, mesh, algorithm="sft", batch=8, seq_len=32, response_share=1.5)


def test_verdict_against_chip_memory():
  record = {"total_per_device": 70e9}
  assert plan_lib.verdict(record, "h100", 0.1)["fits"]  # 72 GB usable of 80
  assert not plan_lib.verdict(record, "h100", 0.2)["fits"]  # 64 GB usable
  assert not plan_lib.verdict(record, "tpu-v5e", 0.0)["fits"]
