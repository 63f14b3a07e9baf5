"""Per-token KL estimators and KL-coefficient controllers (see docs/algorithms.md, "PPO for language
models").

- `kl_penalty`: per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens,
  with `d = logp - ref_logp`: k1 = d (unbiased, can be negative), k2 = d^2 / 2 (biased, >= 0),
  k3 = exp(-d) - 1 + d (unbiased and >= 0; Schulman's "Approximating KL divergence").
- `sequence_kl`: sum of a per-token estimate over the response tokens of each row.
- `KLState`, `fixed_kl_update`, `adaptive_kl_update`: the KL coefficient beta as a pure update,
  fixed or adaptive (Ziegler et al. 2019). All jit-able with traced beta and observed KL.

All estimators assume the tokens were sampled from pi (the policy whose log-probs are `logp`);
the expectations below are over those samples.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logp: Array, ref_logp: Array, mask: Array, *, kind: str = "k1") -> Array:
  """Per-token KL estimate; [B, T] float32, 0 where `mask` is False.

  logp: [B, T] log pi(y_t | ...) of the sampled tokens (any float dtype).
  ref_logp: [B, T] log pi_ref(y_t | ...) of the same tokens.
  mask: [B, T] bool, True on response tokens (EOS included); False on prompt and padding at
    either end. Entries outside the mask are never read into the result (they may be garbage,
    even -inf or NaN) and get a zero gradient.
  kind: "k1" (d), "k2" (d^2 / 2) or "k3" (exp(-d) - 1 + d), with d = logp - ref_logp.
    Raises ValueError for anything else.

  E_pi[k1] = E_pi[k3] = KL(pi || pi_ref); k3 >= 0 per token; k2 >= 0 and is biased (its
  expectation is the KL only to second order). All three are 0 where logp == ref_logp.
  """
  chex.assert_rank([logp, ref_logp, mask], 2)
  chex.assert_equal_shape([logp, ref_logp, mask])
  if kind not in KL_KINDS:
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")
  mask = mask.astype(bool)
  # Zero the log-ratio outside the mask first, so garbage there reaches neither value nor grad.
  d = jnp.where(mask, logp.astype(jnp.float32) - ref_logp.astype(jnp.float32), 0.0)
  if kind == "k1":
    kl = d
  elif kind == "k2":
    kl = 0.5 * jnp.square(d)
  else:
    # exp(-d) - 1 + d; expm1 keeps it accurate (and >= 0) for small |d|.
    kl = jnp.expm1(-d) + d
  return jnp.where(mask, kl, 0.0)


def sequence_kl(per_token: Array, mask: Array) -> Array:
  """Sum of a per-token KL estimate over each row's response tokens.

  per_token: [B, T] (e.g. from `kl_penalty`); mask: [B, T] bool. Returns [B] float32; a row with
  an empty mask gets 0.
  """
  chex.assert_rank([per_token, mask], 2)
  chex.assert_equal_shape([per_token, mask])
  return jnp.sum(jnp.where(mask.astype(bool), per_token.astype(jnp.float32), 0.0), axis=1)


class KLState(NamedTuple):
  """State of a KL controller: the current coefficient beta (float32 scalar)."""

  beta: Array

  @classmethod
  def create(cls, beta: float) -> KLState:
    return cls(beta=jnp.asarray(beta, jnp.float32))


def fixed_kl_update(beta: Array | float, observed_kl: Array | float, n_steps: Array | int) -> Array:
  """Fixed controller: returns beta unchanged (float32 scalar); the other arguments are unused
  and only keep the signature of `adaptive_kl_update`."""
  del observed_kl, n_steps
  return jnp.asarray(beta, jnp.float32)


def adaptive_kl_update(
    beta: Array | float,
    observed_kl: Array | float,
    n_steps: Array | int,
    *,
    target: float,
    horizon: float,
) -> Array:
  """Adaptive controller of Ziegler et al. (2019); returns the new beta (float32 scalar).

  beta: current coefficient (scalar). observed_kl: scalar, the observed KL(pi || pi_ref) of the
  last rollout batch, per sequence (e.g. the mean over rows of `sequence_kl`). n_steps: scalar,
  the number of samples (episodes) since the last update. target: the KL the controller steers
  to (e.g. 6). horizon: e.g. 10000.

  `e = clip(observed_kl / target - 1, -0.2, 0.2)`; `beta <- beta * (1 + e * n_steps / horizon)`:
  beta rises when the KL is above target and falls when below, by a proportional error clipped
  at +-20% per (horizon) samples.
  """
  if not target > 0:
    raise ValueError(f"adaptive KL target must be > 0, got {target}")
  if not horizon > 0:
    raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
  beta = jnp.asarray(beta, jnp.float32)
  observed_kl = jnp.asarray(observed_kl, jnp.float32)
  chex.assert_rank([beta, observed_kl], 0)
  err = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
  mult = 1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon
  return beta * mult
