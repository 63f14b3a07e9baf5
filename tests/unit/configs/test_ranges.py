"""Every numeric config field has a range, checked before any work (rlhf_jax/configs/ranges.py):
table-driven over every numeric field of every experiment file's config."""

import importlib.util
import math
from pathlib import Path

import pytest

from rlhf_jax.configs import ranges
from rlhf_jax.configs.base import base_config
from rlhf_jax.errors import ConfigError
from tests.helpers import ROOT_PATH

EXPERIMENTS = sorted((ROOT_PATH / "experiments").glob("*.py"))


def _load(path: Path):
  spec = importlib.util.spec_from_file_location(f"_exp_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _set(config, path, value):
  block = config
  for key in path[:-1]:
    block = block[key]
  block[path[-1]] = value


def test_range_rules():
  assert ranges.COUNT.contains(1) and not ranges.COUNT.contains(0)
  assert not ranges.COUNT.contains(2.5) and ranges.COUNT.describe() == "a whole number >= 1"
  assert ranges.POSITIVE.describe() == "a finite number > 0" and ranges.POSITIVE.outside() == 0
  assert not ranges.POSITIVE.contains(math.nan) and not ranges.POSITIVE.contains(math.inf)
  assert ranges.Range(0, 1, hi_open=True).describe() == "a finite number >= 0 and < 1"
  assert ranges.rule(("stage", "train", "eval_every")) == ranges.COUNT
  assert ranges.rule(("ppo", "eval_every")) == ranges.OPTIONAL_COUNT  # PPO's 0 = never
  assert ranges.rule(("ppo", "kl", "beta")).contains(0)
  assert not ranges.rule(("kto", "beta")).contains(0)
  # A DPO-family loss's own fields are its own checks' (a registered loss's `lam` may be 50).
  assert ranges.loss_block(("dpo", "cpl", "lam")) and ranges.loss_block(
      ("dpo_on", "sigmoid", "beta")
  )
  assert ranges.rule(("dpo", "cpl", "lam")) is None and not ranges.loss_block(("ppo", "lam"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_numeric_field_of_every_experiment_is_range_checked(path):
  """Each field has a rule, the committed value is inside it, and a value outside it stops
  `check_ranges` with one message naming the key, the value and the range."""
  config = _load(path)
  ranges.check_ranges(config)
  fields = list(ranges.numeric_fields(config))
  fields = [(p, v) for p, v in fields if not ranges.loss_block(p)]  # the losses' own checks
  unruled = sorted(".".join(p) for p, _ in fields if ranges.rule(p) is None)
  assert (
      not unruled
  ), f"numeric fields without a range (add them to rlhf_jax/configs/ranges.py): {unruled}"
  seen = set()
  for field, value in fields:
    rule = ranges.rule(field)
    if (field[-2:], rule) in seen:  # the same field of another stage: the same rule and check
      continue
    seen.add((field[-2:], rule))
    bad = rule.outside()
    _set(config, field, type(value)(bad) if isinstance(value, int) and bad == int(bad) else bad)
    key = "config." + ".".join(field)
    with pytest.raises(ConfigError, match=rf"^{key}=\S+ is out of range: must be "):
      ranges.check_ranges(config)
    _set(config, field, value)


def test_base_config_and_wrong_types():
  config = base_config()
  ranges.check_ranges(config)
  config.optim.lr = -1.0
  with pytest.raises(
      ConfigError, match=r"config\.optim\.lr=-1\.0 is out of range: must be a finite number > 0"
  ):
    ranges.check_ranges(config)
  config.optim.lr = 1e-3
  config.train.batch_size = 0
  with pytest.raises(ConfigError, match=r"config\.train\.batch_size=0 .* a whole number >= 1"):
    ranges.check_ranges(config)
