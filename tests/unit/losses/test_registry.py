"""The pair-loss registry (rlhf_jax/losses/registry.py): the built-in DPO family, their config
blocks, registering a new loss and the DPO driver's dispatch and checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.algorithms import dpo
from rlhf_jax.configs.base import base_config
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses import registry


def test_the_builtin_losses_each_have_their_own_config_block():
  losses = registry.pair_losses()
  assert set(losses) == {"sigmoid", "ipo", "hinge", "simpo", "orpo", "cpl"}
  assert [n for n, loss in losses.items() if not loss.reference] == ["simpo", "orpo"]
  block = base_config().dpo
  for name, loss in losses.items():
    assert block[name].to_dict() == loss.defaults, name
  assert losses["sigmoid"].defaults == {"beta": 0.1, "label_smoothing": 0.0}
  assert losses["cpl"].defaults == {"alpha": 0.1, "lam": 0.5}


def test_defaults_must_name_exactly_the_keyword_arguments():
  def loss(pairs, *, beta, lam):
    return 0.0, {}

  with pytest.raises(ValueError, match=r"\['beta'\] must name exactly .* \['beta', 'lam'\]"):
    registry.register_pair_loss("test_bad_defaults", beta=0.1)(loss)
  assert "test_bad_defaults" not in registry.pair_losses()
  with pytest.raises(KeyError, match=r"'sigmod' \(did you mean 'sigmoid'\?\)"):
    registry.get_pair_loss("sigmod")


def test_a_name_registered_twice_by_two_functions_is_an_error():
  def loss(pairs, *, beta):
    return 0.0, {}

  def other(pairs, *, beta):
    return 1.0, {}

  registry.register_pair_loss("test_twice", beta=0.1)(loss)
  try:
    registry.register_pair_loss("test_twice", beta=0.1)(loss)  # the same function: fine
    with pytest.raises(
        ValueError, match=r"'test_twice' is registered twice: by .*\.loss and .*other"
    ):
      registry.register_pair_loss("test_twice", beta=0.1)(other)
    assert registry.get_pair_loss("test_twice").fn is loss
  finally:
    registry.unregister_pair_loss("test_twice")


def _pairs(n=6, seed=0):
  rng = np.random.default_rng(seed)
  lengths = jnp.asarray(rng.integers(1, 9, (n, 2)), jnp.int32)
  logps = jnp.asarray(-rng.uniform(0.2, 3.0, (n, 2)) * np.asarray(lengths), jnp.float32)
  ref = jnp.asarray(rng.normal(-10, 2, (n, 2)), jnp.float32)
  weight = jnp.asarray([1, 1, 0, 1, 1, 0][:n], jnp.float32)
  return logps, lengths, ref, weight


def test_a_registered_loss_is_configurable_and_the_driver_dispatches_to_it():
  seen = {}

  @registry.register_pair_loss("test_margin", scale=1.0)
  def margin_loss(pairs: registry.PairLogps, *, scale):
    """A toy loss: minus the weighted mean policy margin, scaled."""
    seen["pairs"] = pairs
    margin = (pairs.chosen - pairs.ref_chosen) - (pairs.rejected - pairs.ref_rejected)
    loss = -scale * jnp.sum(pairs.weight * margin) / jnp.maximum(jnp.sum(pairs.weight), 1.0)
    return loss, {"loss": loss, "loss_weight": jnp.sum(pairs.weight)}

  try:
    cfg = base_config().dpo  # made after registering: it has the loss's block
    cfg.loss_type = "test_margin"
    cfg.test_margin.scale = 2.0
    dpo.check_loss_config(cfg)
    logps, lengths, ref, weight = _pairs()
    loss, _ = dpo.pair_loss(cfg, logps, lengths, ref, weight)
    w = np.asarray(weight)
    margin = (np.asarray(logps) - np.asarray(ref)) @ np.asarray([1.0, -1.0])
    np.testing.assert_allclose(loss, -2.0 * np.sum(w * margin) / np.sum(w), rtol=1e-6)
    np.testing.assert_array_equal(seen["pairs"].chosen_len, lengths[:, 0])
    cfg.reference_free = True  # the reference's log-probs become zeros
    dpo.pair_loss(cfg, logps, lengths, ref, weight)
    np.testing.assert_array_equal(seen["pairs"].ref_chosen, np.zeros(6))
    cfg.test_margin.typo = 1.0
    with pytest.raises(ConfigError, match="config.dpo.test_margin.typo is not a hyper-parameter"):
      dpo.check_loss_config(cfg)
  finally:
    registry.unregister_pair_loss("test_margin")


def test_the_driver_rejects_a_loss_setting_outside_the_losss_block():
  cfg = base_config().dpo
  cfg.beta = 0.5  # the old place: it would be silently ignored
  with pytest.raises(ConfigError, match=r"config.dpo.beta is not a DPO option.*sigmoid: beta"):
    dpo.check_loss_config(cfg)
  cfg = base_config().dpo
  cfg.loss_type = "nope"
  with pytest.raises(ConfigError, match="config.dpo.loss_type='nope'; choose one of cpl, hinge"):
    dpo.check_loss_config(cfg)
