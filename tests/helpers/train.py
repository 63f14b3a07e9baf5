"""The optimiser tests' config builder (tests/{unit,integration}/train/test_train.py)."""

from rlhf_jax.configs.base import base_config


def _optim_cfg(**kw):
  c = base_config().optim
  c.update(**kw)
  return c
