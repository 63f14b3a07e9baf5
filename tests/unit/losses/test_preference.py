"""DPO / IPO / cDPO / hinge, CPL, KTO, ORPO and SimPO losses vs NumPy loops and TRL's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.losses import preference as pref

RTOL = 1e-5
ATOL = 1e-5

# Jitted once per shape (eager dispatch compiles every primitive separately). Options that select
# code paths are static; numeric hyper-parameters are traced (so they are not validated here).
dpo_loss = jax.jit(pref.dpo_loss, static_argnames=("loss_type", "reference_free"))
cpl_loss = jax.jit(pref.cpl_loss)
kto_loss = jax.jit(pref.kto_loss)
orpo_loss = jax.jit(pref.orpo_loss)
simpo_loss = jax.jit(pref.simpo_loss)

B = 16


def _log_sigmoid(x):
  """log sigmoid(x), stable, float64."""
  x = np.asarray(x, np.float64)
  return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _f64(*arrays):
  return [np.asarray(a, np.float64) for a in arrays]


def _logps(rng, b=B, lo=-60.0, hi=-5.0):
  return rng.uniform(lo, hi, size=b).astype(np.float32)


def _dpo_inputs(seed, b=B):
  """Policy / reference log-probs whose log-ratio differences h are O(10), both signs."""
  rng = np.random.default_rng(seed)
  ref_c, ref_r = _logps(rng, b), _logps(rng, b)
  pi_c = (ref_c + rng.normal(size=b) * 5).astype(np.float32)
  pi_r = (ref_r + rng.normal(size=b) * 5).astype(np.float32)
  return pi_c, pi_r, ref_c, ref_r


def _assert_metrics(metrics, loss, chosen_rewards, rejected_rewards):
  np.testing.assert_allclose(metrics["loss"], loss, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      metrics["rewards/chosen"], np.mean(chosen_rewards), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      metrics["rewards/rejected"], np.mean(rejected_rewards), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      metrics["rewards/margin"], np.mean(chosen_rewards - rejected_rewards), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      metrics["rewards/accuracy"], np.mean(chosen_rewards > rejected_rewards), rtol=RTOL
  )
  assert metrics["loss_weight"].dtype == jnp.float32
  assert float(metrics["loss_weight"]) == len(chosen_rewards)


def _finite_grads(fn, *args):
  grads = jax.grad(fn, argnums=tuple(range(len(args))))(*(jnp.asarray(a) for a in args))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))), g
  return grads


# --- dpo_loss ------------------------------------------------------------------------------------


def _dpo_ref_loop(pi_c, pi_r, ref_c, ref_r, beta, loss_type, eps, reference_free):
  """Paper formulas, one pair at a time."""
  losses = []
  for b in range(len(pi_c)):
    rc = 0.0 if reference_free else float(ref_c[b])
    rr = 0.0 if reference_free else float(ref_r[b])
    h = (float(pi_c[b]) - rc) - (float(pi_r[b]) - rr)
    if loss_type == "sigmoid":
      # cDPO (Mitchell 2023): the label is flipped with probability eps.
      loss = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    elif loss_type == "ipo":
      loss = (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023, eq. 17
    else:
      loss = max(0.0, 1 - beta * h)
    losses.append(loss)
  return float(np.mean(losses))


def _trl_dpo(pi_c, pi_r, ref_c, ref_r, beta, loss_type, label_smoothing, reference_free):
  """TRL DPOTrainer.dpo_loss (loss_type "sigmoid" / "ipo" / "hinge"), transliterated to NumPy."""
  pi_c, pi_r, ref_c, ref_r = _f64(pi_c, pi_r, ref_c, ref_r)
  logratios = pi_c - pi_r
  ref_logratios = 0.0 if reference_free else ref_c - ref_r
  logits = logratios - ref_logratios
  if loss_type == "sigmoid":
    losses = (
        -_log_sigmoid(beta * logits) * (1 - label_smoothing)
        - _log_sigmoid(-beta * logits) * label_smoothing
    )
  elif loss_type == "hinge":
    losses = np.maximum(0.0, 1 - beta * logits)
  else:
    losses = (logits - 1 / (2 * beta)) ** 2
  if reference_free:
    ref_c, ref_r = 0.0, 0.0
  chosen_rewards = beta * (pi_c - ref_c)
  rejected_rewards = beta * (pi_r - ref_r)
  return losses.mean(), chosen_rewards, rejected_rewards


@pytest.mark.parametrize(
    "loss_type,eps,reference_free,beta",
    [
        ("sigmoid", 0.0, False, 0.1),
        ("sigmoid", 0.2, False, 0.5),
        ("sigmoid", 0.0, True, 0.1),
        ("ipo", 0.0, False, 0.1),
        ("ipo", 0.0, True, 1.0),
        ("hinge", 0.0, False, 0.1),
        ("hinge", 0.0, True, 0.3),
    ],
)
def test_dpo_matches_numpy_and_trl(loss_type, eps, reference_free, beta):
  pi_c, pi_r, ref_c, ref_r = _dpo_inputs(0)
  ref_args = (ref_c, ref_r)
  if reference_free:  # never read: garbage must not leak
    ref_args = (np.full(B, np.nan, np.float32), np.full(B, np.nan, np.float32))
  loss, metrics = dpo_loss(
      *(jnp.asarray(a) for a in (pi_c, pi_r, *ref_args)),
      beta=beta,
      loss_type=loss_type,
      label_smoothing=eps,
      reference_free=reference_free,
  )
  assert loss.dtype == jnp.float32
  expected = _dpo_ref_loop(pi_c, pi_r, ref_c, ref_r, beta, loss_type, eps, reference_free)
  np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
  trl_loss, trl_chosen, trl_rejected = _trl_dpo(
      pi_c, pi_r, ref_c, ref_r, beta, loss_type, eps, reference_free
  )
  np.testing.assert_allclose(loss, trl_loss, rtol=RTOL, atol=ATOL)
  _assert_metrics(metrics, trl_loss, trl_chosen, trl_rejected)


def test_dpo_hand_computed_values():
  # h = 0 everywhere: sigmoid -> log 2, IPO -> 1 / (4 beta^2), hinge -> 1.
  z = jnp.zeros(4)
  beta = 0.25
  np.testing.assert_allclose(dpo_loss(z, z, z, z, beta=beta)[0], math.log(2), rtol=RTOL)
  np.testing.assert_allclose(
      dpo_loss(z, z, z, z, beta=beta, loss_type="ipo")[0], 1 / (4 * beta**2), rtol=RTOL
  )
  np.testing.assert_allclose(dpo_loss(z, z, z, z, beta=beta, loss_type="hinge")[0], 1.0, rtol=RTOL)
  # h = 2 / beta: the hinge is satisfied exactly at 1 / beta; IPO is (2/beta - 1/(2 beta))^2.
  pc = jnp.full(4, 8.0)
  np.testing.assert_allclose(dpo_loss(pc, z, z, z, beta=beta, loss_type="hinge")[0], 0.0, atol=0)
  np.testing.assert_allclose(dpo_loss(pc, z, z, z, beta=beta, loss_type="ipo")[0], 36.0, rtol=RTOL)
  # cDPO with eps: -(1-eps) log sigmoid(2) - eps log sigmoid(-2).
  expected = -0.9 * math.log(1 / (1 + math.exp(-2))) - 0.1 * math.log(1 / (1 + math.exp(2)))
  np.testing.assert_allclose(
      dpo_loss(pc, z, z, z, beta=beta, label_smoothing=0.1)[0], expected, rtol=RTOL
  )


def test_dpo_gradient_matches_analytic():
  pi_c, pi_r, ref_c, ref_r = _dpo_inputs(1)
  beta, eps = 0.1, 0.1

  def f(a, b):
    return dpo_loss(a, b, jnp.asarray(ref_c), jnp.asarray(ref_r), beta=beta, label_smoothing=eps)[0]

  g_c, g_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(pi_c), jnp.asarray(pi_r))
  h = (pi_c.astype(np.float64) - ref_c) - (pi_r.astype(np.float64) - ref_r)
  # d/dh [-(1-eps) log s(beta h) - eps log s(-beta h)] = -beta ((1-eps) s(-beta h) - eps s(beta h)).
  dh = -beta * ((1 - eps) * _sigmoid(-beta * h) - eps * _sigmoid(beta * h)) / B
  np.testing.assert_allclose(g_c, dh, rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(g_r, -dh, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("loss_type", pref.DPO_LOSS_TYPES)
def test_dpo_extreme_inputs_finite(loss_type):
  pi_c = np.asarray([-500.0, -1e-3, -500.0, -0.0], np.float32)
  pi_r = np.asarray([-1e-3, -500.0, -500.0, -500.0], np.float32)
  ref_c = np.asarray([-1e-3, -500.0, -250.0, -500.0], np.float32)
  ref_r = np.asarray([-500.0, -1e-3, -250.0, -0.0], np.float32)

  def f(*args):
    return dpo_loss(*args, beta=0.5, loss_type=loss_type)[0]

  assert np.isfinite(float(f(*(jnp.asarray(a) for a in (pi_c, pi_r, ref_c, ref_r)))))
  _finite_grads(f, pi_c, pi_r, ref_c, ref_r)


def test_dpo_bad_arguments():
  z = jnp.zeros(3)
  with pytest.raises(ValueError, match="unknown loss_type 'robust'"):
    pref.dpo_loss(z, z, z, z, loss_type="robust")
  for beta in (0.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match="beta must be > 0"):
      pref.dpo_loss(z, z, z, z, beta=beta)
  for eps in (-0.1, 0.5, 0.7):
    with pytest.raises(ValueError, match="label_smoothing must be in"):
      pref.dpo_loss(z, z, z, z, label_smoothing=eps)
  with pytest.raises(ValueError, match="loss_type='sigmoid' only"):
    pref.dpo_loss(z, z, z, z, loss_type="ipo", label_smoothing=0.1)
  with pytest.raises(AssertionError):
    pref.dpo_loss(z, z, z, jnp.zeros(4))
  with pytest.raises(AssertionError):
    pref.dpo_loss(z[None], z[None], z[None], z[None])


# --- cpl_loss ------------------------------------------------------------------------------------


def _cpl_ref_loop(chosen, rejected, alpha, lam, ref_c=None, ref_r=None):
  """Hejna et al. 2023: -log [exp(S+) / (exp(S+) + exp(lam S-))], one pair at a time."""
  losses = []
  for b in range(len(chosen)):
    s_pos = alpha * (float(chosen[b]) - (0.0 if ref_c is None else float(ref_c[b])))
    s_neg = alpha * (float(rejected[b]) - (0.0 if ref_r is None else float(ref_r[b])))
    top = max(s_pos, lam * s_neg)  # log-sum-exp shift
    log_den = top + math.log(math.exp(s_pos - top) + math.exp(lam * s_neg - top))
    losses.append(log_den - s_pos)
  return float(np.mean(losses))


@pytest.mark.parametrize(
    "alpha,lam,with_ref", [(0.1, 0.5, False), (0.1, 0.5, True), (1.0, 1.0, False), (0.3, 0.8, True)]
)
def test_cpl_matches_numpy(alpha, lam, with_ref):
  pi_c, pi_r, ref_c, ref_r = _dpo_inputs(2)
  refs = (
      dict(ref_chosen_logps=jnp.asarray(ref_c), ref_rejected_logps=jnp.asarray(ref_r))
      if with_ref
      else {}
  )
  loss, metrics = cpl_loss(jnp.asarray(pi_c), jnp.asarray(pi_r), alpha=alpha, lam=lam, **refs)
  expected = _cpl_ref_loop(pi_c, pi_r, alpha, lam, *((ref_c, ref_r) if with_ref else ()))
  np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
  adv_c = alpha * (pi_c.astype(np.float64) - (ref_c if with_ref else 0.0))
  adv_r = alpha * (pi_r.astype(np.float64) - (ref_r if with_ref else 0.0))
  _assert_metrics(metrics, expected, adv_c, adv_r)


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_cpl_with_lam1_and_reference_is_dpo(beta):
  pi_c, pi_r, ref_c, ref_r = (jnp.asarray(a) for a in _dpo_inputs(3))
  cpl, cpl_metrics = cpl_loss(
      pi_c, pi_r, alpha=beta, lam=1.0, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r
  )
  dpo, dpo_metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type="sigmoid")
  np.testing.assert_allclose(cpl, dpo, rtol=1e-6, atol=1e-6)
  for key in dpo_metrics:
    np.testing.assert_allclose(cpl_metrics[key], dpo_metrics[key], rtol=1e-6, atol=1e-6)
  g_cpl = jax.grad(
      lambda a, b: cpl_loss(
          a, b, alpha=beta, lam=1.0, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r
      )[0],
      argnums=(0, 1),
  )(pi_c, pi_r)
  g_dpo = jax.grad(lambda a, b: dpo_loss(a, b, ref_c, ref_r, beta=beta)[0], argnums=(0, 1))(
      pi_c, pi_r
  )
  for a, b in zip(g_cpl, g_dpo):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_cpl_extreme_inputs_finite():
  c = np.asarray([-500.0, -1e-3, -500.0, 0.0], np.float32)
  r = np.asarray([-1e-3, -500.0, -500.0, -500.0], np.float32)

  def f(a, b):
    return cpl_loss(a, b, alpha=1.0, lam=0.5)[0]

  assert np.isfinite(float(f(jnp.asarray(c), jnp.asarray(r))))
  _finite_grads(f, c, r)


def test_cpl_bad_arguments():
  z = jnp.zeros(3)
  with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
    pref.cpl_loss(z, z, ref_chosen_logps=z)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    pref.cpl_loss(z, z, alpha=0.0)
  for lam in (0.0, 1.5):
    with pytest.raises(ValueError, match="lam must be in"):
      pref.cpl_loss(z, z, lam=lam)


# --- kto_loss ------------------------------------------------------------------------------------


def _kto_inputs(seed, b=B):
  rng = np.random.default_rng(seed)
  ref = _logps(rng, b)
  pi = (ref + rng.normal(size=b) * 5).astype(np.float32)
  desirable = rng.random(b) < 0.6
  desirable[:2] = [True, False]
  return pi, ref, desirable


def _kto_ref_loop(pi, ref, desirable, kl, beta, w_d, w_u):
  """Ethayarajh et al. 2024, eq. 8 (lambda_y - v(x, y)), one example at a time."""
  z0 = max(float(kl), 0.0)
  losses = []
  for b in range(len(pi)):
    r = float(pi[b]) - float(ref[b])
    if desirable[b]:
      losses.append(w_d * (1 - 1 / (1 + math.exp(-beta * (r - z0)))))
    else:
      losses.append(w_u * (1 - 1 / (1 + math.exp(-beta * (z0 - r)))))
  return float(np.mean(losses))


def _trl_kto(pi, ref, desirable, kl, beta, w_d, w_u):
  """TRL KTOTrainer.kto_loss (loss_type "kto") then `losses.nanmean()`, in NumPy."""
  pi, ref = _f64(pi, ref)
  kl = max(float(kl), 0.0)  # `.clamp(min=0)` after gathering the KL over processes
  chosen_logratios = pi[desirable] - ref[desirable]
  rejected_logratios = pi[~desirable] - ref[~desirable]
  chosen_losses = 1 - _sigmoid(beta * (chosen_logratios - kl))
  rejected_losses = 1 - _sigmoid(beta * (kl - rejected_logratios))
  losses = np.concatenate([w_d * chosen_losses, w_u * rejected_losses])
  return losses.mean(), beta * chosen_logratios, beta * rejected_logratios, kl


@pytest.mark.parametrize(
    "kl,beta,w_d,w_u", [(0.7, 0.1, 1.0, 1.0), (-2.0, 0.1, 1.0, 1.0), (3.0, 0.5, 1.33, 0.8)]
)
def test_kto_matches_numpy_and_trl(kl, beta, w_d, w_u):
  pi, ref, desirable = _kto_inputs(4)
  loss, metrics = kto_loss(
      jnp.asarray(pi),
      jnp.asarray(ref),
      jnp.asarray(desirable),
      jnp.float32(kl),
      beta=beta,
      desirable_weight=w_d,
      undesirable_weight=w_u,
  )
  expected = _kto_ref_loop(pi, ref, desirable, kl, beta, w_d, w_u)
  np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
  trl_loss, trl_chosen, trl_rejected, trl_kl = _trl_kto(pi, ref, desirable, kl, beta, w_d, w_u)
  np.testing.assert_allclose(loss, trl_loss, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["loss"], trl_loss, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["rewards/chosen"], trl_chosen.mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["rewards/rejected"], trl_rejected.mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      metrics["rewards/margin"], trl_chosen.mean() - trl_rejected.mean(), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(metrics["kl"], trl_kl, rtol=RTOL)
  assert float(metrics["num_desirable"]) == desirable.sum()
  assert float(metrics["loss_weight"]) == B


def test_kto_kl_gets_no_gradient_and_one_sided_batches():
  pi, ref, desirable = _kto_inputs(5)
  args = (jnp.asarray(pi), jnp.asarray(ref))
  g_kl = jax.grad(lambda kl: kto_loss(*args, jnp.asarray(desirable), kl)[0])(jnp.float32(1.0))
  assert float(g_kl) == 0.0
  # All desirable: the rejected-reward mean is over no example and reads 0, not NaN.
  loss, metrics = kto_loss(*args, jnp.ones(B, bool), jnp.float32(0.5))
  np.testing.assert_allclose(
      loss, _kto_ref_loop(pi, ref, np.ones(B, bool), 0.5, 0.1, 1, 1), rtol=RTOL
  )
  assert float(metrics["rewards/rejected"]) == 0.0 and float(metrics["num_desirable"]) == B


def test_kto_extreme_inputs_finite():
  pi = np.asarray([-500.0, -1e-3, -500.0, 0.0], np.float32)
  ref = np.asarray([-1e-3, -500.0, -500.0, -500.0], np.float32)
  desirable = jnp.asarray([True, False, True, False])

  def f(a, b):
    return kto_loss(a, b, desirable, jnp.float32(400.0), beta=1.0)[0]

  assert np.isfinite(float(f(jnp.asarray(pi), jnp.asarray(ref))))
  _finite_grads(f, pi, ref)


def test_kto_bad_arguments():
  z = jnp.zeros(3)
  d = jnp.asarray([True, False, True])
  with pytest.raises(ValueError, match="beta must be > 0"):
    pref.kto_loss(z, z, d, jnp.float32(0.0), beta=-1.0)
  with pytest.raises(ValueError, match="undesirable_weight must be >= 0"):
    pref.kto_loss(z, z, d, jnp.float32(0.0), undesirable_weight=-1.0)
  with pytest.raises(AssertionError):  # the KL estimate is a scalar, not per example
    pref.kto_loss(z, z, d, z)


# --- orpo_loss -----------------------------------------------------------------------------------


def _orpo_inputs(seed, b=B):
  rng = np.random.default_rng(seed)
  # Length-averaged log-probs: per-token values, from near-certain to unlikely tokens.
  lp_c = -rng.uniform(0.01, 3.0, size=b).astype(np.float32)
  lp_r = -rng.uniform(0.01, 3.0, size=b).astype(np.float32)
  return lp_c, lp_r, np.float32(rng.uniform(0.5, 2.0))


def _orpo_ref_loop(lp_c, lp_r, nll, beta):
  """Hong et al. 2024, eq. 6-7: odds(y) = p / (1 - p) with p = exp(mean log-prob)."""
  terms = []
  for b in range(len(lp_c)):
    p_c, p_r = math.exp(float(lp_c[b])), math.exp(float(lp_r[b]))
    log_or = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    terms.append(-math.log(1 / (1 + math.exp(-log_or))))
  return float(nll) + beta * float(np.mean(terms))


def _trl_orpo(lp_c, lp_r, nll, beta):
  """TRL ORPOTrainer.odds_ratio_loss, then `loss = policy_nll_loss - losses.mean()`."""
  lp_c, lp_r = _f64(lp_c, lp_r)
  log_odds = (lp_c - lp_r) - (np.log1p(-np.exp(lp_c)) - np.log1p(-np.exp(lp_r)))
  ratio = _log_sigmoid(log_odds)
  losses = beta * ratio
  return float(nll) - losses.mean(), beta * lp_c, beta * lp_r, ratio.mean(), log_odds.mean()


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_numpy_and_trl(beta):
  lp_c, lp_r, nll = _orpo_inputs(6)
  loss, metrics = orpo_loss(jnp.asarray(lp_c), jnp.asarray(lp_r), jnp.asarray(nll), beta=beta)
  np.testing.assert_allclose(loss, _orpo_ref_loop(lp_c, lp_r, nll, beta), rtol=RTOL, atol=ATOL)
  trl_loss, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = _trl_orpo(lp_c, lp_r, nll, beta)
  np.testing.assert_allclose(loss, trl_loss, rtol=RTOL, atol=ATOL)
  _assert_metrics(metrics, trl_loss, trl_chosen, trl_rejected)
  np.testing.assert_allclose(metrics["nll_loss"], nll, rtol=RTOL)
  np.testing.assert_allclose(metrics["log_odds_ratio"], trl_ratio, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(metrics["log_odds_chosen"], trl_log_odds, rtol=RTOL, atol=ATOL)


def test_log1mexp_is_accurate_near_and_far_from_zero():
  x = np.asarray([-1e-6, -1e-4, -0.1, -0.69, -0.7, -1.0, -5.0, -30.0, -100.0, -500.0], np.float32)
  expected = np.log(-np.expm1(x.astype(np.float64)))  # exact enough in float64
  # Relative accuracy near 0 (where log1p(-exp(x)) would lose it); ~1e-13 values far out only
  # need to be tiny (float32 exp(-30) itself is approximate).
  np.testing.assert_allclose(
      jax.jit(pref._log1mexp)(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-12
  )
  grads = jax.vmap(jax.grad(pref._log1mexp))(jnp.asarray(x))
  # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x).
  np.testing.assert_allclose(grads, -1.0 / np.expm1(-x.astype(np.float64)), rtol=1e-5, atol=1e-12)


def test_orpo_extreme_inputs_finite():
  # Mean log-probs at and near 0 (every token certain) and far below.
  lp_c = np.asarray([-1e-8, 0.0, -500.0, -1e-6, -1e-3, -500.0, 0.0, -1e-8], np.float32)
  lp_r = np.asarray([-500.0, -500.0, -1e-8, -1e-6, 0.0, -500.0, 0.0, -1e-7], np.float32)

  def f(a, b, nll):
    return orpo_loss(a, b, nll, beta=0.1)[0]

  loss = f(jnp.asarray(lp_c), jnp.asarray(lp_r), jnp.float32(1.0))
  assert np.isfinite(float(loss))
  _finite_grads(f, lp_c, lp_r, np.float32(1.0))
  # Pairs away from the clamp still match TRL's formula in float64.
  keep = [3, 5]
  trl_loss = _trl_orpo(lp_c[keep], lp_r[keep], 1.0, 0.1)[0]
  np.testing.assert_allclose(
      f(jnp.asarray(lp_c[keep]), jnp.asarray(lp_r[keep]), jnp.float32(1.0)), trl_loss, rtol=RTOL
  )


def test_orpo_bad_arguments():
  z = jnp.zeros(3) - 1.0
  with pytest.raises(ValueError, match="beta must be > 0"):
    pref.orpo_loss(z, z, jnp.float32(1.0), beta=0.0)
  with pytest.raises(AssertionError):  # chosen_nll is the batch's token-mean NLL, a scalar
    pref.orpo_loss(z, z, z)


# --- simpo_loss ----------------------------------------------------------------------------------


def _simpo_inputs(seed, b=B):
  rng = np.random.default_rng(seed)
  len_c = rng.integers(1, 40, size=b).astype(np.int32)
  len_r = rng.integers(1, 40, size=b).astype(np.int32)
  lp_c = (-rng.uniform(0.1, 2.0, size=b) * len_c).astype(np.float32)
  lp_r = (-rng.uniform(0.1, 2.0, size=b) * len_r).astype(np.float32)
  return lp_c, lp_r, len_c, len_r


def _simpo_ref_loop(lp_c, lp_r, len_c, len_r, beta, gamma, eps):
  """Meng et al. 2024, eq. 6 (with cDPO label smoothing), one pair at a time."""
  losses = []
  for b in range(len(lp_c)):
    z = beta * float(lp_c[b]) / int(len_c[b]) - beta * float(lp_r[b]) / int(len_r[b]) - gamma
    losses.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
  return float(np.mean(losses))


def _trl_simpo(lp_c, lp_r, len_c, len_r, beta, gamma, label_smoothing):
  """TRL CPOTrainer.cpo_loss with loss_type "simpo" (average_log_prob=True, cpo_alpha=0)."""
  avg_c, avg_r = _f64(lp_c / len_c, lp_r / len_r)
  logits = avg_c - avg_r
  gamma_logratios = gamma / beta
  logits = logits - gamma_logratios
  losses = (
      -_log_sigmoid(beta * logits) * (1 - label_smoothing)
      - _log_sigmoid(-beta * logits) * label_smoothing
  )
  return losses.mean(), beta * avg_c, beta * avg_r


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (2.0, 0.0, 0.3)])
def test_simpo_matches_numpy_and_trl(beta, gamma, eps):
  lp_c, lp_r, len_c, len_r = _simpo_inputs(7)
  loss, metrics = simpo_loss(
      *(jnp.asarray(a) for a in (lp_c, lp_r, len_c, len_r)),
      beta=beta,
      gamma=gamma,
      label_smoothing=eps,
  )
  np.testing.assert_allclose(
      loss, _simpo_ref_loop(lp_c, lp_r, len_c, len_r, beta, gamma, eps), rtol=RTOL, atol=ATOL
  )
  trl_loss, trl_chosen, trl_rejected = _trl_simpo(lp_c, lp_r, len_c, len_r, beta, gamma, eps)
  np.testing.assert_allclose(loss, trl_loss, rtol=RTOL, atol=ATOL)
  _assert_metrics(metrics, trl_loss, trl_chosen, trl_rejected)


def test_simpo_extreme_inputs_and_empty_response_finite():
  lp_c = np.asarray([-500.0, 0.0, -1e-3, -500.0], np.float32)
  lp_r = np.asarray([-1e-3, -500.0, 0.0, -500.0], np.float32)
  len_c = jnp.asarray([1, 0, 3, 500])
  len_r = jnp.asarray([2, 1, 0, 1])

  def f(a, b):
    return simpo_loss(a, b, len_c, len_r, beta=2.0, gamma=0.5)[0]

  loss = f(jnp.asarray(lp_c), jnp.asarray(lp_r))
  assert np.isfinite(float(loss))
  _finite_grads(f, lp_c, lp_r)
  # An empty response (length 0, sum 0) averages to 0.
  expected = _simpo_ref_loop(lp_c, lp_r, np.maximum(len_c, 1), np.maximum(len_r, 1), 2.0, 0.5, 0)
  np.testing.assert_allclose(loss, expected, rtol=RTOL)


def test_simpo_bad_arguments():
  z = jnp.zeros(3)
  n = jnp.ones(3)
  with pytest.raises(ValueError, match="beta must be > 0"):
    pref.simpo_loss(z, z, n, n, beta=0.0)
  with pytest.raises(ValueError, match="gamma must be >= 0"):
    pref.simpo_loss(z, z, n, n, gamma=-0.5)
  with pytest.raises(ValueError, match="label_smoothing must be in"):
    pref.simpo_loss(z, z, n, n, label_smoothing=0.5)
  with pytest.raises(AssertionError):
    pref.simpo_loss(z, z, n, jnp.ones(4))


# --- jit / sharding ------------------------------------------------------------------------------


def _all_losses(pi_c, pi_r, ref_c, ref_r, desirable, kl, lp_c, lp_r, nll, len_c, len_r):
  """Every loss on one batch; hyper-parameters closed over (static), as in a train step."""
  return {
      "dpo": pref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.1),
      "ipo": pref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="ipo"),
      "hinge": pref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="hinge"),
      "cpl": pref.cpl_loss(
          pi_c, pi_r, alpha=0.1, lam=0.5, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r
      ),
      "kto": pref.kto_loss(pi_c, ref_c, desirable, kl, beta=0.1, desirable_weight=1.33),
      "orpo": pref.orpo_loss(lp_c, lp_r, nll, beta=0.1),
      "simpo": pref.simpo_loss(pi_c, pi_r, len_c, len_r, beta=2.0, gamma=0.5),
  }


def _batch8(seed):
  pi_c, pi_r, ref_c, ref_r = _dpo_inputs(seed, b=8)
  _, _, desirable = _kto_inputs(seed, b=8)
  lp_c, lp_r, nll = _orpo_inputs(seed, b=8)
  _, _, len_c, len_r = _simpo_inputs(seed, b=8)
  return [pi_c, pi_r, ref_c, ref_r, desirable, np.float32(0.3), lp_c, lp_r, nll, len_c, len_r]


def test_eager_equals_jit():
  # Eager dispatch compiles op by op, so only the DPO and ORPO paths (the latter with its
  # two-branch log1mexp) are run eagerly; every other test runs under jit.
  args = [jnp.asarray(a) for a in _batch8(8)]
  pi_c, pi_r, ref_c, ref_r, lp_c, lp_r, nll = *args[:4], *args[6:9]
  for fn, jitted, fn_args in (
      (pref.dpo_loss, dpo_loss, (pi_c, pi_r, ref_c, ref_r)),
      (pref.orpo_loss, orpo_loss, (lp_c, lp_r, nll)),
  ):
    eager = fn(*fn_args, beta=0.1)
    for a, b in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted(*fn_args, beta=0.1))
    ):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_sharded_equals_unsharded():
  devices = np.asarray(jax.devices()[:8])
  assert devices.size == 8
  mesh = Mesh(devices, ("data",))
  row = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  args = _batch8(9)

  def put(a):
    return jax.device_put(a, row if np.ndim(a) == 1 else replicated)

  # One compiled program per placement: every loss, its metrics, and the gradient of their sum
  # w.r.t. each float per-example input.
  def total(*batch):
    out = _all_losses(*batch)
    return sum(loss for loss, _ in out.values()), out

  run = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2, 3, 6, 7), has_aux=True))
  ref, g_ref = run(*(jnp.asarray(a) for a in args))
  sh_args = [put(a) for a in args]
  assert len(sh_args[0].sharding.device_set) == 8
  out, g_sh = run(*sh_args)
  assert len(g_sh[0].sharding.device_set) == 8
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(ref)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6)
  for a, b in zip(g_sh, g_ref):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)


def test_dpo_weights_drop_the_empty_slots_of_a_packed_batch():
  rng = np.random.default_rng(5)
  logps = [jnp.asarray(rng.normal(-20, 5, 8), jnp.float32) for _ in range(4)]
  weight = jnp.asarray([1, 1, 0, 1, 0, 1, 1, 0], bool)
  keep = np.asarray(weight)
  loss, got = pref.dpo_loss(*logps, beta=0.3, weight=weight)
  ref_loss, expected = pref.dpo_loss(*[x[keep] for x in logps], beta=0.3)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
  assert float(got["loss_weight"]) == 5


# --- per-pair weights (empty slots of packed batches) --------------------------------------------


def _weighted_losses(name, seed, b=8):
  """(jitted fn(*arrays, weight), its per-example arrays, NumPy per-example losses, nll or None):
  the per-example terms whose weighted mean the loss is."""
  pi_c, pi_r, ref_c, ref_r = _dpo_inputs(seed, b)
  if name == "cpl":
    fn = lambda c, r, rc, rr, weight: pref.cpl_loss(
        c, r, alpha=0.3, lam=0.7, ref_chosen_logps=rc, ref_rejected_logps=rr, weight=weight
    )
    s_c, s_r = 0.3 * (pi_c.astype(np.float64) - ref_c), 0.3 * (pi_r.astype(np.float64) - ref_r)
    return fn, [pi_c, pi_r, ref_c, ref_r], -_log_sigmoid(s_c - 0.7 * s_r)
  if name == "simpo":
    lp_c, lp_r, len_c, len_r = _simpo_inputs(seed, b)
    fn = lambda c, r, lc, lr, weight: pref.simpo_loss(
        c, r, lc, lr, beta=2.0, gamma=0.5, label_smoothing=0.1, weight=weight
    )
    z = 2.0 * (lp_c.astype(np.float64) / len_c - lp_r.astype(np.float64) / len_r) - 0.5
    return fn, [lp_c, lp_r, len_c, len_r], -0.9 * _log_sigmoid(z) - 0.1 * _log_sigmoid(-z)
  if name == "orpo":
    lp_c, lp_r, _ = _orpo_inputs(seed, b)
    fn = lambda c, r, weight: pref.orpo_loss(c, r, jnp.float32(1.5), beta=0.2, weight=weight)
    p_c, p_r = np.exp(lp_c.astype(np.float64)), np.exp(lp_r.astype(np.float64))
    log_or = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    return fn, [lp_c, lp_r], 1.5 - 0.2 * _log_sigmoid(log_or)  # nll + per-pair term
  pi, ref, desirable = _kto_inputs(seed, b)
  fn = lambda p, r, d, weight: pref.kto_loss(
      p, r, d, jnp.float32(0.4), beta=0.1, desirable_weight=1.3, weight=weight
  )
  logratio = pi.astype(np.float64) - ref
  per = np.where(
      desirable, 1.3 * _sigmoid(0.1 * (0.4 - logratio)), _sigmoid(0.1 * (logratio - 0.4))
  )
  return fn, [pi, ref, desirable], per


@pytest.mark.parametrize("name", ["cpl", "simpo", "orpo", "kto"])
def test_weights_match_numpy_and_zero_slots_change_nothing(name):
  fn, arrays, per_example = _weighted_losses(name, seed=11)
  fn = jax.jit(fn)
  rng = np.random.default_rng(12)
  # Float weights: the loss is the weighted mean of the per-example terms (NumPy).
  weight = rng.uniform(0.2, 2.0, size=8).astype(np.float32)
  loss, metrics = fn(*arrays, weight)
  np.testing.assert_allclose(
      loss, np.sum(weight * per_example) / weight.sum(), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(metrics["loss_weight"], weight.sum(), rtol=1e-6)
  # 0/1 weights: the same loss and metrics as the batch without the empty slots, whatever the
  # empty slots hold.
  keep = np.asarray([1, 1, 0, 1, 0, 1, 1, 0], bool)
  garbage = [np.where(keep, a, a[::-1]) if a.dtype != bool else a for a in arrays]
  loss, got = fn(*garbage, keep)
  ref_loss, expected = fn(*[a[keep] for a in arrays], None)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)
  assert set(got) == set(expected)
  for key in expected:
    if key != "loss_weight":
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
  assert float(got["loss_weight"]) == keep.sum() == float(expected["loss_weight"])
  # The empty slots get no gradient.
  grads = jax.grad(lambda a: fn(a, *[jnp.asarray(x) for x in garbage[1:]], keep)[0])(
      jnp.asarray(garbage[0], jnp.float32)
  )
  assert np.all(np.asarray(grads)[~keep] == 0) and np.any(np.asarray(grads)[keep] != 0)
