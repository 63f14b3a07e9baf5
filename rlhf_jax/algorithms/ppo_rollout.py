"""PPO rollouts: sample responses, score them (policy and reference log-probs, values, rewards),
and turn scores into advantages. No gradients here; `algorithms/ppo.py` runs the updates.

A rollout is a dict of [B, S] arrays over the whole sequence (prompt left-padded to a fixed
length P, then N generated tokens), so every iteration has the same shapes and nothing recompiles:

    tokens, segment_ids, positions   the sequence (generate.full_sequence)
    response_mask                    True on generated tokens up to and including EOS
    old_logp                         log pi_old(token_t), column t from the logits at t-1
    ref_logp                         log pi_ref(token_t)
    old_values                       V(state before token_t): the value model's output at t-1
                                     (or the value head's on the policy's hidden state at t-1)
    advantages, returns              GAE over the response (whitened advantages)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import data, generate, scoring
from rlhf_jax.algorithms import reward_functions
from rlhf_jax.algorithms.reward import load_reward_model
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses import kl as kl_losses
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.losses import reward as reward_losses
from rlhf_jax.losses.common import token_logprobs
from rlhf_jax.models import apply_rows

Array = jax.Array


def token_values(
    graphdef,
    params,
    tokens: Array,
    segment_ids: Array,
    positions: Array,
    response_mask: Array,
    share: tuple[int, int] | None = None,
) -> Array:
  """V for each response token: [B, S] float32, the value model's output at the position before
  the token (the state in which the token is chosen), 0 off the response. share: (K, N), a
  prompt's K samples run with the prompt once (`models.apply_rows`)."""
  values, _ = apply_rows(graphdef, params, tokens, positions, segment_ids, share)
  values = jnp.concatenate([jnp.zeros_like(values[:, :1]), values[:, :-1]], axis=1)
  return jnp.where(response_mask, values, 0.0)


def head_values(hidden: Array, score: Array, response_mask: Array) -> Array:
  """Values from a value head on the policy's trunk: hidden [B, S, E] (final-norm states) x
  score [E] -> [B, S] float32, the value at the position before each response token, 0 elsewhere
  (as `token_values`)."""
  values = jnp.einsum("bse,e->bs", hidden, score.astype(hidden.dtype)).astype(jnp.float32)
  values = jnp.concatenate([jnp.zeros_like(values[:, :1]), values[:, :-1]], axis=1)
  return jnp.where(response_mask, values, 0.0)


