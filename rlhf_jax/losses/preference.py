"""Offline preference losses on sequence log-probs (see docs/algorithms.md, "DPO and relatives" and
"CPL").

- `dpo_loss`: DPO (Rafailov et al. 2023) with conservative label smoothing (cDPO), IPO (Azar et al.
  2023) and hinge (SLiC-style) variants, optionally reference-free.
- `cpl_loss`: Contrastive Preference Learning (Hejna et al. 2023) with the conservative bias lambda.
- `kto_loss`: KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable examples.
- `orpo_loss`: ORPO (Hong et al. 2024): SFT NLL plus the odds-ratio term, no reference model.
- `simpo_loss`: SimPO (Meng et al. 2024): length-normalised margin loss, no reference model.
- The pair losses that `config.dpo.loss_type` selects (sigmoid, ipo, hinge, simpo, orpo, cpl),
  registered at the end of this module (losses/registry.py).

Inputs are per-sequence log-probs, [B] float (any float dtype, the maths is float32): the sum over a
response's tokens of log pi(y_t | x, y_<t), or its length-average where a function says so. Each
loss is the mean over the B examples and returns `(loss, metrics)` with `metrics["loss_weight"]` =
B (float32), so the train step combines micro-batches by example count. Numeric hyper-parameters
may be python floats or traced scalars; python values are checked (ValueError), traced ones are
not. String / bool options select code paths and must be static under `jax.jit`.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.losses.registry import PairLogps, register_pair_loss

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# ORPO clamps length-averaged log-probs to at most this, so log(1 - exp(l)) and its gradient stay
# finite when every token has probability ~1 (l rounds to 0 in float32). Above it the float32
# inputs carry no information on the odds anyway.
MAX_MEAN_LOGP = -1e-7


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _check(fn: str, name: str, value, ok, expected: str) -> None:
  """ValueError when a concrete hyper-parameter fails `ok`; traced values are not checked."""
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if not (math.isfinite(v) and ok(v)):
    raise ValueError(f"{fn}: {name} must be {expected}, got {value!r}")


def _check_label_smoothing(fn: str, label_smoothing) -> None:
  _check(
      fn,
      "label_smoothing",
      label_smoothing,
      lambda v: 0.0 <= v < 0.5,
      "in [0, 0.5) (the assumed fraction of flipped labels; 0 disables it)",
  )


def _smoothed_logistic_loss(logits: Array, label_smoothing) -> Array:
  """cDPO: `-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`, elementwise."""
  return (1.0 - label_smoothing) * -jax.nn.log_sigmoid(
      logits
  ) + label_smoothing * -jax.nn.log_sigmoid(-logits)


def _weighted_mean(losses: Array, weight: Array | None) -> tuple[Array, Array | None]:
  """(mean of `losses` [B], or its `weight`-weighted mean; the weights as float32 or None)."""
  if weight is None:
    return jnp.mean(losses), None
  chex.assert_equal_shape([losses, weight])
  weight = _f32(weight)
  return jnp.sum(weight * losses) / jnp.maximum(jnp.sum(weight), 1e-8), weight


def _pair_metrics(
    loss: Array, chosen_rewards: Array, rejected_rewards: Array, weight: Array | None = None
) -> dict[str, Array]:
  """Batch means (weighted by `weight` [B] when given) of the implicit rewards of a pair loss;
  accuracy is strict (ties count 0); loss_weight = B, or the weights' sum."""
  if weight is None:
    weight = jnp.ones_like(chosen_rewards)
  total = jnp.sum(weight)
  mean = lambda x: jnp.sum(weight * x) / jnp.maximum(total, 1e-8)
  return {
      "loss": loss,
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/margin": mean(chosen_rewards - rejected_rewards),
      "rewards/accuracy": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "loss_weight": total,
  }


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: Array | float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: Array | float = 0.0,
    reference_free: bool = False,
    weight: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """DPO and its IPO / hinge variants on (chosen, rejected) pairs; mean over the batch.

  policy_chosen_logps, policy_rejected_logps: [B] log pi(y_c | x), log pi(y_r | x) (summed over
    response tokens; TRL length-averages them for IPO, pass averages to do the same).
  ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference model.
  beta: > 0, the KL strength (IPO: the regulariser tau, target margin 1 / (2 beta)).
  loss_type: "sigmoid", "ipo" or "hinge" (static). ValueError otherwise.
  label_smoothing: eps in [0, 0.5), "sigmoid" only (cDPO); nonzero with "ipo" / "hinge" raises.
  reference_free: if True the reference log-probs are treated as 0 (static); they are not read.
  weight: [B] (bool or float) or None: per-pair weights, e.g. 0 for the empty slots of a packed
    batch; the loss and metrics are then weighted means and "loss_weight" is their sum.

  With `h = (pi_c - ref_c) - (pi_r - ref_r)` the per-pair loss is
    sigmoid: `-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`,
    ipo:     `(h - 1 / (2 beta))^2`,
    hinge:   `max(0, 1 - beta h)`,
  as TRL's DPOTrainer (loss_type "sigmoid", "ipo", "hinge"). Returns (loss, metrics) with metrics
  "loss", "rewards/chosen" and "rewards/rejected" (batch means of the implicit rewards
  `beta (pi - ref)`), "rewards/margin", "rewards/accuracy" (fraction with chosen reward strictly
  greater) and "loss_weight" (B, float32).
  """
  logps = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
  chex.assert_rank(logps, 1)
  chex.assert_equal_shape(logps)
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
  _check("dpo_loss", "beta", beta, lambda v: v > 0, "> 0 (e.g. 0.1)")
  _check_label_smoothing("dpo_loss", label_smoothing)
  if (
      loss_type != "sigmoid"
      and not isinstance(label_smoothing, jax.core.Tracer)
      and float(label_smoothing) != 0.0
  ):
    raise ValueError(
        f"dpo_loss: label_smoothing applies to loss_type='sigmoid' only; got "
        f"{label_smoothing!r} with loss_type={loss_type!r}; set it to 0"
    )

  chosen_logratios = _f32(policy_chosen_logps)
  rejected_logratios = _f32(policy_rejected_logps)
  if not reference_free:
    chosen_logratios = chosen_logratios - _f32(ref_chosen_logps)
    rejected_logratios = rejected_logratios - _f32(ref_rejected_logps)
  h = chosen_logratios - rejected_logratios
  if loss_type == "sigmoid":
    losses = _smoothed_logistic_loss(beta * h, label_smoothing)
  elif loss_type == "ipo":
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    losses = jax.nn.relu(1.0 - beta * h)
  loss, weight = _weighted_mean(losses, weight)
  return loss, _pair_metrics(loss, beta * chosen_logratios, beta * rejected_logratios, weight)


