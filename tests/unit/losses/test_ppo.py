"""KL estimators and controllers, PPO rewards / GAE / losses and group advantages vs NumPy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses import ppo as ppo_lib

RTOL = 1e-5
ATOL = 1e-6

# Jitted once per shape (eager dispatch compiles every primitive separately). String / bool /
# None-or-float options that select code paths are static; numeric hyper-parameters are traced.
kl_penalty = jax.jit(kl_lib.kl_penalty, static_argnames=("kind",))
sequence_kl = jax.jit(kl_lib.sequence_kl)
adaptive_kl_update = jax.jit(kl_lib.adaptive_kl_update, static_argnames=("target", "horizon"))
fixed_kl_update = jax.jit(kl_lib.fixed_kl_update)
whiten = jax.jit(ppo_lib.whiten, static_argnames=("shift_mean",))
token_rewards = jax.jit(ppo_lib.token_rewards, static_argnames=("score_clip",))
gae = jax.jit(ppo_lib.gae)
ppo_policy_loss = jax.jit(ppo_lib.ppo_policy_loss)
ppo_value_loss = jax.jit(ppo_lib.ppo_value_loss)
entropy_from_logits = jax.jit(ppo_lib.entropy_from_logits)
grpo_advantages = jax.jit(ppo_lib.grpo_advantages, static_argnames=("scale",))
rloo_advantages = jax.jit(ppo_lib.rloo_advantages)

B, T = 16, 6

# Rows with padding at both ends, a single token, an empty row, full rows, a hole.
_FIXED_ROWS = [
    [0, 0, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
    [0, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 1],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1],
]


def _mask(seed: int, *, holes: bool = False) -> np.ndarray:
  """[B, T] bool: the fixed rows, then random contiguous spans (left and right padding)."""
  rng = np.random.default_rng(seed)
  rows = [np.asarray(r, bool) for r in _FIXED_ROWS]
  while len(rows) < B:
    start = rng.integers(0, T)
    end = rng.integers(start + 1, T + 1)
    row = np.zeros(T, bool)
    row[start:end] = True
    rows.append(row)
  mask = np.stack(rows)
  if holes:  # non-contiguous rows: "next" must skip the hole
    mask[-1] = [1, 0, 1, 1, 0, 1]
    mask[-2] = [0, 1, 0, 0, 1, 0]
  return mask


def _garbage(x: np.ndarray, mask: np.ndarray, value=np.nan) -> np.ndarray:
  """x with `value` outside the mask: results must not depend on it."""
  return np.where(mask, x, value).astype(np.float32)


def _rand(rng, *shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


# --- kl_penalty / sequence_kl --------------------------------------------------------------------


def _kl_ref(logp, ref, mask, kind):
  d = logp.astype(np.float64) - ref
  est = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}[kind]
  return np.where(mask, est, 0.0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_numpy(kind):
  rng = np.random.default_rng(0)
  mask = _mask(0)
  logp, ref = _rand(rng, B, T) - 2.0, _rand(rng, B, T) - 2.0
  out = kl_penalty(
      jnp.asarray(_garbage(logp, mask, -np.inf)),
      jnp.asarray(_garbage(ref, mask)),
      jnp.asarray(mask),
      kind=kind,
  )
  assert out.dtype == jnp.float32 and out.shape == (B, T)
  np.testing.assert_allclose(out, _kl_ref(logp, ref, mask, kind), rtol=RTOL, atol=ATOL)
  if kind != "k1":
    assert np.all(np.asarray(out) >= 0)
  # Equal log-probs: every estimator is exactly zero.
  zero = kl_penalty(jnp.asarray(logp), jnp.asarray(logp), jnp.asarray(mask), kind=kind)
  assert np.all(np.asarray(zero) == 0.0)

  seq = sequence_kl(out, jnp.asarray(mask))
  np.testing.assert_allclose(seq, _kl_ref(logp, ref, mask, kind).sum(axis=1), rtol=RTOL, atol=ATOL)
  assert seq.shape == (B,) and float(seq[3]) == 0.0  # the empty row


def test_kl_penalty_gradient_is_finite_with_garbage_padding():
  rng = np.random.default_rng(1)
  mask = _mask(1)
  logp = _garbage(_rand(rng, B, T), mask, np.nan)
  ref = _garbage(_rand(rng, B, T), mask, -np.inf)
  g = jax.jit(
      jax.grad(
          lambda x: jnp.sum(kl_lib.kl_penalty(x, jnp.asarray(ref), jnp.asarray(mask), kind="k3"))
      )
  )(jnp.asarray(logp))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0.0)


def test_kl_estimators_monte_carlo():
  rng = np.random.default_rng(2)
  k = 5
  p = rng.dirichlet(np.ones(k))
  q = rng.dirichlet(np.ones(k))
  true_kl = float(np.sum(p * (np.log(p) - np.log(q))))
  x = rng.choice(k, size=(200, 1000), p=p)  # samples from pi = p
  logp = jnp.asarray(np.log(p)[x], jnp.float32)
  ref = jnp.asarray(np.log(q)[x], jnp.float32)
  mask = jnp.ones(x.shape, bool)
  k1 = np.asarray(kl_penalty(logp, ref, mask, kind="k1"), np.float64)
  k3 = np.asarray(kl_penalty(logp, ref, mask, kind="k3"), np.float64)
  assert np.all(k3 >= 0)
  # Unbiased: both means within 4 standard errors of the true KL.
  for est in (k1, k3):
    stderr = est.std() / np.sqrt(est.size)
    assert abs(est.mean() - true_kl) < 4 * stderr + 1e-6, (est.mean(), true_kl, stderr)


def test_kl_penalty_unknown_kind():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="k1"):
    kl_lib.kl_penalty(z, z, z > 0, kind="k4")


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_update():
  beta, target, horizon = 0.1, 6.0, 10000.0
  # Above target: beta rises; below: falls; proportional inside +-20%.
  up = float(adaptive_kl_update(beta, 6.6, 1000, target=target, horizon=horizon))
  down = float(adaptive_kl_update(beta, 5.4, 1000, target=target, horizon=horizon))
  np.testing.assert_allclose(up, beta * (1 + 0.1 * 1000 / horizon), rtol=RTOL)
  np.testing.assert_allclose(down, beta * (1 - 0.1 * 1000 / horizon), rtol=RTOL)
  assert down < beta < up
  # Clipped error at +-20%: with n_steps = horizon the multiplier is at most 1.2 / at least 0.8.
  big = float(adaptive_kl_update(beta, 100.0, horizon, target=target, horizon=horizon))
  small = float(adaptive_kl_update(beta, 0.0, horizon, target=target, horizon=horizon))
  np.testing.assert_allclose([big, small], [beta * 1.2, beta * 0.8], rtol=RTOL)
  on_target = adaptive_kl_update(beta, target, 512, target=target, horizon=horizon)
  np.testing.assert_allclose(on_target, beta, rtol=RTOL)

  # Traced beta / observed (a scan of updates, as inside a jitted train loop).
  def loop(state, obs):
    new = kl_lib.KLState(
        kl_lib.adaptive_kl_update(state.beta, obs, 100, target=target, horizon=horizon)
    )
    return new, new.beta

  obs = jnp.asarray([12.0, 12.0, 3.0, 6.0], jnp.float32)
  _, betas = jax.jit(lambda s, o: jax.lax.scan(loop, s, o))(kl_lib.KLState.create(beta), obs)
  expect, b = [], beta
  for o in obs.tolist():
    b = b * (1 + np.clip(o / target - 1, -0.2, 0.2) * 100 / horizon)
    expect.append(b)
  np.testing.assert_allclose(betas, expect, rtol=RTOL)
  assert betas.dtype == jnp.float32


def test_fixed_kl_update_and_bad_args():
  out = fixed_kl_update(jnp.float32(0.05), jnp.float32(50.0), 10)
  assert out.dtype == jnp.float32 and float(out) == np.float32(0.05)
  with pytest.raises(ValueError, match="target"):
    kl_lib.adaptive_kl_update(0.1, 1.0, 1, target=0.0, horizon=1.0)
  with pytest.raises(ValueError, match="horizon"):
    kl_lib.adaptive_kl_update(0.1, 1.0, 1, target=1.0, horizon=0.0)


# --- whiten --------------------------------------------------------------------------------------


def _whiten_ref(x, mask, shift_mean, eps=1e-8):
  vals = x[mask].astype(np.float64)
  mean, var = vals.mean(), vals.var(ddof=1)
  out = (x - mean) / np.sqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return np.where(mask, out, 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_masked_whiten(shift_mean):
  rng = np.random.default_rng(3)
  mask = _mask(3)
  x = _rand(rng, B, T, scale=3.0) + 1.5
  out = whiten(jnp.asarray(_garbage(x, mask)), jnp.asarray(mask), shift_mean=shift_mean)
  np.testing.assert_allclose(out, _whiten_ref(x, mask, shift_mean), rtol=RTOL, atol=ATOL)
  vals = np.asarray(out, np.float64)[mask]
  np.testing.assert_allclose(vals.std(ddof=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(vals.mean(), 0.0 if shift_mean else x[mask].mean(), atol=1e-5)


def test_whiten_degenerate_masks_are_finite():
  x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(2, 6))
  one = np.zeros((2, 6), bool)
  one[1, 3] = True
  np.testing.assert_array_equal(whiten(x, jnp.asarray(one), shift_mean=True), np.zeros((2, 6)))
  kept = whiten(x, jnp.asarray(one), shift_mean=False)
  np.testing.assert_allclose(kept, np.where(one, x, 0.0), rtol=RTOL)
  np.testing.assert_array_equal(
      whiten(x, jnp.zeros((2, 6), bool), shift_mean=True), np.zeros((2, 6))
  )


# --- token_rewards -------------------------------------------------------------------------------


def _token_rewards_ref(score, kl, mask, beta, eos_found, penalty, clip):
  out = np.zeros(mask.shape, np.float64)
  for b in range(mask.shape[0]):
    cols = np.nonzero(mask[b])[0]
    for t in cols:
      out[b, t] = -beta * kl[b, t]
    if len(cols):
      s = float(score[b])
      if clip is not None:
        s = min(max(s, -clip), clip)
      if eos_found is not None and not eos_found[b]:
        s += penalty
      out[b, cols[-1]] += s
  return out


@pytest.mark.parametrize("clip,with_eos", [(None, False), (0.5, True), (None, True)])
def test_token_rewards_matches_numpy(clip, with_eos):
  rng = np.random.default_rng(4)
  mask = _mask(4, holes=True)
  score = _rand(rng, B, scale=2.0)
  score[3] = np.nan  # the empty row's score is never read
  kl = _rand(rng, B, T)
  eos = rng.random(B) < 0.5
  beta = 0.05
  out = token_rewards(
      jnp.asarray(score),
      jnp.asarray(_garbage(kl, mask)),
      jnp.asarray(mask),
      beta=jnp.float32(beta),
      eos_found=jnp.asarray(eos) if with_eos else None,
      missing_eos_penalty=-1.0,
      score_clip=clip,
  )
  ref = _token_rewards_ref(score, kl, mask, beta, eos if with_eos else None, -1.0, clip)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(out)[3] == 0.0) and np.all(np.asarray(out)[~mask] == 0.0)
  # Row 0 is [0, 0, 1, 1, 1, 0]: the score lands on column 4.
  assert np.all(np.asarray(out)[0, [2, 3]] == np.asarray(-beta * kl[0, [2, 3]], np.float32))


def test_token_rewards_bad_clip():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="score_clip"):
    ppo_lib.token_rewards(z[:, 0], z, z > 0, beta=0.1, score_clip=0.0)


# --- gae -----------------------------------------------------------------------------------------


def _gae_ref(rewards, values, mask, gamma, lam):
  adv = np.zeros(mask.shape, np.float64)
  for b in range(mask.shape[0]):
    next_v = next_a = 0.0
    for t in reversed(np.nonzero(mask[b])[0]):
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = values[b, t]
      adv[b, t] = next_a
  return adv, np.where(mask, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_numpy(gamma, lam, holes):
  rng = np.random.default_rng(5)
  mask = _mask(5, holes=holes)
  rewards, values = _rand(rng, B, T), _rand(rng, B, T)
  adv, ret = gae(
      jnp.asarray(_garbage(rewards, mask)),
      jnp.asarray(_garbage(values, mask)),
      jnp.asarray(mask),
      gamma=gamma,
      lam=lam,
  )
  ref_adv, ref_ret = _gae_ref(rewards, values, mask, gamma, lam)
  assert adv.dtype == ret.dtype == jnp.float32
  np.testing.assert_allclose(adv, ref_adv, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ret, ref_ret, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(adv)[~mask] == 0.0) and np.all(np.asarray(ret)[~mask] == 0.0)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
  rng = np.random.default_rng(6)
  mask = _mask(6)
  rewards, values = _rand(rng, B, T), _rand(rng, B, T)
  adv, ret = gae(
      jnp.asarray(_garbage(rewards, mask, 1e6)),
      jnp.asarray(_garbage(values, mask, -1e6)),
      jnp.asarray(mask),
      gamma=1.0,
      lam=1.0,
  )
  r = np.where(mask, rewards, 0.0).astype(np.float64)
  to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, np.where(mask, to_go - values, 0.0), rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(ret, np.where(mask, to_go, 0.0), rtol=RTOL, atol=1e-5)


def test_gae_right_padded_matches_trl_loop():
  """Right-padded rows (response from column 0): same as TRL's loop over all columns with values
  and rewards zeroed at padding."""
  rng = np.random.default_rng(7)
  lengths = rng.integers(1, T + 1, size=B)
  mask = np.arange(T)[None, :] < lengths[:, None]
  rewards = np.where(mask, _rand(rng, B, T), 0.0)
  values = np.where(mask, _rand(rng, B, T), 0.0)
  gamma, lam = 0.99, 0.95
  last, trl = np.zeros(B), np.zeros((B, T))
  for t in reversed(range(T)):
    next_v = values[:, t + 1] if t < T - 1 else 0.0
    last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
    trl[:, t] = last
  adv, _ = gae(
      jnp.asarray(rewards, jnp.float32),
      jnp.asarray(values, jnp.float32),
      jnp.asarray(mask),
      gamma=gamma,
      lam=lam,
  )
  np.testing.assert_allclose(adv, np.where(mask, trl, 0.0), rtol=RTOL, atol=ATOL)


# --- ppo_policy_loss -----------------------------------------------------------------------------


def _policy_ref(logp, old, adv, mask, eps):
  ratio = np.exp(logp.astype(np.float64) - old)
  pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  m = mask.astype(np.float64)
  n = m.sum()
  return {
      "policy_loss": np.sum(np.maximum(pg1, pg2) * m) / n,
      "clip_fraction": np.sum((pg2 > pg1) * m) / n,
      "clip_low_fraction": np.sum((pg2 > pg1) * (adv < 0) * m) / n,
      "clip_high_fraction": np.sum((pg2 > pg1) * (adv > 0) * m) / n,
      "approx_kl": np.sum(((ratio - 1) - np.log(ratio)) * m) / n,
      "ratio_mean": np.sum(ratio * m) / n,
      "loss_weight": n,
  }


@pytest.mark.parametrize("clip_eps", [0.1, 0.2])
def test_policy_loss_matches_numpy(clip_eps):
  rng = np.random.default_rng(8)
  mask = _mask(8)
  old = _rand(rng, B, T) - 2.0
  logp = old + _rand(rng, B, T, scale=0.3)
  adv = _rand(rng, B, T)
  loss, metrics = ppo_policy_loss(
      jnp.asarray(_garbage(logp, mask)),
      jnp.asarray(old),
      jnp.asarray(_garbage(adv, mask)),
      jnp.asarray(mask),
      clip_eps=clip_eps,
  )
  ref = _policy_ref(logp, old, adv, mask, clip_eps)
  np.testing.assert_allclose(loss, ref["policy_loss"], rtol=RTOL, atol=ATOL)
  assert set(metrics) == set(ref)
  for key, val in ref.items():
    np.testing.assert_allclose(metrics[key], val, rtol=RTOL, atol=ATOL, err_msg=key)
  assert metrics["loss_weight"].dtype == jnp.float32
  assert 0.0 < float(metrics["clip_fraction"]) < 1.0


def test_policy_loss_at_ratio_one():
  rng = np.random.default_rng(9)
  mask = _mask(9)
  logp = _rand(rng, B, T) - 2.0
  adv = _rand(rng, B, T)
  n = mask.sum()

  def f(x):
    return ppo_lib.ppo_policy_loss(x, jnp.asarray(logp), jnp.asarray(adv), jnp.asarray(mask))

  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(
      jnp.asarray(_garbage(logp, mask))
  )
  np.testing.assert_allclose(loss, -np.sum(np.where(mask, adv, 0.0)) / n, rtol=RTOL, atol=ATOL)
  assert float(metrics["clip_fraction"]) == 0.0
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["approx_kl"], 0.0, atol=ATOL)
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, np.where(mask, -adv / n, 0.0), rtol=RTOL, atol=1e-7)


def test_policy_clip_fraction_counts():
  # Tokens: (A, ratio) = (+1, 1.5) clipped; (-1, 1.5) not; (+1, 0.5) not; (-1, 0.5) clipped;
  # (+1, 1.0) not; (+1, 1.1) not (inside the range); last column padding (would be clipped).
  ratio = np.asarray([[1.5, 1.5, 0.5, 0.5, 1.0, 1.1, 3.0]], np.float32)
  adv = np.asarray([[1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0]], np.float32)
  mask = np.asarray([[1, 1, 1, 1, 1, 1, 0]], bool)
  old = np.zeros_like(ratio)

  def f(x):
    return ppo_lib.ppo_policy_loss(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))

  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(np.log(ratio)))
  np.testing.assert_allclose(metrics["clip_fraction"], 2 / 6, rtol=RTOL)
  np.testing.assert_allclose(loss, (-1.2 + 1.5 - 0.5 + 0.8 - 1.0 - 1.1) / 6, rtol=RTOL)
  # Clipped tokens get no gradient; the others get -A * ratio / n.
  np.testing.assert_allclose(
      g, [[0.0, 1.5 / 6, -0.5 / 6, 0.0, -1.0 / 6, -1.1 / 6, 0.0]], rtol=RTOL, atol=1e-7
  )


def test_policy_loss_empty_batch_is_zero():
  z = jnp.zeros((2, 4))
  loss, metrics = ppo_policy_loss(z, z, z + 1.0, z > 0)
  assert float(loss) == 0.0 and float(metrics["loss_weight"]) == 0.0


# --- the GRPO family's surrogate: clip-higher, GSPO, loss aggregation, overlong penalty ------------

clipped_policy_loss = jax.jit(
    ppo_lib.clipped_policy_loss, static_argnames=("importance", "aggregation", "max_len")
)


def _family_ref(logp, old, adv, mask, *, eps_low, eps_high, importance, aggregation, max_len):
  """The papers' objectives as loops over sequences (float64): DAPO (token-mean), GRPO
  (seq-mean-token-mean), Dr. GRPO (token sums / L_max), GSPO (one clipped length-normalised ratio
  per sequence)."""
  terms, lengths = [], []
  for i in range(len(mask)):
    m = mask[i]
    if not m.any():
      continue
    log_r = logp[i][m].astype(np.float64) - old[i][m]
    a = adv[i][m].astype(np.float64)
    w = np.exp(np.full_like(log_r, log_r.mean())) if importance == "sequence" else np.exp(log_r)
    terms.append(-np.minimum(w * a, np.clip(w, 1 - eps_low, 1 + eps_high) * a))
    lengths.append(m.sum())
  if aggregation == "token-mean":
    return np.concatenate(terms).sum() / sum(lengths)
  per_seq = {
      "seq-mean-token-mean": [t.mean() for t in terms],
      "seq-mean-token-sum": [t.sum() for t in terms],
      "seq-mean-token-sum-norm": [t.sum() / max_len for t in terms],
  }[aggregation]
  return np.mean(per_seq)


@pytest.mark.parametrize("importance", ppo_lib.IMPORTANCE_LEVELS)
@pytest.mark.parametrize("aggregation", ppo_lib.LOSS_AGGREGATIONS)
def test_clipped_policy_loss_matches_the_papers(importance, aggregation):
  rng = np.random.default_rng(21)
  mask = _mask(21)
  old = _rand(rng, B, T) - 2.0
  logp = old + _rand(rng, B, T, scale=0.3)
  adv = np.repeat(_rand(rng, B, 1), T, axis=1)  # a sequence advantage on every token
  kw = dict(eps_low=0.2, eps_high=0.28, importance=importance, aggregation=aggregation, max_len=T)
  loss, metrics = clipped_policy_loss(
      jnp.asarray(_garbage(logp, mask)),
      jnp.asarray(old),
      jnp.asarray(_garbage(adv, mask)),
      jnp.asarray(mask),
      **kw,
  )
  np.testing.assert_allclose(loss, _family_ref(logp, old, adv, mask, **kw), rtol=RTOL, atol=ATOL)
  rows = mask.any(axis=1).sum()
  assert float(metrics["loss_weight"]) == (mask.sum() if aggregation == "token-mean" else rows)
  assert 0.0 < float(metrics["clip_fraction"]) < 1.0
  np.testing.assert_allclose(
      metrics["clip_fraction"],
      metrics["clip_low_fraction"] + metrics["clip_high_fraction"],
      rtol=RTOL,
  )


def test_clip_higher_only_widens_the_upper_side():
  """(A, ratio) = (+1, 1.25): clipped at eps 0.2, not at eps_high 0.28; (-1, 0.75): clipped at
  eps_low 0.2 either way."""
  ratio = np.asarray([[1.25, 0.75]], np.float32)
  adv = np.asarray([[1.0, -1.0]], np.float32)
  mask = np.ones_like(ratio, bool)
  args = (jnp.asarray(np.log(ratio)), jnp.zeros_like(ratio), jnp.asarray(adv), jnp.asarray(mask))
  _, symmetric = clipped_policy_loss(*args, eps_low=0.2)
  _, decoupled = clipped_policy_loss(*args, eps_low=0.2, eps_high=0.28)
  assert (
      float(symmetric["clip_high_fraction"]) == 0.5 and float(decoupled["clip_high_fraction"]) == 0
  )
  assert float(symmetric["clip_low_fraction"]) == float(decoupled["clip_low_fraction"]) == 0.5


def test_gspo_gradient_is_the_sequence_ratio_spread_over_its_tokens():
  """Unclipped, d loss / d logp_it = -A_i s_i / |y_i| / G (GSPO's gradient, seq-mean-token-mean);
  a clipped sequence gets none."""
  rng = np.random.default_rng(22)
  mask = _mask(22)
  old = _rand(rng, B, T) - 2.0
  logp = old + _rand(rng, B, T, scale=0.05)
  adv = np.repeat(_rand(rng, B, 1), T, axis=1)

  def f(x):
    return ppo_lib.clipped_policy_loss(
        x,
        jnp.asarray(old),
        jnp.asarray(adv),
        jnp.asarray(mask),
        eps_low=0.2,
        importance="sequence",
        aggregation="seq-mean-token-mean",
    )[0]

  g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(_garbage(logp, mask))))
  lengths = mask.sum(axis=1)
  s = np.exp(np.where(mask, logp - old, 0.0).sum(axis=1) / np.maximum(lengths, 1))
  assert np.all(np.abs(s - 1) < 0.2)  # nothing clipped at this scale
  expected = -adv[:, 0] * s / np.maximum(lengths, 1) / mask.any(axis=1).sum()
  np.testing.assert_allclose(g, np.where(mask, expected[:, None], 0.0), rtol=1e-4, atol=1e-7)


def test_micro_batches_combine_by_loss_weight():
  """Each aggregation's (loss, weight) of two halves, weighted, is the whole batch's loss."""
  rng = np.random.default_rng(23)
  mask = _mask(23)
  old = _rand(rng, B, T) - 2.0
  logp = old + _rand(rng, B, T, scale=0.3)
  adv = _rand(rng, B, T)
  for aggregation in ppo_lib.LOSS_AGGREGATIONS:
    kw = dict(eps_low=0.2, aggregation=aggregation, max_len=T)
    parts = [
        clipped_policy_loss(
            jnp.asarray(logp[h]),
            jnp.asarray(old[h]),
            jnp.asarray(adv[h]),
            jnp.asarray(mask[h]),
            **kw,
        )
        for h in (slice(0, B // 2), slice(B // 2, B))
    ]
    whole, _ = clipped_policy_loss(
        jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), **kw
    )
    weights = [float(m["loss_weight"]) for _, m in parts]
    combined = sum(float(l) * w for (l, _), w in zip(parts, weights)) / sum(weights)
    np.testing.assert_allclose(combined, whole, rtol=RTOL, atol=ATOL, err_msg=aggregation)


def test_clipped_policy_loss_bad_options():
  z = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="0 <= eps_low <= eps_high, got 0.2 and 0.1"):
    ppo_lib.clipped_policy_loss(z, z, z, z > 0, eps_low=0.2, eps_high=0.1)
  with pytest.raises(ValueError, match="importance 'group'"):
    ppo_lib.clipped_policy_loss(z, z, z, z > 0, importance="group")
  with pytest.raises(ValueError, match="loss aggregation 'seq-sum'"):
    ppo_lib.clipped_policy_loss(z, z, z, z > 0, aggregation="seq-sum")
  with pytest.raises(ValueError, match="max_len >= 1"):
    ppo_lib.clipped_policy_loss(z, z, z, z > 0, aggregation="seq-mean-token-sum-norm")


def test_overlong_penalty_is_dapos_ramp():
  lengths = jnp.asarray([0, 10, 12, 14, 16, 17])
  np.testing.assert_allclose(
      ppo_lib.overlong_penalty(lengths, max_len=16, buffer=4, factor=0.5),
      [0.0, 0.0, 0.0, -0.25, -0.5, -0.5],
  )
  assert not np.any(ppo_lib.overlong_penalty(lengths, max_len=16, buffer=0))
  with pytest.raises(ValueError, match="overlong buffer 20"):
    ppo_lib.overlong_penalty(lengths, max_len=16, buffer=20)


# --- ppo_value_loss ------------------------------------------------------------------------------


def _value_ref(v, v_old, ret, mask, eps):
  v, v_old, ret = (a.astype(np.float64) for a in (v, v_old, ret))
  vf1 = (v - ret) ** 2
  vf2 = (np.clip(v, v_old - eps, v_old + eps) - ret) ** 2
  m = mask
  return {
      "value_loss": 0.5 * np.maximum(vf1, vf2)[m].mean(),
      "value_clip_fraction": (vf2 > vf1)[m].mean(),
      "explained_variance": 1 - np.var(ret[m] - v[m]) / np.var(ret[m]),
      "loss_weight": float(m.sum()),
  }


def test_value_loss_matches_numpy():
  rng = np.random.default_rng(10)
  mask = _mask(10)
  ret = _rand(rng, B, T, scale=2.0)
  v_old = ret + _rand(rng, B, T)
  v = v_old + _rand(rng, B, T, scale=0.4)
  loss, metrics = ppo_value_loss(
      jnp.asarray(_garbage(v, mask)),
      jnp.asarray(_garbage(v_old, mask)),
      jnp.asarray(_garbage(ret, mask)),
      jnp.asarray(mask),
      clip_eps=0.2,
  )
  ref = _value_ref(v, v_old, ret, mask, 0.2)
  np.testing.assert_allclose(loss, ref["value_loss"], rtol=RTOL, atol=ATOL)
  assert set(metrics) == set(ref)
  for key, val in ref.items():
    np.testing.assert_allclose(metrics[key], val, rtol=RTOL, atol=ATOL, err_msg=key)
  assert 0.0 < float(metrics["value_clip_fraction"]) < 1.0


def test_value_loss_clipping_and_gradient():
  # Token 0: V moved away from R beyond the clip -> clipped term larger, no gradient.
  # Token 1: V moved towards R beyond the clip -> unclipped term larger, gradient V - R.
  v = np.asarray([[1.0, 1.0, 0.0]], np.float32)
  v_old = np.asarray([[0.5, 2.0, 0.0]], np.float32)
  ret = np.asarray([[0.0, 0.0, 5.0]], np.float32)
  mask = np.asarray([[1, 1, 0]], bool)

  def f(x):
    return ppo_lib.ppo_value_loss(
        x, jnp.asarray(v_old), jnp.asarray(ret), jnp.asarray(mask), clip_eps=0.2
    )

  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(v))
  # Token 0: max(1.0, 0.7^2) = 1.0; token 1: max(1.0, 1.8^2 = 3.24) = 3.24.
  np.testing.assert_allclose(loss, 0.5 * (1.0 + 3.24) / 2, rtol=RTOL)
  np.testing.assert_allclose(metrics["value_clip_fraction"], 0.5, rtol=RTOL)
  np.testing.assert_allclose(g, [[0.5 * 2 * 1.0 / 2, 0.0, 0.0]], rtol=RTOL, atol=1e-7)


def test_explained_variance_perfect_and_constant():
  rng = np.random.default_rng(11)
  mask = _mask(11)
  ret = _rand(rng, B, T)
  _, metrics = ppo_value_loss(
      jnp.asarray(ret), jnp.asarray(ret), jnp.asarray(ret), jnp.asarray(mask)
  )
  np.testing.assert_allclose(metrics["explained_variance"], 1.0, rtol=RTOL)
  assert float(metrics["value_loss"]) == 0.0
  const = jnp.ones((B, T))
  _, metrics = ppo_value_loss(const, const, const, jnp.asarray(mask))
  assert float(metrics["explained_variance"]) == 0.0


# --- entropy -------------------------------------------------------------------------------------


def test_entropy_matches_numpy():
  rng = np.random.default_rng(12)
  mask = _mask(12)
  vocab = 11
  logits = _rand(rng, B, T, vocab, scale=3.0)
  logits[0, 2, :3] = -np.inf  # a banned-token vocabulary: no NaN
  out = entropy_from_logits(jnp.asarray(logits), jnp.asarray(mask))
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
  np.testing.assert_allclose(out, h[mask].mean(), rtol=RTOL)
  uniform = entropy_from_logits(jnp.zeros((B, T, vocab), jnp.bfloat16), jnp.asarray(mask))
  assert uniform.dtype == jnp.float32
  np.testing.assert_allclose(uniform, np.log(vocab), rtol=RTOL)


# --- group advantages ----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages_matches_numpy(scale):
  rng = np.random.default_rng(13)
  r = _rand(rng, 6, 4, scale=2.0)
  r[2] = 0.7  # a group of equal rewards: advantages 0
  out = grpo_advantages(jnp.asarray(r), eps=1e-6, scale=scale)
  ref = np.zeros_like(r, np.float64)
  for p in range(r.shape[0]):
    c = r[p].astype(np.float64) - r[p].mean()
    ref[p] = c / (np.std(r[p], ddof=1) + 1e-6) if scale else c
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(out)[2] == 0.0)


def test_rloo_advantages_matches_numpy():
  rng = np.random.default_rng(14)
  for g in (2, 5):
    r = _rand(rng, 3, g)
    out = rloo_advantages(jnp.asarray(r))
    ref = np.asarray([[r[p, i] - np.mean(np.delete(r[p], i)) for i in range(g)] for p in range(3)])
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_group_advantages_need_two_samples():
  r = jnp.zeros((3, 1))
  with pytest.raises(ValueError, match="G >= 2"):
    ppo_lib.rloo_advantages(r)
  with pytest.raises(ValueError, match="G >= 2"):
    ppo_lib.grpo_advantages(r)
  assert np.all(np.asarray(ppo_lib.grpo_advantages(r, scale=False)) == 0.0)


# --- sharding ------------------------------------------------------------------------------------


def test_sharded_equals_unsharded():
  devices = np.asarray(jax.devices()[:8])
  assert devices.size == 8
  mesh = Mesh(devices, ("data",))
  mat = NamedSharding(mesh, P("data", None))
  rng = np.random.default_rng(15)
  mask = _mask(15)
  rewards, values = _rand(rng, B, T), _rand(rng, B, T)
  old = _rand(rng, B, T) - 2.0
  logp = old + _rand(rng, B, T, scale=0.3)

  def pipeline(rewards, values, logp, old, mask):
    adv, ret = ppo_lib.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    adv = ppo_lib.whiten(adv, mask)
    loss, metrics = ppo_lib.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    return adv, ret, loss, metrics

  run = jax.jit(pipeline)
  args = [rewards, values, logp, old, mask]
  ref = run(*(jnp.asarray(a) for a in args))
  sh_args = [jax.device_put(a, mat) for a in args]
  assert len(sh_args[0].sharding.device_set) == 8
  out = run(*sh_args)
  assert len(out[0].sharding.device_set) == 8
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)

  grad = jax.jit(jax.grad(lambda lp, o, a, m: ppo_lib.ppo_policy_loss(lp, o, a, m)[0]))
  adv = np.asarray(ref[0])
  g_ref = grad(*(jnp.asarray(a) for a in (logp, old, adv, mask)))
  g_sh = grad(*(jax.device_put(a, mat) for a in (logp, old, adv, mask)))
  np.testing.assert_allclose(g_sh, g_ref, rtol=RTOL, atol=1e-8)