def policy_forward(
    policy_graphdef,
    value_graphdef,
    policy_params,
    value_params,
    batch: dict,
    *,
    temperature: float,
    share: tuple[int, int] | None = None,
    response_len: int | None = None,
) -> tuple[Array, Array, Array]:
  """-> (T-scaled logits [B, C, V] predicting the last C tokens (C = S-1, or response_len N),
  log pi(token_t) [B, S] (column t from the logits at t-1, 0 where no logits ran), values [B, S]).

  value_graphdef None: `value_params` = {"score": [E]}, a value head on the policy's own final
  hidden states (one forward pass for both); else a separate scalar-head value model.
  value_params None: no critic (GRPO, RLOO), values are 0. share: (K, N), the rows are a
  prompt's K samples of N tokens, each prompt run once (`models.apply_rows`). response_len: N, the
  responses lie in the last N columns (the rollout's layout): the LM head runs on those only.
  """
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  mask = batch["response_mask"]
  head_from = scoring.logit_columns_from(mask.shape[1], response_len)
  logits, hidden = apply_rows(policy_graphdef, policy_params, *args, share, head_from=head_from)
  if value_params is None:
    values = jnp.zeros(mask.shape, jnp.float32)
  elif value_graphdef is None:
    values = head_values(hidden, value_params["score"], mask)
  else:
    values = token_values(
        value_graphdef,
        value_params,
        batch["tokens"],
        batch["segment_ids"],
        batch["positions"],
        mask,
        share,
    )
  scaled = logits[:, :-1] / temperature
  logp = token_logprobs(scaled, batch["tokens"][:, head_from + 1 :])
  return scaled, jnp.pad(logp, ((0, 0), (head_from + 1, 0))), values


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """How sequence rewards are made from one or two reward models (config.ppo.reward).

  names: ("helpful",) or ("helpful", "safety"); stats: per model {"mean", "std"} (export metadata);
  combine: "llama2" | "linear" (two models); whiten: divide each model's score by its own
  statistics before use (for Llama 2, the selected model's statistics).
  """

  names: tuple[str, ...]
  stats: dict
  combine: str = "llama2"
  safety_threshold: float = 0.15
  helpful_weight: float = 1.0
  safety_weight: float = 1.0
  whiten: bool = True

  def __call__(self, scores: dict, unsafe: Array) -> Array:
    """Raw model scores {name: [B]} and prompt flags [B] -> the sequence reward [B]."""
    norm = lambda name, x: (
        (x - self.stats[name]["mean"]) / max(self.stats[name]["std"], 1e-6) if self.whiten else x
    )
    if len(self.names) == 1:
      return norm(self.names[0], scores[self.names[0]])
    helpful, safety = scores["helpful"], scores["safety"]
    if self.combine == "linear":
      return reward_losses.linear_combined_reward(
          norm("helpful", helpful),
          norm("safety", safety),
          helpful_weight=self.helpful_weight,
          safety_weight=self.safety_weight,
      )
    # Llama 2: the rule reads raw scores (its threshold is on sigmoid(safety)); whitening then
    # uses the statistics of whichever model was selected.
    use_safety = unsafe | (jax.nn.sigmoid(safety) < self.safety_threshold)
    return jnp.where(use_safety, norm("safety", safety), norm("helpful", helpful))


def load_reward_models(cfg: ml_collections.ConfigDict, mesh, *, key: str, dtype: str = "") -> dict:
  """{name: RewardModel} for the exports `cfg.helpful` (required) and `cfg.safety` (optional);
  `key` names the config block in the error, e.g. "config.ppo.reward"; `dtype` ("bfloat16")
  holds them in that dtype."""
  exports = {name: cfg[name] for name in ("helpful", "safety") if cfg[name]}
  if "helpful" not in exports:
    if cfg.get("functions") and not exports:
      return {}  # reward functions alone
    raise ConfigError(
        f"{key}.helpful is empty: give a reward-model export (or reward functions alone: "
        f"{key}.functions)"
    )
  return {name: load_reward_model(path, mesh, dtype=dtype) for name, path in exports.items()}


def reward_spec(cfg: ml_collections.ConfigDict, rms: dict) -> RewardSpec | None:
  """The RewardSpec of a reward config block and its loaded models (their export statistics);
  None without models (reward functions alone)."""
  if not rms:
    return None
  return RewardSpec(
      names=tuple(rms),
      stats={name: rm.stats for name, rm in rms.items()},
      combine=cfg.combine,
      safety_threshold=cfg.safety_threshold,
      helpful_weight=cfg.helpful_weight,
      safety_weight=cfg.safety_weight,
      whiten=cfg.whiten,
  )