def cpl_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    *,
    alpha: Array | float = 0.1,
    lam: Array | float = 0.5,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    weight: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """CPL with the conservative bias; mean over the batch.

  chosen_logps, rejected_logps: [B] sum over the preferred / rejected segment (response) of
    log pi(a_t | s_t) (discount gamma = 1).
  alpha: > 0, the temperature: a segment's advantage is `S = alpha * sum_t log pi(a_t | s_t)`.
  lam: the conservative bias lambda in (0, 1]; lambda < 1 down-weights the rejected segment.
  ref_chosen_logps, ref_rejected_logps: [B] or None (both or neither): if given, log pi is replaced
    by `log pi - log pi_ref` (the reference as a prior).
  weight: [B] (bool or float) or None: per-pair weights as in `dpo_loss` (0 for the empty slots of
    a packed batch); the loss and metrics are then weighted means, "loss_weight" their sum.

  Per pair `-log [exp(S_c) / (exp(S_c) + exp(lam S_r))] = -log sigmoid(S_c - lam S_r)` (Hejna et
  al. 2023, eq. 5 with the bias of their conservative variant). With lam = 1, the reference
  subtracted and alpha = beta this is exactly `dpo_loss(..., loss_type="sigmoid")`. Returns
  (loss, metrics) with the same metrics as `dpo_loss`, the rewards being the advantages S
  (accuracy compares S_c > S_r without the bias, as the CPL code does).
  """
  chex.assert_rank([chosen_logps, rejected_logps], 1)
  chex.assert_equal_shape([chosen_logps, rejected_logps])
  if (ref_chosen_logps is None) != (ref_rejected_logps is None):
    raise ValueError("cpl_loss: pass both ref_chosen_logps and ref_rejected_logps, or neither")
  _check("cpl_loss", "alpha", alpha, lambda v: v > 0, "> 0 (e.g. 0.1)")
  _check("cpl_loss", "lam", lam, lambda v: 0 < v <= 1, "in (0, 1] (1 = unbiased, e.g. 0.5)")

  chosen = _f32(chosen_logps)
  rejected = _f32(rejected_logps)
  if ref_chosen_logps is not None:
    chex.assert_equal_shape([chosen_logps, ref_chosen_logps, ref_rejected_logps])
    chosen = chosen - _f32(ref_chosen_logps)
    rejected = rejected - _f32(ref_rejected_logps)
  adv_chosen = alpha * chosen
  adv_rejected = alpha * rejected
  loss, weight = _weighted_mean(-jax.nn.log_sigmoid(adv_chosen - lam * adv_rejected), weight)
  return loss, _pair_metrics(loss, adv_chosen, adv_rejected, weight)


