"""PPO for language models and the advantages of the online group methods (see docs/algorithms.md,
"PPO for language models" and "Online group methods").

Rollout side (no gradient):
- `token_rewards`: per-token rewards `-beta * KL_t` plus the sequence score at the last response
  token (optionally clipped, with an optional penalty for responses without EOS).
- `gae`: generalised advantage estimation as a reverse `lax.scan` over time, masked so that
  padding at either end of a row neither receives nor leaks values or rewards.
- `whiten`: masked whitening with the unbiased variance, as TRL's `masked_whiten`.
- `grpo_advantages`, `rloo_advantages`: per-sample advantages from groups of G samples per prompt.

Update side (differentiable):
- `clipped_policy_loss`: the clipped surrogate with the GRPO family's choices (DAPO's decoupled
  clip range, GSPO's sequence-level importance weight, `aggregate_loss`'s reductions);
  `ppo_policy_loss`: PPO's symmetric token-level case; `ppo_value_loss`: clipped value loss;
  `entropy_from_logits`: masked mean entropy for an optional entropy bonus.
- `overlong_penalty`: DAPO's soft length penalty on the reward.

Conventions. Response tensors are [B, T], aligned per token: `logp[b, t]` is the log-prob of
response token `t` (the logits that produced it sit one position earlier in the model's output;
align before calling). `mask` [B, T] bool is True on response tokens, EOS included, and False on
prompt and padding; the True entries of a row may start at any column (left padding / offset
prompts) and stop before T (right padding). Entries outside the mask are never read into any
result, so they may hold garbage (even NaN or -inf), and they get zero gradient. Losses are means
over the masked tokens of the whole batch and return `metrics["loss_weight"]` = token count
(float32), so micro-batches combine by token count into the loss of the whole batch.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.common import masked_mean

Array = jax.Array


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """Masked whitening `(x - mean) * rsqrt(var + eps)`, as TRL's `masked_whiten`.

  x: any shape, any float dtype; mask: same shape, bool, True on the entries that count (e.g. the
  response tokens of the whole rollout batch). mean and var are over the masked entries; var is
  the unbiased (Bessel-corrected, n / (n - 1)) variance, as in TRL. With `shift_mean=False` the
  mean is added back (only the scale changes: TRL uses this to whiten rewards without moving
  their mean). Returns float32, same shape as x, 0 outside the mask.

  Not `rlhf_jax.losses.reward.whiten`: that one uses the population std, `/(std + eps)`, has no
  `shift_mean`, and transforms the masked-out entries; here the statistics match TRL's PPO.
  Degenerate masks do not raise (TRL raises for n = 0 and divides by zero for n = 1): with one
  masked entry the variance is taken as 0 (the entry whitens to 0, or to itself without the mean
  shift); with none the result is all zeros.
  """
  chex.assert_equal_shape([x, mask])
  mask = mask.astype(bool)
  x = jnp.where(mask, _f32(x), 0.0)
  n = jnp.sum(mask.astype(jnp.float32))
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask) * n / jnp.maximum(n - 1.0, 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)


def _last_token(mask: Array) -> Array:
  """[B, T] bool: True at the last True column of each row of `mask` (nowhere in empty rows)."""
  cols = jnp.arange(mask.shape[1], dtype=jnp.int32)
  last = jnp.max(jnp.where(mask, cols[None, :], -1), axis=1)  # [B], -1 for empty rows
  return cols[None, :] == last[:, None]


def token_rewards(
    score: Array,
    kl: Array,
    mask: Array,
    *,
    beta: Array | float,
    eos_found: Array | None = None,
    missing_eos_penalty: float = 0.0,
    score_clip: float | None = None,
) -> Array:
  """Per-token PPO rewards; [B, T] float32, 0 outside the mask.

  score: [B] sequence score of each response (reward model output, possibly combined/whitened).
  kl: [B, T] per-token KL estimate (e.g. `kl_penalty(..., kind="k1")`).
  mask: [B, T] bool response mask (see the module docstring; padding at both ends allowed).
  beta: KL coefficient (python float or traced float32 scalar, e.g. from `adaptive_kl_update`).
  eos_found: [B] bool or None; where False (the response was truncated without EOS) the score
    gets `missing_eos_penalty` added (pass a negative number, e.g. -1.0, to penalise).
  score_clip: None, or c > 0 to clip the score to [-c, c].

  `r[b, t] = -beta * kl[b, t]` on every response token, plus at the LAST response token of the
  row (the last True column of mask[b], found from the mask, not from EOS) the score, clipped
  first and then penalised: `clip(score, -c, c) + missing_eos_penalty * (1 - eos_found)`, so the
  penalty applies in full even when the score is clipped. A row with an empty mask gets all
  zeros (its score is not read).
  """
  chex.assert_rank([score, kl, mask], [1, 2, 2])
  chex.assert_equal_shape([kl, mask])
  chex.assert_equal_shape_prefix([score, kl], 1)
  mask = mask.astype(bool)
  s = _f32(score)
  if score_clip is not None:
    if not score_clip > 0:
      raise ValueError(f"score_clip must be > 0 or None, got {score_clip}")
    s = jnp.clip(s, -score_clip, score_clip)
  if eos_found is not None:
    chex.assert_equal_shape([score, eos_found])
    s = s + jnp.where(eos_found.astype(bool), 0.0, jnp.float32(missing_eos_penalty))
  kl_reward = jnp.where(mask, -_f32(beta) * _f32(kl), 0.0)
  at_last = _last_token(mask)
  return kl_reward + jnp.where(at_last, s[:, None], 0.0)


def gae(
    rewards: Array,
    values: Array,
    mask: Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[Array, Array]:
  """Generalised advantage estimation over each row's response tokens.

  rewards: [B, T] per-token rewards (e.g. `token_rewards`); values: [B, T] value estimates V_t of
  the rollout (old values); mask: [B, T] bool response mask, any padding at either end (also
  holes). gamma, lam: discount and GAE lambda (python floats or traced scalars).

  A reverse `jax.lax.scan` over time: `delta_t = r_t + gamma V_next - V_t`,
  `A_t = delta_t + gamma lam A_next`, where "next" is the next RESPONSE token of the same row
  (masked columns are skipped: the carry passes through them unchanged) and V_next = A_next = 0
  after the last response token. Rewards and values outside the mask are never read.
  Returns (advantages [B, T], returns [B, T]) float32 with `returns = A + V` on response tokens;
  both are 0 outside the mask. Not whitened: call `whiten(advantages, mask)` over the whole
  rollout batch (before splitting into mini-batches) if wanted. Wrap in `jax.lax.stop_gradient`
  or compute outside the loss: these are targets.
  """
  chex.assert_rank([rewards, values, mask], 2)
  chex.assert_equal_shape([rewards, values, mask])
  mask = mask.astype(bool)
  r = jnp.where(mask, _f32(rewards), 0.0)
  v = jnp.where(mask, _f32(values), 0.0)
  gamma = _f32(gamma)
  gl = gamma * _f32(lam)

  def step(carry, xs):
    next_v, next_a = carry  # [B] each: value / advantage at the next response token
    r_t, v_t, m_t = xs
    a_t = jnp.where(m_t, r_t + gamma * next_v - v_t + gl * next_a, 0.0)
    carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
    return carry, a_t

  zeros = jnp.zeros(r.shape[:1], jnp.float32)
  _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, mask.T), reverse=True)
  advantages = adv_t.T
  returns = jnp.where(mask, advantages + v, 0.0)
  return advantages, returns


LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
IMPORTANCE_LEVELS = ("token", "sequence")


def aggregate_loss(
    per_token: Array, mask: Array, mode: str = "token-mean", *, max_len: int | None = None
) -> tuple[Array, Array]:
  """A per-token loss [B, T] reduced to a scalar, as the GRPO-family papers name the choices.

  - "token-mean" (DAPO, PPO's usual): sum over every response token of the batch / their count:
    each token weighs the same, so a long response's tokens are not diluted.
  - "seq-mean-token-mean" (GRPO, Shao et al. 2024): the mean over sequences of each sequence's
    token mean: each response weighs the same, whatever its length.
  - "seq-mean-token-sum": the mean over sequences of each sequence's token sum.
  - "seq-mean-token-sum-norm" (Dr. GRPO, Liu et al. 2025): token sums divided by the constant
    `max_len` (the generation budget) instead of each response's own length, mean over sequences:
    no length normalisation that favours long wrong answers or short right ones.

  mask: [B, T] bool response mask; rows without a response token are left out of the sequence
  means. Returns (loss, weight): weight is the token count for "token-mean" and the count of
  non-empty sequences otherwise (float32), so micro-batches combine by it into the mini-batch's
  loss. ValueError for an unknown mode or a "-norm" mode without max_len >= 1.
  """
  if mode not in LOSS_AGGREGATIONS:
    raise ValueError(f"loss aggregation {mode!r}: choose one of {LOSS_AGGREGATIONS}")
  chex.assert_equal_shape([per_token, mask])
  mask = mask.astype(bool)
  x = jnp.where(mask, _f32(per_token), 0.0)
  if mode == "token-mean":
    return masked_mean(x, mask), jnp.sum(mask.astype(jnp.float32))
  tokens = jnp.sum(mask.astype(jnp.float32), axis=1)
  rows = tokens > 0
  sums = jnp.sum(x, axis=1)
  if mode == "seq-mean-token-mean":
    per_row = sums / jnp.maximum(tokens, 1.0)
  elif mode == "seq-mean-token-sum":
    per_row = sums
  else:
    if not max_len or max_len < 1:
      raise ValueError(f"loss aggregation {mode!r} divides by the generation budget: max_len >= 1")
    per_row = sums / float(max_len)
  return masked_mean(per_row, rows), jnp.sum(rows.astype(jnp.float32))


def clipped_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    importance: str = "token",
    aggregation: str = "token-mean",
    max_len: int | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The clipped surrogate of PPO and of the GRPO family, with its variants' choices.

  logp: [B, T] log-probs of the sampled tokens under the current policy (differentiable);
  old_logp: [B, T] the same under the rollout policy (a constant); advantages: [B, T] (constant:
  GAE advantages, or a sequence advantage broadcast over its tokens); mask: [B, T] bool.

  Per token, `max(-A * w, -A * clip(w, 1 - eps_low, 1 + eps_high))`, reduced by `aggregate_loss`
  (`aggregation`, `max_len`), where the importance weight w is
  - importance "token" (PPO, GRPO, DAPO): `w_t = exp(logp_t - old_logp_t)`;
  - importance "sequence" (GSPO, Zheng et al. 2025): one weight per sequence, the length-normalised
    ratio `s = exp(mean_t (logp_t - old_logp_t))`, clipped as a whole (every token of the sequence
    shares it; with "seq-mean-token-mean" the loss is GSPO's mean over sequences).
  eps_high None = eps_low (symmetric, PPO); DAPO's clip-higher decouples them (0.2 / 0.28).

  At w = 1 the loss is -aggregate(A). Metrics: "policy_loss", "clip_fraction" (tokens where the
  clipped term is strictly larger: the clip zeroes their gradient), "clip_low_fraction" /
  "clip_high_fraction" (of those, w below 1 - eps_low with A < 0 / above 1 + eps_high with A > 0),
  "approx_kl" (token mean of `(r - 1) - log r`, r the token ratio: the k3 estimate of
  KL(pi_old || pi)), "ratio_mean" (token mean of w), "loss_weight" (`aggregate_loss`'s weight).
  A batch with no response token gives loss 0.
  """
  eps_high = eps_low if eps_high is None else eps_high
  if importance not in IMPORTANCE_LEVELS:
    raise ValueError(f"importance {importance!r}: choose one of {IMPORTANCE_LEVELS}")
  concrete = all(isinstance(e, (int, float)) for e in (eps_low, eps_high))  # not traced
  if concrete and (eps_low < 0 or eps_high < eps_low):
    raise ValueError(f"clip ranges need 0 <= eps_low <= eps_high, got {eps_low} and {eps_high}")
  chex.assert_rank([logp, old_logp, advantages, mask], 2)
  chex.assert_equal_shape([logp, old_logp, advantages, mask])
  mask = mask.astype(bool)
  log_ratio = jnp.where(mask, _f32(logp) - _f32(old_logp), 0.0)
  adv = jnp.where(mask, _f32(advantages), 0.0)
  if importance == "sequence":
    seq_log_ratio = masked_mean(log_ratio, mask, axis=1)
    weight = jnp.broadcast_to(jnp.exp(seq_log_ratio)[:, None], log_ratio.shape)
  else:
    weight = jnp.exp(log_ratio)
  pg1 = -adv * weight
  pg2 = -adv * jnp.clip(weight, 1.0 - eps_low, 1.0 + eps_high)
  loss, loss_weight = aggregate_loss(jnp.maximum(pg1, pg2), mask, aggregation, max_len=max_len)
  sg_weight = jax.lax.stop_gradient(weight)
  sg_log_ratio = jax.lax.stop_gradient(log_ratio)
  clipped = pg2 > pg1
  metrics = {
      "policy_loss": loss,
      "clip_fraction": masked_mean(clipped.astype(jnp.float32), mask),
      "clip_low_fraction": masked_mean((clipped & (adv < 0)).astype(jnp.float32), mask),
      "clip_high_fraction": masked_mean((clipped & (adv > 0)).astype(jnp.float32), mask),
      "approx_kl": masked_mean((jnp.exp(sg_log_ratio) - 1.0) - sg_log_ratio, mask),
      "ratio_mean": masked_mean(sg_weight, mask),
      "loss_weight": loss_weight,
  }
  return loss, metrics


def ppo_policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate, mean over the response tokens of the batch: `clipped_policy_loss`
  with the symmetric clip `clip_eps`, token importance weights and "token-mean".

  `ratio = exp(logp - old_logp)`; loss = masked mean of
  `max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`. At ratio 1 it equals -mean(A) and its
  gradient w.r.t. logp is -A / n_tokens. Shapes and metrics as `clipped_policy_loss`
  ("loss_weight" = token count).
  """
  return clipped_policy_loss(logp, old_logp, advantages, mask, eps_low=clip_eps)


def overlong_penalty(lengths: Array, *, max_len: int, buffer: int, factor: float = 1.0) -> Array:
  """DAPO's soft overlong punishment (Yu et al. 2025), added to a response's reward; [B] -> [B].

  lengths: [B] response lengths in tokens (EOS included); max_len: the generation budget L_max;
  buffer: L_cache, the last tokens of the budget over which the penalty ramps. 0 up to
  L_max - L_cache, then linearly down to -factor at L_max: `factor * ((L_max - L_cache) - len) /
  L_cache`, and -factor beyond L_max (a truncated response). buffer 0: no penalty (zeros).
  """
  if buffer < 0 or buffer > max_len:
    raise ValueError(f"overlong buffer {buffer} must lie in [0, max_len={max_len}]")
  lengths = _f32(lengths)
  if buffer == 0:
    return jnp.zeros_like(lengths)
  start = float(max_len - buffer)
  ramp = (start - lengths) / float(buffer)
  return float(factor) * jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))


def _masked_var(x: Array, mask: Array) -> Array:
  """Population variance of the masked entries of x (0 for fewer than one entry)."""
  return masked_mean(jnp.square(x - masked_mean(x, mask)), mask)


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[Array, dict[str, Array]]:
  """Clipped value loss, mean over the response tokens of the batch.

  values: [B, T] current value predictions (differentiable); old_values: [B, T] the rollout's
  values; returns: [B, T] GAE returns (constant); mask: [B, T] bool response mask. clip_eps: the
  value clip range (absolute, in reward units).

  loss = `0.5 * masked mean of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)`.
  Returns (loss, metrics) with metrics "value_loss", "value_clip_fraction" (tokens where the
  clipped term is strictly larger), "explained_variance" (`1 - Var[R - V] / Var[R]` over the
  masked tokens, population variances, with V = `values`; 0 when Var[R] = 0) and "loss_weight"
  (token count, float32).
  """
  chex.assert_rank([values, old_values, returns, mask], 2)
  chex.assert_equal_shape([values, old_values, returns, mask])
  mask = mask.astype(bool)
  v = jnp.where(mask, _f32(values), 0.0)
  v_old = jnp.where(mask, _f32(old_values), 0.0)
  ret = jnp.where(mask, _f32(returns), 0.0)
  vf1 = jnp.square(v - ret)
  v_clipped = jnp.clip(v, v_old - clip_eps, v_old + clip_eps)
  vf2 = jnp.square(v_clipped - ret)
  loss = 0.5 * masked_mean(jnp.maximum(vf1, vf2), mask)
  sg_v = jax.lax.stop_gradient(v)
  var_ret = _masked_var(ret, mask)
  var_res = _masked_var(ret - sg_v, mask)
  explained = jnp.where(var_ret > 0, 1.0 - var_res / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
  metrics = {
      "value_loss": loss,
      "value_clip_fraction": masked_mean((vf2 > vf1).astype(jnp.float32), mask),
      "explained_variance": explained,
      "loss_weight": jnp.sum(mask.astype(jnp.float32)),
  }
  return loss, metrics


def token_entropy(logits: Array) -> Array:
  """Entropy of softmax(logits) per position. logits: [..., V] -> [...] float32.

  Computed from `log_softmax` in float32; vocabulary entries with probability 0 (logit -inf)
  contribute 0, not NaN.
  """
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def entropy_from_logits(logits: Array, mask: Array) -> Array:
  """Masked mean entropy over the response tokens; float32 scalar.

  logits: [B, T, V] aligned with the response tokens (logits[:, t] is the distribution that
  produced token t); mask: [B, T] bool. 0 for an empty mask. For an entropy bonus, subtract
  `coef * entropy_from_logits(...)` from the loss.
  """
  chex.assert_rank([logits, mask], [3, 2])
  chex.assert_equal_shape([logits[..., 0], mask])
  mask = mask.astype(bool)
  return masked_mean(jnp.where(mask, token_entropy(logits), 0.0), mask)


def grpo_advantages(rewards: Array, *, eps: float = 1e-6, scale: bool = True) -> Array:
  """GRPO (Shao et al. 2024) group-relative advantages; [P, G] -> [P, G] float32.

  rewards: [P, G] scalar rewards, row p = the G samples of prompt p (a flat [P * G] batch whose
  samples of one prompt are contiguous reshapes to [P, G]).
  `A = (r - mean_g r) / (std_g r + eps)` with std the unbiased (ddof = 1) standard deviation of
  the row, as TRL's GRPOTrainer (torch's `std`); a row of equal rewards gets 0. scale=False gives
  only `r - mean_g r` (Dr. GRPO / TRL `scale_rewards=False`). Broadcast to tokens with
  `A[:, :, None]` after reshaping, times the response mask. Requires G >= 2 when scaling.
  """
  chex.assert_rank(rewards, 2)
  g = rewards.shape[1]
  if scale and g < 2:
    raise ValueError(f"grpo_advantages with scale=True needs G >= 2 samples per prompt, got {g}")
  r = _f32(rewards)
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if not scale:
    return centred
  std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (g - 1))
  return centred / (std + eps)


def rloo_advantages(rewards: Array) -> Array:
  """RLOO (Ahmadian et al. 2024) leave-one-out advantages; [P, G] -> [P, G] float32.

  rewards: [P, G], row p = the G >= 2 samples of prompt p (ValueError otherwise).
  `A_i = r_i - mean_{j != i} r_j` (equivalently `G / (G - 1) * (r_i - mean_j r_j)`).
  """
  chex.assert_rank(rewards, 2)
  g = rewards.shape[1]
  if g < 2:
    raise ValueError(f"rloo_advantages needs G >= 2 samples per prompt, got {g}")
  r = _f32(rewards)
  others = (jnp.sum(r, axis=1, keepdims=True) - r) / (g - 1)
  return r - others