def make_score_fn(
    policy_graphdef,
    value_graphdef,
    reward_graphdefs: dict,
    *,
    temperature: float,
    reference_graphdef=None,
    policy_pass: bool = True,
    share: tuple[int, int] | None = None,
    response_len: int | None = None,
):
  """score(policy, reference, value, rewards: {name: params}, batch) -> (old_logp, ref_logp,
  values, {name: scores [B]}); all [B, S] but the scores. value_graphdef None: `value` is a value
  head on the policy (`policy_forward`); `value` None: no critic, values 0. reference_graphdef:
  the reference's (e.g. held in bfloat16), default the policy's. policy_pass False (no critic
  only): no forward pass of the policy; old_logp and values are None. share: (K, N), every
  model runs a prompt's K samples with the prompt once (`models.apply_rows`). response_len: N,
  the responses lie in the last N columns: the LM heads run on those only. Pure; the caller jits
  it."""
  reference_graphdef = reference_graphdef or policy_graphdef

  def score(policy_params, ref_params, value_params, reward_params: dict, batch: dict):
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    if policy_pass:
      _, old_logp, values = policy_forward(
          policy_graphdef,
          value_graphdef,
          policy_params,
          value_params,
          batch,
          temperature=temperature,
          share=share,
          response_len=response_len,
      )
      old_logp = jnp.where(batch["response_mask"], old_logp, 0.0)
    else:
      if value_params is not None:
        raise ValueError("make_score_fn: policy_pass=False is for critic-free estimators only")
      old_logp = values = None
    ref_logp = scoring.response_logprobs(
        reference_graphdef,
        ref_params,
        *args,
        batch["response_mask"],
        temperature=temperature,
        share=share,
        response_len=response_len,
    )
    scores = {
        name: scoring.last_token_scores(reward_graphdefs[name], p, *args, share)
        for name, p in reward_params.items()
    }
    return old_logp, ref_logp, values, scores

  return score


def advantages_fn(
    old_logp: Array,
    ref_logp: Array,
    values: Array,
    reward: Array,
    mask: Array,
    eos_found: Array,
    beta: Array,
    cfg: ml_collections.ConfigDict,
) -> dict:
  """Per-token KL penalty + sequence reward -> GAE (whitened advantages). Pure; jit it.

  cfg = config.ppo (kl_kind, missing_eos_penalty, score_clip, gamma, lam, whiten_advantages,
  overlong_buffer / overlong_penalty: `with_overlong_penalty`).
  """
  kl = kl_losses.kl_penalty(old_logp, ref_logp, mask, kind=cfg.kl_kind)
  rewards = ppo_losses.token_rewards(
      with_overlong_penalty(reward, mask, cfg),
      kl,
      mask,
      beta=beta,
      eos_found=eos_found,
      missing_eos_penalty=cfg.missing_eos_penalty,
      score_clip=cfg.score_clip or None,
  )
  advantages, returns = ppo_losses.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
  if cfg.whiten_advantages:
    advantages = jnp.where(mask, ppo_losses.whiten(advantages, mask), 0.0)
  return {
      "advantages": advantages,
      "returns": returns,
      "kl": kl,
      "sequence_kl": kl_losses.sequence_kl(kl, mask),
  }


ESTIMATORS = ("gae", "grpo", "rloo")  # advantage estimators: PPO's, and the critic-free group ones


def with_overlong_penalty(reward: Array, mask: Array, cfg: ml_collections.ConfigDict) -> Array:
  """reward [B] plus DAPO's soft overlong penalty of each response's length (`mask` [B, S] summed)
  under `cfg.overlong_buffer` / `cfg.overlong_penalty` (losses/ppo.py, `overlong_penalty`);
  unchanged when the buffer is 0."""
  if not cfg.get("overlong_buffer", 0):
    return reward
  lengths = jnp.sum(mask.astype(jnp.int32), axis=1)
  return reward.astype(jnp.float32) + ppo_losses.overlong_penalty(
      lengths,
      max_len=cfg.max_new_tokens,
      buffer=cfg.overlong_buffer,
      factor=cfg.overlong_penalty,
  )