def kto_loss(
    policy_logps: Array,
    ref_logps: Array,
    desirable: Array,
    kl_estimate: Array,
    *,
    beta: Array | float = 0.1,
    desirable_weight: Array | float = 1.0,
    undesirable_weight: Array | float = 1.0,
    weight: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """KTO on unpaired examples; mean over the batch.

  policy_logps, ref_logps: [B] log pi(y | x) and log pi_ref(y | x) of each example's response.
  desirable: [B] bool, True for a desirable (thumbs-up) response, False for an undesirable one.
  kl_estimate: [] float, the reference point before clamping: TRL uses the batch mean of
    `log pi(y' | x) - log pi_ref(y' | x)` over mismatched pairs (y' the response of another prompt),
    averaged across devices. It is clamped at 0 and gets no gradient.
  beta: > 0; desirable_weight, undesirable_weight: lambda_D, lambda_U >= 0.
  weight: [B] (bool or float) or None: per-example weights (0 for the empty slots of a packed
    batch); the loss and metrics are then weighted means and "loss_weight" is their sum.

  With `r = policy_logps - ref_logps` and `z0 = stop_gradient(max(kl_estimate, 0))` the
  per-example loss is `lambda_D (1 - sigmoid(beta (r - z0)))` if desirable, else
  `lambda_U (1 - sigmoid(beta (z0 - r)))`, as TRL's KTOTrainer (loss_type "kto"); the loss is the
  mean over all B examples. Returns (loss, metrics) with metrics "loss", "rewards/chosen" and
  "rewards/rejected" (means of `beta r` over the desirable / undesirable examples, 0 if none),
  "rewards/margin" (their difference), "rewards/accuracy" (the fraction whose implicit reward
  `beta r` has the label's sign: > 0 if desirable, < 0 if not), "kl" (z0), "num_desirable" and
  "loss_weight" (B, float32).
  """
  chex.assert_rank([policy_logps, ref_logps, desirable, kl_estimate], [1, 1, 1, 0])
  chex.assert_equal_shape([policy_logps, ref_logps, desirable])
  _check("kto_loss", "beta", beta, lambda v: v > 0, "> 0 (e.g. 0.1)")
  for name, w in (
      ("desirable_weight", desirable_weight),
      ("undesirable_weight", undesirable_weight),
  ):
    _check("kto_loss", name, w, lambda v: v >= 0, ">= 0 (e.g. 1.0)")

  desirable = desirable.astype(bool)
  z0 = jax.lax.stop_gradient(jnp.maximum(_f32(kl_estimate), 0.0))
  logratios = _f32(policy_logps) - _f32(ref_logps)
  # 1 - sigmoid(x) written as sigmoid(-x): no cancellation when sigmoid(x) is close to 1.
  losses = jnp.where(
      desirable,
      desirable_weight * jax.nn.sigmoid(beta * (z0 - logratios)),
      undesirable_weight * jax.nn.sigmoid(beta * (logratios - z0)),
  )
  loss, weight = _weighted_mean(losses, weight)
  if weight is None:
    weight = jnp.ones_like(logratios)

  rewards = beta * logratios
  d = desirable.astype(jnp.float32) * weight
  u = (1.0 - desirable.astype(jnp.float32)) * weight
  num_desirable, num_undesirable = jnp.sum(d), jnp.sum(u)
  # A zero count gives 0, not NaN; weights are 0 or 1 in practice, so 1e-8 is not a bias.
  chosen_rewards = jnp.sum(rewards * d) / jnp.maximum(num_desirable, 1e-8)
  rejected_rewards = jnp.sum(rewards * u) / jnp.maximum(num_undesirable, 1e-8)
  right_sign = jnp.where(desirable, rewards > 0, rewards < 0).astype(jnp.float32)
  total = jnp.sum(weight)
  metrics = {
      "loss": loss,
      "rewards/chosen": chosen_rewards,
      "rewards/rejected": rejected_rewards,
      "rewards/margin": chosen_rewards - rejected_rewards,
      "rewards/accuracy": jnp.sum(right_sign * weight) / jnp.maximum(total, 1e-8),
      "kl": z0,
      "num_desirable": num_desirable,
      "loss_weight": total,
  }
  return loss, metrics


def _log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0,
  log1p(-exp(x)) far from it. Each branch only sees inputs from its own range, so the branch that
  `where` drops cannot put a NaN into the gradient."""
  near_zero = x > -math.log(2.0)
  x_near = jnp.where(near_zero, x, -1.0)
  x_far = jnp.where(near_zero, -1.0, x)
  return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def orpo_loss(
    chosen_logps_mean: Array,
    rejected_logps_mean: Array,
    chosen_nll: Array,
    *,
    beta: Array | float = 0.1,
    weight: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """ORPO: SFT NLL plus the log odds-ratio term; no reference model.

  chosen_logps_mean, rejected_logps_mean: [B] LENGTH-AVERAGED log-probs l = (1/|y|) sum_t
    log pi(y_t | x, y_<t) of the chosen / rejected responses (<= 0; clamped to at most
    `MAX_MEAN_LOGP`, so l ~ 0 still gives finite odds and gradients).
  chosen_nll: [] the SFT loss on the chosen responses: their mean token NLL over the batch (as
    TRL; e.g. `sft_loss` on the chosen tokens).
  beta: > 0, the weight lambda of the odds-ratio term (TRL's `beta`, paper's lambda).
  weight: [B] (bool or float) or None: per-pair weights of the odds-ratio term and the metrics as
    in `dpo_loss` (0 for the empty slots of a packed batch); `chosen_nll` is already a batch mean,
    computed by the caller over the pairs that count.

  `log_odds = (l_c - l_r) - (log(1 - exp(l_c)) - log(1 - exp(l_r)))` and
  `loss = chosen_nll - beta * mean(log sigmoid(log_odds))`, as TRL's ORPOTrainer. Returns
  (loss, metrics) with metrics "loss", "nll_loss", "log_odds_ratio" (mean log sigmoid(log_odds)),
  "log_odds_chosen" (mean log_odds), "rewards/chosen" / "rewards/rejected" (means of `beta l`),
  "rewards/margin", "rewards/accuracy" and "loss_weight" (B, float32; the NLL is a token mean,
  so micro-batches of unequal token counts combine only approximately).
  """
  chex.assert_rank([chosen_logps_mean, rejected_logps_mean, chosen_nll], [1, 1, 0])
  chex.assert_equal_shape([chosen_logps_mean, rejected_logps_mean])
  _check("orpo_loss", "beta", beta, lambda v: v > 0, "> 0 (e.g. 0.1)")

  lp_chosen = jnp.minimum(_f32(chosen_logps_mean), MAX_MEAN_LOGP)
  lp_rejected = jnp.minimum(_f32(rejected_logps_mean), MAX_MEAN_LOGP)
  log_odds = (lp_chosen - lp_rejected) - (_log1mexp(lp_chosen) - _log1mexp(lp_rejected))
  mean_log_odds_ratio, weight = _weighted_mean(jax.nn.log_sigmoid(log_odds), weight)
  nll = _f32(chosen_nll)
  loss = nll - beta * mean_log_odds_ratio
  metrics = _pair_metrics(loss, beta * lp_chosen, beta * lp_rejected, weight)
  metrics.update(
      {
          "nll_loss": nll,
          "log_odds_ratio": mean_log_odds_ratio,
          "log_odds_chosen": _weighted_mean(log_odds, weight)[0],
      }
  )
  return loss, metrics


def simpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: Array | float = 2.0,
    gamma: Array | float = 0.5,
    label_smoothing: Array | float = 0.0,
    weight: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """SimPO: length-normalised reward margin, no reference model; mean over the batch.

  chosen_logps, rejected_logps: [B] log-probs SUMMED over the response tokens.
  chosen_lengths, rejected_lengths: [B] response token counts (int or float; a length of 0 is
    taken as 1, so an empty response averages to 0 instead of NaN).
  beta: > 0 (paper: 2.0 to 2.5); gamma: the target reward margin >= 0 (the paper tunes
    gamma / beta ~ 0.5; 0.5 is TRL's default `simpo_gamma`); label_smoothing: eps in [0, 0.5).
  weight: [B] (bool or float) or None: per-pair weights as in `dpo_loss` (0 for the empty slots of
    a packed batch); the loss and metrics are then weighted means, "loss_weight" their sum.

  With `l = logps / lengths`, per pair `z = beta (l_c - l_r) - gamma` and the loss
  `-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`, as TRL's CPOTrainer with loss_type "simpo"
  (without its `cpo_alpha` NLL term). Returns (loss, metrics) with the metrics of `dpo_loss`, the
  rewards being `beta l`.
  """
  arrays = [chosen_logps, rejected_logps, chosen_lengths, rejected_lengths]
  chex.assert_rank(arrays, 1)
  chex.assert_equal_shape(arrays)
  _check("simpo_loss", "beta", beta, lambda v: v > 0, "> 0 (e.g. 2.0)")
  _check("simpo_loss", "gamma", gamma, lambda v: v >= 0, ">= 0 (e.g. 0.5)")
  _check_label_smoothing("simpo_loss", label_smoothing)

  chosen_rewards = beta * _f32(chosen_logps) / jnp.maximum(_f32(chosen_lengths), 1.0)
  rejected_rewards = beta * _f32(rejected_logps) / jnp.maximum(_f32(rejected_lengths), 1.0)
  losses = _smoothed_logistic_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
  loss, weight = _weighted_mean(losses, weight)
  return loss, _pair_metrics(loss, chosen_rewards, rejected_rewards, weight)


# The pair losses of `config.dpo.loss_type` (losses/registry.py): each maps a batch of pairs to one
# of the losses above; its keyword defaults are its config block, `config.dpo.<name>`.


@register_pair_loss("sigmoid", beta=0.1, label_smoothing=0.0)
def sigmoid_pair_loss(pairs: PairLogps, *, beta, label_smoothing):
  """DPO (Rafailov et al. 2023); cDPO with label_smoothing > 0: `dpo_loss(loss_type="sigmoid")`."""
  return dpo_loss(
      *pairs[:4],
      beta=beta,
      label_smoothing=label_smoothing,
      loss_type="sigmoid",
      weight=pairs.weight,
  )


@register_pair_loss("ipo", beta=0.1)
def ipo_pair_loss(pairs: PairLogps, *, beta):
  """IPO (Azar et al. 2023), beta the regulariser tau: `dpo_loss(loss_type="ipo")`."""
  return dpo_loss(*pairs[:4], beta=beta, loss_type="ipo", weight=pairs.weight)


@register_pair_loss("hinge", beta=0.1)
def hinge_pair_loss(pairs: PairLogps, *, beta):
  """SLiC-style hinge on the DPO margin: `dpo_loss(loss_type="hinge")`."""
  return dpo_loss(*pairs[:4], beta=beta, loss_type="hinge", weight=pairs.weight)


@register_pair_loss("simpo", reference=False, beta=2.0, gamma=0.5, label_smoothing=0.0)
def simpo_pair_loss(pairs: PairLogps, *, beta, gamma, label_smoothing):
  """SimPO (Meng et al. 2024), no reference model: `simpo_loss`."""
  return simpo_loss(
      pairs.chosen,
      pairs.rejected,
      pairs.chosen_len,
      pairs.rejected_len,
      beta=beta,
      gamma=gamma,
      label_smoothing=label_smoothing,
      weight=pairs.weight,
  )


@register_pair_loss("orpo", reference=False, beta=0.1)
def orpo_pair_loss(pairs: PairLogps, *, beta):
  """ORPO (Hong et al. 2024), no reference model: `orpo_loss` with the SFT term the token-mean NLL
  of the chosen responses of the pairs that count."""
  w = _f32(pairs.weight)
  chosen_len = jnp.maximum(pairs.chosen_len, 1).astype(jnp.float32)  # empty slots: length 0
  rejected_len = jnp.maximum(pairs.rejected_len, 1).astype(jnp.float32)
  nll = -jnp.sum(w * _f32(pairs.chosen)) / jnp.maximum(jnp.sum(w * chosen_len), 1.0)
  return orpo_loss(
      pairs.chosen / chosen_len, pairs.rejected / rejected_len, nll, beta=beta, weight=pairs.weight
  )


@register_pair_loss("cpl", alpha=0.1, lam=0.5)
def cpl_pair_loss(pairs: PairLogps, *, alpha, lam):
  """CPL (Hejna et al. 2023) with the reference as a prior (zeros when reference-free): `cpl_loss`."""
  return cpl_loss(
      pairs.chosen,
      pairs.rejected,
      alpha=alpha,
      lam=lam,
      ref_chosen_logps=pairs.ref_chosen,
      ref_rejected_logps=pairs.ref_rejected,
      weight=pairs.weight,
  )
