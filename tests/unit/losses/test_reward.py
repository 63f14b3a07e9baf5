"""Reward-model losses and reward combination vs NumPy / brute-force references.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/losses/test_reward.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.losses.reward import (
    LLAMA2_MARGINS,
    combined_reward,
    linear_combined_reward,
    llama2_combined_reward,
    margin_table,
    whiten,
)
from tests.helpers.reward_losses import RTOL, _random_rankings, pairwise_loss, ranking_loss

ATOL = 1e-6


def _softplus(x):
  """-log sigmoid(-x) = log(1 + exp(x)), stable, float64."""
  x = np.asarray(x, np.float64)
  return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _pairwise_ref(r_c, r_r, m, w, center_coef):
  r_c, r_r, m, w = (np.asarray(a, np.float64) for a in (r_c, r_r, m, w))
  bt = np.sum(w * _softplus(-(r_c - r_r - m))) / np.sum(w)
  center = np.sum(w * (r_c + r_r) ** 2) / np.sum(w)
  d = r_c - r_r
  acc = np.sum(w * ((d > 0) + 0.5 * (d == 0))) / np.sum(w)
  return bt + center_coef * center, bt, acc


def _random_pairs(seed, b=16):
  rng = np.random.default_rng(seed)
  r_c = rng.normal(size=b).astype(np.float32) * 2
  r_r = rng.normal(size=b).astype(np.float32) * 2
  m = np.asarray(LLAMA2_MARGINS["small"], np.float32)[rng.integers(0, 4, size=b)]
  w = rng.uniform(0.5, 2.0, size=b).astype(np.float32)
  w[[1, 5, 9]] = 0.0
  return r_c, r_r, m, w


# --- pairwise_loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("center_coef", [0.0, 0.01, 0.5])
def test_pairwise_matches_numpy(center_coef):
  r_c, r_r, m, w = _random_pairs(0)
  r_r[3] = r_c[3]  # a tie counts 0.5 in accuracy
  loss, metrics = pairwise_loss(
      jnp.asarray(r_c),
      jnp.asarray(r_r),
      jnp.asarray(m),
      weight=jnp.asarray(w),
      center_coef=center_coef,
  )
  ref_loss, ref_bt, ref_acc = _pairwise_ref(r_c, r_r, m, w, center_coef)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL)
  np.testing.assert_allclose(metrics["bt_loss"], ref_bt, rtol=RTOL)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc, rtol=RTOL)
  wf = w.astype(np.float64)
  np.testing.assert_allclose(
      metrics["reward_margin"], np.sum(wf * (r_c - r_r)) / wf.sum(), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      metrics["chosen_reward"], np.sum(wf * r_c) / wf.sum(), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      metrics["rejected_reward"], np.sum(wf * r_r) / wf.sum(), rtol=RTOL, atol=ATOL
  )
  assert metrics["loss_weight"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss_weight"], wf.sum(), rtol=RTOL)


def test_pairwise_defaults_and_bool_weight():
  r_c, r_r, _, _ = _random_pairs(1)
  loss, metrics = pairwise_loss(jnp.asarray(r_c), jnp.asarray(r_r))
  ref_loss, _, _ = _pairwise_ref(r_c, r_r, np.zeros_like(r_c), np.ones_like(r_c), 0.0)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  assert float(metrics["loss_weight"]) == len(r_c)

  keep = np.arange(len(r_c)) % 3 != 0
  # Padding examples are ignored even when they hold garbage.
  r_c_pad = np.where(keep, r_c, np.nan).astype(np.float32)
  loss_b, metrics_b = pairwise_loss(
      jnp.asarray(r_c_pad), jnp.asarray(r_r), weight=jnp.asarray(keep), center_coef=0.1
  )
  ref_b, _, _ = _pairwise_ref(r_c[keep], r_r[keep], np.zeros(keep.sum()), np.ones(keep.sum()), 0.1)
  np.testing.assert_allclose(loss_b, ref_b, rtol=RTOL)
  assert float(metrics_b["loss_weight"]) == keep.sum()


def test_pairwise_all_padding_is_zero_not_nan():
  z = jnp.zeros(4)
  loss, metrics = pairwise_loss(z + 1.0, z, weight=z)
  assert float(loss) == 0.0 and float(metrics["loss_weight"]) == 0.0


def test_pairwise_gradient_matches_analytic():
  r_c, r_r, m, w = _random_pairs(2)
  eta = 0.05

  def f(a, b):
    return pairwise_loss(a, b, jnp.asarray(m), weight=jnp.asarray(w), center_coef=eta)[0]

  g_c, g_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(r_c), jnp.asarray(r_r))
  # d/dx softplus(-(x - m)) = -sigmoid(-(x - m)); d/dr (r_c + r_r)^2 = 2 (r_c + r_r).
  wf = w.astype(np.float64) / w.sum()
  x = r_c.astype(np.float64) - r_r - m
  common = 2 * eta * (r_c.astype(np.float64) + r_r)
  np.testing.assert_allclose(g_c, wf * (-_sigmoid(-x) + common), rtol=RTOL, atol=1e-7)
  np.testing.assert_allclose(g_r, wf * (_sigmoid(-x) + common), rtol=RTOL, atol=1e-7)
  assert np.all(np.asarray(g_c)[w == 0] == 0) and np.all(np.asarray(g_r)[w == 0] == 0)


def test_pairwise_large_differences_stay_finite():
  r_c = jnp.asarray([100.0, -100.0, 50.0, -50.0])
  r_r = jnp.asarray([-100.0, 100.0, -50.0, 50.0])

  def f(a, b):
    return pairwise_loss(a, b)[0]

  loss = f(r_c, r_r)
  g_c, g_r = jax.grad(f, argnums=(0, 1))(r_c, r_r)
  assert np.isfinite(float(loss))
  assert np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))
  # softplus(-200) ~ 0, softplus(200) = 200, softplus(-100) ~ 0, softplus(100) = 100.
  np.testing.assert_allclose(loss, (200.0 + 100.0) / 4, rtol=RTOL)
  np.testing.assert_allclose(g_c, [0.0, -0.25, 0.0, -0.25], atol=1e-7)


# --- margin_table -------------------------------------------------------------------------------


def test_margin_table_named_and_custom():
  assert margin_table("none") == (0.0, 0.0, 0.0, 0.0)
  assert margin_table("small") == pytest.approx((0.0, 1 / 3, 2 / 3, 1.0))
  assert margin_table("large") == (0.0, 1.0, 2.0, 3.0)
  assert margin_table([0, 0.5, 1, 4]) == (0.0, 0.5, 1.0, 4.0)
  assert margin_table(np.array([0.0, 0.1, 0.2, 0.3])) == pytest.approx((0.0, 0.1, 0.2, 0.3))


@pytest.mark.parametrize(
    "spec",
    [
        "medium",
        "",
        [0.0, 1.0, 2.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [0.0, -1.0, 2.0, 3.0],
        [0.0, float("nan"), 1.0, 2.0],
        3.0,
        ["a", "b", "c", "d"],
    ],
)
def test_margin_table_errors(spec):
  with pytest.raises(ValueError, match="none"):
    margin_table(spec)


@pytest.mark.parametrize("name", ["small", "large"])
def test_margin_increases_loss(name):
  table = np.asarray(margin_table(name), np.float32)
  levels = np.array([0, 1, 2, 3, 3, 2, 1, 0])
  r_c = jnp.full((8,), 0.7)
  r_r = jnp.full((8,), -0.2)
  base, _ = pairwise_loss(r_c, r_r)
  with_margin, _ = pairwise_loss(r_c, r_r, jnp.asarray(table[levels]))
  assert float(with_margin) > float(base)
  # Per level: a larger margin gives a larger loss.
  per_level = [
      float(pairwise_loss(r_c[:1], r_r[:1], jnp.asarray(table[[lv]]))[0]) for lv in range(4)
  ]
  assert per_level == sorted(per_level) and per_level[3] > per_level[0]


# --- ranking_loss -------------------------------------------------------------------------------


def _ranking_ref(scores, ranks, valid, center_coef):
  """Brute force: Python loops over prompts and pairs, float64."""
  prompt_losses, prompt_accs, prompt_centers, total_pairs = [], [], [], 0
  for s, r, v in zip(scores.astype(np.float64), ranks, valid):
    idx = [k for k in range(len(s)) if v[k]]
    losses, accs = [], []
    for i in idx:
      for j in idx:
        if r[i] < r[j]:
          d = s[i] - s[j]
          losses.append(math.log1p(math.exp(-d)) if d > -30 else -d)
          accs.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)
    if not losses:
      continue
    total_pairs += len(losses)
    prompt_losses.append(np.mean(losses))
    prompt_accs.append(np.mean(accs))
    prompt_centers.append((2 * np.mean(s[idx])) ** 2)
  bt = np.mean(prompt_losses)
  return (
      bt + center_coef * np.mean(prompt_centers),
      bt,
      np.mean(prompt_accs),
      total_pairs,
      len(prompt_losses),
  )


@pytest.mark.parametrize("center_coef", [0.0, 0.02])
def test_ranking_matches_brute_force(center_coef):
  scores, ranks, valid = _random_rankings(3)
  loss, metrics = ranking_loss(
      jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid), center_coef=center_coef
  )
  ref_loss, ref_bt, ref_acc, ref_pairs, ref_prompts = _ranking_ref(
      scores, ranks, valid, center_coef
  )
  assert ref_prompts == len(scores) - 2  # rows 0 and 2 contribute nothing
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL)
  np.testing.assert_allclose(metrics["bt_loss"], ref_bt, rtol=RTOL)
  np.testing.assert_allclose(metrics["pair_accuracy"], ref_acc, rtol=RTOL)
  assert float(metrics["num_pairs"]) == ref_pairs
  assert float(metrics["loss_weight"]) == ref_prompts


@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_ranking_full_rows_have_k_choose_2_pairs(k):
  rng = np.random.default_rng(k)
  scores = rng.normal(size=(5, k)).astype(np.float32)
  ranks = np.stack([rng.permutation(k) for _ in range(5)]).astype(np.int32)
  valid = np.ones((5, k), bool)
  loss, metrics = ranking_loss(
      jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid), center_coef=0.1
  )
  assert float(metrics["num_pairs"]) == 5 * k * (k - 1) // 2
  np.testing.assert_allclose(loss, _ranking_ref(scores, ranks, valid, 0.1)[0], rtol=RTOL)


@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_ranking_k2_equals_pairwise(center_coef):
  r_c, r_r, _, _ = _random_pairs(4)
  scores = jnp.stack([jnp.asarray(r_c), jnp.asarray(r_r)], axis=1)
  ranks = jnp.tile(jnp.asarray([[0, 1]], jnp.int32), (len(r_c), 1))
  valid = jnp.ones_like(ranks, dtype=bool)
  r_loss, r_metrics = ranking_loss(scores, ranks, valid, center_coef=center_coef)
  p_loss, p_metrics = pairwise_loss(jnp.asarray(r_c), jnp.asarray(r_r), center_coef=center_coef)
  np.testing.assert_allclose(r_loss, p_loss, rtol=RTOL)
  np.testing.assert_allclose(r_metrics["bt_loss"], p_metrics["bt_loss"], rtol=RTOL)
  np.testing.assert_allclose(r_metrics["pair_accuracy"], p_metrics["accuracy"], rtol=RTOL)
  assert float(r_metrics["loss_weight"]) == float(p_metrics["loss_weight"])
  g_r = jax.grad(lambda s: ranking_loss(s, ranks, valid, center_coef=center_coef)[0])(scores)
  g_p = jax.grad(lambda a, b: pairwise_loss(a, b, center_coef=center_coef)[0], argnums=(0, 1))(
      scores[:, 0], scores[:, 1]
  )
  np.testing.assert_allclose(g_r, jnp.stack(g_p, axis=1), rtol=RTOL, atol=1e-8)


def test_ranking_permutation_invariant():
  scores, ranks, valid = _random_rankings(5)
  loss, metrics = ranking_loss(
      jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid), center_coef=0.05
  )
  perm = np.random.default_rng(6).permutation(scores.shape[1])
  loss_p, metrics_p = ranking_loss(
      jnp.asarray(scores[:, perm]),
      jnp.asarray(ranks[:, perm]),
      jnp.asarray(valid[:, perm]),
      center_coef=0.05,
  )
  np.testing.assert_allclose(loss_p, loss, rtol=RTOL)
  for key in metrics:
    np.testing.assert_allclose(metrics_p[key], metrics[key], rtol=RTOL)


def test_ranking_gradient_finite_and_zero_on_padding():
  scores, ranks, valid = _random_rankings(7)
  g = jax.grad(
      lambda s: ranking_loss(s, jnp.asarray(ranks), jnp.asarray(valid), center_coef=0.01)[0]
  )(jnp.asarray(scores))
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[~valid] == 0)
  assert np.all(np.asarray(g)[2] == 0)  # fully tied row: no pairs, no centring either


# --- whiten and combined rewards ----------------------------------------------------------------


def test_whiten():
  rng = np.random.default_rng(8)
  x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
  out = whiten(jnp.asarray(x))
  assert out.shape == x.shape
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(out, (x64 - x64.mean()) / (x64.std() + 1e-8), rtol=1e-5, atol=1e-6)

  mask = rng.uniform(size=x.shape) < 0.6
  out_m = whiten(jnp.asarray(x), jnp.asarray(mask))
  sel = x64[mask]
  np.testing.assert_allclose(out_m, (x64 - sel.mean()) / (sel.std() + 1e-8), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.mean(np.asarray(out_m)[mask]), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(np.asarray(out_m)[mask]), 1.0, rtol=1e-5)

  out_given = whiten(jnp.asarray(x), mean=1.5, std=4.0)
  np.testing.assert_allclose(out_given, (x64 - 1.5) / (4.0 + 1e-8), rtol=RTOL, atol=ATOL)
  out_mean_only = whiten(jnp.asarray(x), jnp.asarray(mask), mean=0.0)
  np.testing.assert_allclose(out_mean_only, x64 / (sel.std() + 1e-8), rtol=1e-5, atol=1e-6)
  # A constant input does not divide by zero.
  assert np.all(np.isfinite(whiten(jnp.ones(5))))


def test_llama2_combined_reward():
  thr = 0.15
  t = math.log(thr / (1 - thr))  # logit(0.15) ~ -1.7346
  helpful = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  safety = jnp.asarray([0.5, 0.5, t - 1e-3, t + 1e-3, -5.0, t + 1e-3], jnp.float32)
  unsafe = jnp.asarray([False, True, False, False, False, True])
  out = llama2_combined_reward(helpful, safety, unsafe, safety_threshold=thr)
  # 0: safe prompt, safe answer -> helpful; 1: flagged -> safety; 2: just below 0.15 -> safety;
  # 3: just above -> helpful; 4: far below -> safety; 5: flagged overrides the threshold.
  np.testing.assert_allclose(out, [1.0, 0.5, t - 1e-3, 4.0, -5.0, t + 1e-3], rtol=RTOL)
  assert float(jax.nn.sigmoid(safety[2])) < thr < float(jax.nn.sigmoid(safety[3]))
  # The threshold is a probability; 0 never and 1 always picks safety on safe prompts.
  never = llama2_combined_reward(helpful, safety, jnp.zeros(6, bool), safety_threshold=0.0)
  always = llama2_combined_reward(helpful, safety, jnp.zeros(6, bool), safety_threshold=1.0)
  np.testing.assert_allclose(never, helpful)
  np.testing.assert_allclose(always, safety)
  with pytest.raises(ValueError, match="safety_threshold"):
    llama2_combined_reward(helpful, safety, unsafe, safety_threshold=1.5)
  np.testing.assert_allclose(combined_reward(helpful, safety, unsafe, safety_threshold=thr), out)


def test_linear_and_dispatch():
  h = jnp.asarray([1.0, -2.0, 0.5])
  s = jnp.asarray([0.25, 3.0, -1.0])
  unsafe = jnp.asarray([True, False, True])
  expected = 0.7 * np.asarray(h) + 0.3 * np.asarray(s)
  np.testing.assert_allclose(
      linear_combined_reward(h, s, helpful_weight=0.7, safety_weight=0.3), expected, rtol=RTOL
  )
  np.testing.assert_allclose(
      combined_reward(h, s, unsafe, kind="linear", helpful_weight=0.7, safety_weight=0.3),
      expected,
      rtol=RTOL,
  )
  np.testing.assert_allclose(linear_combined_reward(h, s), np.asarray(h) + np.asarray(s))
  with pytest.raises(ValueError, match="llama2"):
    combined_reward(h, s, unsafe, kind="max")


# --- sharding -----------------------------------------------------------------------------------


def test_sharded_equals_unsharded():
  devices = np.asarray(jax.devices()[:8])
  assert devices.size == 8
  mesh = Mesh(devices, ("data",))
  row = NamedSharding(mesh, P("data"))
  mat = NamedSharding(mesh, P("data", None))

  r_c, r_r, m, w = _random_pairs(9, b=16)
  pw = jax.jit(lambda a, b, c, d: pairwise_loss(a, b, c, weight=d, center_coef=0.01))
  ref_loss, ref_metrics = pw(*(jnp.asarray(a) for a in (r_c, r_r, m, w)))
  sh_args = [jax.device_put(a, row) for a in (r_c, r_r, m, w)]
  assert len(sh_args[0].sharding.device_set) == 8
  sh_loss, sh_metrics = pw(*sh_args)
  np.testing.assert_allclose(sh_loss, ref_loss, rtol=RTOL, atol=ATOL)
  for key in ref_metrics:
    np.testing.assert_allclose(sh_metrics[key], ref_metrics[key], rtol=RTOL, atol=ATOL)

  scores, ranks, valid = _random_rankings(10, b=16, k=5)
  rk = jax.jit(lambda s, r, v: ranking_loss(s, r, v, center_coef=0.01))
  ref_loss, ref_metrics = rk(jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid))
  sh_loss, sh_metrics = rk(*(jax.device_put(a, mat) for a in (scores, ranks, valid)))
  np.testing.assert_allclose(sh_loss, ref_loss, rtol=RTOL, atol=ATOL)
  for key in ref_metrics:
    np.testing.assert_allclose(sh_metrics[key], ref_metrics[key], rtol=RTOL, atol=ATOL)

  g_ref = jax.jit(jax.grad(lambda s: rk(s, jnp.asarray(ranks), jnp.asarray(valid))[0]))(
      jnp.asarray(scores)
  )
  g_sh = jax.jit(jax.grad(lambda s, r, v: rk(s, r, v)[0]))(
      *(jax.device_put(a, mat) for a in (scores, ranks, valid))
  )
  np.testing.assert_allclose(g_sh, g_ref, rtol=RTOL, atol=1e-8)