def group_advantages_fn(
    old_logp: Array,
    ref_logp: Array,
    reward: Array,
    mask: Array,
    eos_found: Array,
    beta: Array,
    cfg: ml_collections.ConfigDict,
    *,
    estimator: str,
) -> dict:
  """Critic-free advantages from a prompt's K samples (rows of one prompt contiguous, [B = N x K]);
  every response token of a sample gets its sequence advantage. Pure; jit it.

  The sequence score is `reward` [B] (plus DAPO's overlong penalty, `with_overlong_penalty`) plus
  `cfg.missing_eos_penalty` where no EOS was sampled (clipped to `cfg.score_clip` first, as PPO's
  `token_rewards`), then:
  - "grpo" (Shao et al. 2024): `(s - mean_K s) / (std_K s + eps)` (`cfg.scale_rewards=False`:
    only centred, Dr. GRPO); the KL to the reference is *not* in the reward (GRPO puts
    `beta * k3` in the loss, `make_ppo_loss_fn`).
  - "rloo" (Ahmadian et al. 2024): `s - beta * sum_t KL_t` (KL in the reward, `cfg.kl_kind`),
    minus the mean of the prompt's other samples.
  Returns {"advantages" [B, S] (0 off the response), "returns" (zeros: no critic), "kl" [B, S],
  "sequence_kl" [B]}.
  """
  if estimator not in ("grpo", "rloo"):
    raise ValueError(f"group_advantages_fn: estimator={estimator!r}; choose 'grpo' or 'rloo'")
  k = cfg.samples_per_prompt
  kl = kl_losses.kl_penalty(old_logp, ref_logp, mask, kind=cfg.kl_kind)
  sequence_kl = kl_losses.sequence_kl(kl, mask)
  score = with_overlong_penalty(reward, mask, cfg).astype(jnp.float32)
  if cfg.score_clip:
    score = jnp.clip(score, -cfg.score_clip, cfg.score_clip)
  score = score + jnp.where(eos_found, 0.0, jnp.float32(cfg.missing_eos_penalty))
  if estimator == "grpo":
    adv = ppo_losses.grpo_advantages(score.reshape(-1, k), scale=cfg.scale_rewards)
  else:
    adv = ppo_losses.rloo_advantages((score - beta * sequence_kl).reshape(-1, k))
  advantages = jnp.where(mask, adv.reshape(-1)[:, None], 0.0)
  return {
      "advantages": advantages,
      "returns": jnp.zeros_like(advantages),
      "kl": kl,
      "sequence_kl": sequence_kl,
  }


REWARD_BASELINES = ("none", "rloo")  # config.ppo.reward_baseline


def baselined_reward(reward: Array, samples_per_prompt: int, kind: str) -> Array:
  """The sequence reward [B * K] (K samples of each prompt contiguous) minus its baseline:
  kind "none" -> unchanged; "rloo" -> minus the mean reward of the same prompt's other samples
  (Ahmadian et al. 2024's leave-one-out baseline, here inside PPO's per-token reward)."""
  if kind == "none":
    return reward
  if kind == "rloo":
    return ppo_losses.rloo_advantages(reward.reshape(-1, samples_per_prompt)).reshape(-1)
  raise ConfigError(f"config.ppo.reward_baseline={kind!r}; choose one of {REWARD_BASELINES}")


def encode_prompts(
    tokenizer, records: Sequence[dict], max_prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompt ids [B, max_prompt_len] and mask; a longer prompt is an error naming it."""
  ids = [data.encode_prompt(tokenizer, r["prompt"]) for r in records]
  for record, prompt in zip(records, ids):
    if len(prompt) > max_prompt_len:
      raise ValueError(
          f"prompt {record['prompt']!r} has {len(prompt)} tokens > "
          f"config.ppo.max_prompt_len={max_prompt_len}; raise it"
      )
  tokens, mask = generate.prompt_batch(ids, pad_id=tokenizer.pad_token_id)
  pad = max_prompt_len - tokens.shape[1]
  return (
      np.pad(tokens, ((0, 0), (pad, 0)), constant_values=tokenizer.pad_token_id),
      np.pad(mask, ((0, 0), (pad, 0)), constant_values=False),
  )


def eos_found(out: generate.GenerateOutput, eos_id: int) -> Array:
  """[B] bool: the response ends with EOS (else it ran out of max_new_tokens)."""
  last = jnp.maximum(out.lengths - 1, 0)
  return jnp.take_along_axis(out.tokens, last[:, None], axis=1)[:, 0] == eos_id


def decode_responses(tokenizer, out: generate.GenerateOutput) -> list[str]:
  """Each row's response text, special tokens dropped; in a multi-turn rollout (`out.tool_mask`)
  the final answer: the tokens after the environment's last message."""
  tokens, mask = jax.device_get(out.tokens), generate.answer_mask(out)
  return [tokenizer.decode(t[m], skip_special_tokens=True).strip() for t, m in zip(tokens, mask)]


__all__ = [
    "token_values",
    "head_values",
    "policy_forward",
    "RewardSpec",
    "load_reward_models",
    "reward_spec",
    "make_score_fn",
    "advantages_fn",
    "ESTIMATORS",
    "group_advantages_fn",
    "REWARD_BASELINES",
    "baselined_reward",
    "encode_prompts",
    "eos_found",
    "decode_responses",
]


def best_of_k(
    policy_params,
    sampler,
    rms: dict,
    spec,
    tokenizer,
    prompts: list[dict],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    max_prompt_len: int,
    batch_prompts: int,
    rng,
    functions: reward_functions.RewardFunctions = reward_functions.NONE,
) -> list[dict]:
  """For each prompt, K samples scored by `spec` and/or the reward `functions` (added): [{"record",
  "texts" [K], "rewards" [K], "scores" {model name: [K] raw scores}, "mean_logprob" [K]: the
  policy's mean per-token log-prob of each sample at `temperature`}] ("rewards" only with a spec
  or functions).

  Each prompt is prefilled once for its K samples (`Sampler(..., samples=K)`), and the reward
  models run a prompt's K samples as one row with the prompt once (`scoring.last_token_scores`
  with `share`): the scores of the plain rows (tested), on fewer tokens."""
  share = (k, max_new_tokens) if k > 1 else None
  score = jax.jit(
      lambda params, batch: {
          name: scoring.last_token_scores(
              rm.graphdef,
              params[name],
              batch["tokens"],
              batch["segment_ids"],
              batch["positions"],
              share,
          )
          for name, rm in rms.items()
      }
  )
  reward_fn = jax.jit(spec.__call__) if spec is not None else None
  out = []
  for start in range(0, len(prompts), batch_prompts):
    chunk = prompts[start : start + batch_prompts]
    repeated = [r for r in chunk for _ in range(k)]
    tokens, mask = encode_prompts(tokenizer, chunk, max_prompt_len)
    gen = sampler(
        policy_params,
        tokens,
        mask,
        jax.random.fold_in(rng, start),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        samples=k,
    )
    tokens, mask = np.repeat(tokens, k, axis=0), np.repeat(mask, k, axis=0)  # a row per sample
    seq, segment_ids, positions, _ = generate.full_sequence(tokens, mask, gen)
    scores = (
        score(
            {name: rm.params for name, rm in rms.items()},
            {"tokens": seq, "segment_ids": segment_ids, "positions": positions},
        )
        if rms
        else {}
    )
    unsafe = jnp.asarray([bool(r.get("unsafe", False)) for r in repeated])
    rewards = (
        np.asarray(reward_fn(scores, unsafe)).reshape(len(chunk), k)
        if reward_fn is not None
        else None
    )
    scores = {name: np.asarray(x).reshape(len(chunk), k) for name, x in scores.items()}
    texts = decode_responses(tokenizer, gen)
    if functions:
      extra = functions(repeated, texts).reshape(len(chunk), k)
      rewards = extra if rewards is None else rewards + extra
    mean_logprob = np.asarray(jnp.sum(gen.logprobs, axis=1) / jnp.maximum(gen.lengths, 1))
    mean_logprob = mean_logprob.reshape(len(chunk), k)
    for i, record in enumerate(chunk):
      out.append(
          {
              "record": record,
              "texts": texts[i * k : (i + 1) * k],
              "scores": {name: x[i] for name, x in scores.items()},
              "mean_logprob": mean_logprob[i],
              **({"rewards": rewards[i]} if rewards is not None else {}),
          }
      )
  return out
