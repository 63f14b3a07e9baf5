"""PPO against reward models (InstructGPT / Ziegler et al. / Llama 2's final stage).

One iteration: sample `samples_per_prompt` responses to each of `prompts_per_iteration` prompts
from the policy (jitted KV-cache sampler), score them without gradients (policy and reference
log-probs, values, reward-model scores), make per-token rewards (-beta KL + the sequence reward at
the last token, optionally relative to the prompt's other samples: `reward_baseline="rloo"`) and
GAE advantages, then run
`epochs` passes of `minibatches` shuffled mini-batches **inside one jitted update** (a scan over
the shared optimiser step), and update beta (fixed or adaptive KL controller).

Models: the policy (from `config.init_from`, an SFT export), a frozen reference (the same export),
a value model: separate (`config.ppo.value_model="separate"`: scalar head, from
`config.ppo.value_init_from`, a reward-model export as in InstructGPT, or any LM export whose head
is then replaced) or a scalar value head on the policy's own trunk ("policy_head": one forward
pass for log-probs and values, the value loss also shapes the shared trunk), and one or two reward models
(`config.ppo.reward.helpful` / `.safety` exports) combined by the Llama 2 rule or linearly.
The optimiser state covers {"policy", "value"}: one TrainState, checkpointed whole.

WORKDIR: checkpoints/ (state + prompt-stream position, iteration's beta), metrics.jsonl + tb/ (per
iteration: reward, gold helpfulness/safety/combined on toy prompts, KL, length, entropy, clip
fraction, beta, ...; with `ppo.eval_every`, "eval/" rows every that many iterations and at 0:
held-out gold and KL to the reference on `data.eval_source` tasks, the over-optimisation curve),
export/ (the policy: what the next stage and the gold evaluation load).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from rlhf_jax import data, generate, sharding
from rlhf_jax.algorithms import (
    ai_feedback,
    common,
    environments,
    ppo_rollout,
    registry,
    reward_functions,
)
from rlhf_jax.algorithms.reward import cast_params
from rlhf_jax.data.loader import Batching
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.losses import kl as kl_losses
from rlhf_jax.losses import ppo as ppo_losses
from rlhf_jax.models import ModelConfig, abstract_model, lora
from rlhf_jax.toyworld import verifiers
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import (
    check_nonfinite,
    checkpoint,
    create_train_state,
    make_optimizer,
    make_update,
    metrics,
    nonfinite_counts,
    state_shardings,
    train_compiler_options,
)

_log = logging.getLogger(__name__)


def make_ppo_loss_fn(
    policy_graphdef,
    value_graphdef,
    cfg: ml_collections.ConfigDict,
    *,
    estimator: str = "gae",
    share: tuple[int, int] | None = None,
    response_len: int | None = None,
):
  """loss_fn(params {"policy", "value"?}, rollout mini-batch, rng): clipped policy loss +
  vf_coef x clipped value loss - entropy_coef x entropy; per-token means over the mini-batch
  (loss_weight: `aggregate_loss`'s weight, so micro-batches combine by it).

  estimator "grpo": no critic (params without "value", no value loss) and `cfg.kl.beta x k3`
  KL to the reference (the rollout's "ref_logp") added to the loss, as GRPO does; "rloo": no
  critic, the KL is already in the advantages. share: (K, N), mini-batches of whole groups of a
  prompt's K samples, each prompt run once (`models.apply_rows`). response_len: N, the responses
  lie in the rollout's last N columns: the LM head, log-softmax and entropy run on those only.
  """
  critic = estimator == "gae"

  def loss_fn(params, batch, rng):
    del rng
    mask = batch["response_mask"]
    # Log-probs of the distribution that was sampled (T-scaled logits); values from the separate
    # value model or the value head on the policy's trunk (value_graphdef None), or none.
    scaled, logp, values = ppo_rollout.policy_forward(
        policy_graphdef,
        value_graphdef,
        params["policy"],
        params.get("value"),
        batch,
        temperature=cfg.temperature,
        share=share,
        response_len=response_len,
    )
    # No "old_logp" (GRPO's one update per rollout, `make_iteration`): the policy that sampled is
    # the one being differentiated, so its log-probs are these, held constant (ratio 1).
    old_logp = batch.get("old_logp", jax.lax.stop_gradient(logp))
    policy_loss, out = ppo_losses.clipped_policy_loss(
        logp,
        old_logp,
        batch["advantages"],
        mask,
        eps_low=cfg.clip_eps,
        eps_high=cfg.clip_eps_high or cfg.clip_eps,
        importance=cfg.importance_level,
        aggregation=cfg.loss_aggregation,
        max_len=cfg.max_new_tokens,
    )
    loss = policy_loss
    if critic:
      value_loss, value_metrics = ppo_losses.ppo_value_loss(
          values, batch["old_values"], batch["returns"], mask, clip_eps=cfg.value_clip_eps
      )
      loss, out = loss + cfg.vf_coef * value_loss, {**value_metrics, **out}
    if estimator == "grpo":  # aggregated as the policy loss, so micro-batches weigh alike
      kl, _ = ppo_losses.aggregate_loss(
          kl_losses.kl_penalty(logp, batch["ref_logp"], mask, kind="k3"),
          mask,
          cfg.loss_aggregation,
          max_len=cfg.max_new_tokens,
      )
      loss, out = loss + cfg.kl.beta * kl, {**out, "kl_loss": kl}
    entropy = ppo_losses.entropy_from_logits(scaled, mask[:, -scaled.shape[1] :])
    loss = loss - cfg.entropy_coef * entropy
    return loss, {**out, "entropy": entropy, "loss": loss}

  return loss_fn


def make_ppo_update(
    loss_fn, optimizer, *, mesh, shardings, cfg: ml_collections.ConfigDict, group: int = 1
):
  """Jitted `update(state, rollout) -> (state, metrics)`: `cfg.epochs` passes over the rollout,
  each a fresh shuffle cut into `cfg.minibatches` mini-batches, one optimiser step each (a nested
  `lax.scan`, so a whole PPO phase is one XLA program). Metrics: means over all steps, and the
  first mini-batch's approx_kl / clip_fraction (which should be ~0 when rollout and update
  numerics agree). group: shuffle whole groups of that many consecutive rows (a prompt's samples,
  for a loss that runs each prompt once)."""
  step = make_update(loss_fn, optimizer, accum_steps=cfg.accum_steps)

  def update(state, rollout):
    with sharding.activation_sharding(mesh):
      rows = rollout["tokens"].shape[0]
      size = rows // cfg.minibatches

      def epoch(state, key):
        order = (
            jax.random.permutation(key, rows // group)[:, None] * group + jnp.arange(group)
        ).reshape(-1)
        minibatches = jax.tree.map(
            lambda x: x[order].reshape((cfg.minibatches, size) + x.shape[1:]), rollout
        )

        def one(state, minibatch):
          minibatch = jax.tree.map(
              lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), minibatch
          )
          return step(state, minibatch)

        return jax.lax.scan(one, state, minibatches)

      keys = jax.random.split(jax.random.fold_in(state.key(), 1), cfg.epochs)
      state, history = jax.lax.scan(epoch, state, keys)  # leaves [epochs, minibatches]
    out = jax.tree.map(jnp.mean, history)
    out["first_approx_kl"] = history["approx_kl"][0, 0]
    out["first_clip_fraction"] = history["clip_fraction"][0, 0]
    return state, out

  return jax.jit(
      update,
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
      compiler_options=train_compiler_options(mesh),
  )


def load_prompts(source: str) -> list[dict]:
  """Prompt records: JSON objects with "prompt" (string or chat messages) and optional "unsafe"
  (bool: the prompt is flagged safety-critical, for the Llama 2 reward rule). Toy-world task
  records also carry what gold scoring needs."""
  rows, name = data.read_rows(source)
  out = []
  for line, row in rows:
    if not isinstance(row, dict):
      raise data.RecordError(
          name,
          line,
          None,
          f"expected a JSON object with a 'prompt' field, got " f"{type(row).__name__}",
      )
    record = data.validate_record(
        {"prompt": row.get("prompt"), "completion": "-"}, "sft", source=name, line=line
    )
    if "unsafe" in row and not isinstance(row["unsafe"], bool):
      raise data.RecordError(name, line, "unsafe", f"expected true/false, got {row['unsafe']!r}")
    out.append({**row, "prompt": record["prompt"]})
  if not out:
    raise ValueError(f"{name}: no prompts")
  return out


def make_iteration(
    policy_graphdef,
    value_graphdef,
    reward_graphdefs: dict,
    policy_cfg: ModelConfig,
    spec: ppo_rollout.RewardSpec,
    optimizer,
    *,
    mesh,
    policy_shardings,
    shardings,
    cfg: ml_collections.ConfigDict,
    eos_id: int,
    pad_id: int,
    reference_graphdef=None,
    estimator: str = "gae",
    tools: environments.Tools | None = None,
    rollout_mesh=None,
):
  """One PPO iteration as a function (the trainer's loop body and the `ppo_iteration` benchmark):

    iteration(state, reference, reward_params {name: params}, prompt_tokens [N, P],
              prompt_mask [N, P], unsafe [N], rng, beta, text_reward=None) -> (state, info)

  Each of the N prompts is sampled `cfg.samples_per_prompt` = K times (rows B = N x K, a prompt's
  samples contiguous); with `cfg.reward_baseline="rloo"` each sequence reward is taken relative to
  the mean of its prompt's other samples before the per-token rewards are made.
  sample (jitted sampler) -> score without gradients (jitted) -> rewards and GAE (jitted) ->
  `cfg.epochs` x `cfg.minibatches` optimiser steps (one jitted scan). info: "out" (the sampler's
  GenerateOutput), "reward" [B] (before the baseline), "scores" {name: [B]}, "eos_found" [B],
  "sequence_kl" [B] and "update" (the update's metrics); all device arrays, nothing is read back
  here.
  `text_reward(out) -> [B]`, when given, replaces the reward models (e.g. the toy world's gold
  reward of the decoded responses); `spec` may then be None. reference_graphdef: the frozen
  reference's graph (e.g. bfloat16, `config.ppo.frozen_dtype`), default the policy's.
  tools: multi-turn rollouts (`cfg.tools`): the environment and the tool format; the iteration
  then needs the prompts' `records`, and the environment's tokens are left out of the losses.
  rollout_mesh: sample on these devices (`cfg.rollout_devices`; the policy replicated there, its
  weights copied over at every rollout), score and update on `mesh`.
  """
  sampler_class = generate.Sampler if tools is None else generate.TurnSampler
  if rollout_mesh is None:
    sampler = sampler_class(
        policy_graphdef, policy_cfg, mesh=mesh, param_shardings=policy_shardings
    )
  else:
    sampler = sampler_class(policy_graphdef, policy_cfg, mesh=rollout_mesh)
  if tools is not None:
    sampler = environments.ToolSampler(
        sampler,
        tools,
        max_turns=cfg.max_turns,
        queue_size=cfg.tool_message_tokens,
        max_steps=cfg.max_decode_steps,
    )
  # GRPO with one optimiser step per rollout (epochs = mini-batches = 1, as TRL's GRPOTrainer at
  # num_iterations=1): the old log-probs are the updated policy's own, detached, so the scoring
  # pass of the policy is skipped; the sampler's log-probs (the same quantity from the decode
  # loop) stand in for it in the logged KL.
  single_update = estimator == "grpo" and cfg.epochs == 1 and cfg.minibatches == 1
  # config.ppo.share_prompt: every forward pass runs a prompt's K samples with the prompt once.
  share = (cfg.samples_per_prompt, cfg.max_new_tokens) if cfg.share_prompt else None
  score, advantages, baseline = _rollout_fns(
      policy_graphdef,
      value_graphdef,
      reward_graphdefs,
      cfg,
      reference_graphdef=reference_graphdef,
      estimator=estimator,
      single_update=single_update,
      share=share,
  )
  reward_fn = jax.jit(spec.__call__) if spec is not None else None
  update = _update_fn(
      policy_graphdef,
      value_graphdef,
      policy_cfg,
      optimizer,
      mesh=mesh,
      shardings=shardings,
      cfg=cfg,
      estimator=estimator,
      share=share,
  )
  return _Iteration(
      sampler=sampler,
      score=score,
      advantages=advantages,
      baseline=baseline,
      reward_fn=reward_fn,
      update=update,
      rollout_sharding=sharding.batch_sharding(mesh),
      cfg=cfg,
      eos_id=eos_id,
      pad_id=pad_id,
      estimator=estimator,
      single_update=single_update,
      split=rollout_mesh is not None,
  )


@dataclasses.dataclass(frozen=True)
class _Iteration:
  """`make_iteration`'s function: its jitted programs and the settings they share."""

  sampler: Any
  score: Callable
  advantages: Callable
  baseline: Callable
  reward_fn: Callable | None
  update: Callable
  rollout_sharding: Any
  cfg: ml_collections.ConfigDict
  eos_id: int
  pad_id: int
  estimator: str
  single_update: bool
  split: bool = False  # the sampler has devices of its own (cfg.rollout_devices)

  def sample(self, params, prompt_tokens, prompt_mask, rng) -> generate.GenerateOutput:
    """K samples of each prompt (one-turn), dispatched and not waited for: with
    `cfg.staleness` 1 the next batch samples (on the rollout devices) while this one updates."""
    cfg = self.cfg
    return self.sampler(  # the prompt prefilled once for its K samples
        params,
        prompt_tokens,
        prompt_mask,
        rng,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        eos_id=self.eos_id,
        pad_id=self.pad_id,
        samples=cfg.samples_per_prompt,
    )

  def __call__(
      self,
      state,
      reference,
      reward_params,
      prompt_tokens,
      prompt_mask,
      unsafe,
      rng,
      beta,
      text_reward=None,
      refill: Callable | None = None,
      records: Sequence[dict] | None = None,
      sampled: generate.GenerateOutput | None = None,
  ):
    """Rollout, rewards, advantages and the updates on one batch of prompts. refill (DAPO's
    dynamic sampling, `cfg.dynamic_sampling`): refill() -> (prompt_tokens, prompt_mask, unsafe,
    text_reward, records) of the next batch of prompts, sampled while fewer than the batch's
    groups have rewards that differ (`_dynamic_batch`). records: the prompts' records (the
    environment of a multi-turn rollout reads them). sampled: these prompts' samples, already
    drawn (`sample`; with `cfg.staleness` 1, by the policy before the previous update)."""
    r = self._rollout(
        state,
        reference,
        reward_params,
        prompt_tokens,
        prompt_mask,
        unsafe,
        rng,
        text_reward,
        records,
        sampled,
    )
    dynamic = None
    if self.cfg.get("dynamic_sampling", False) and refill is not None:
      r, dynamic = self._dynamic_batch(r, state, reference, reward_params, rng, refill)
    adv = self.advantages(
        r["sampled_logp"],
        r["ref_logp"],
        r["values"],
        self.baseline(r["reward"]),
        r["batch"]["response_mask"],
        r["found"],
        jnp.float32(beta),
    )
    rollout = {**r["batch"], "advantages": adv["advantages"]}
    if self.cfg.get("staleness", 0):  # the ratio is against the policy that sampled
      rollout["old_logp"] = r["sampled_logp"]
    elif not self.single_update:
      rollout["old_logp"] = r["old_logp"]
    if self.estimator == "gae":
      rollout.update(old_values=r["values"], returns=adv["returns"])
    elif self.estimator == "grpo":  # its KL term is in the loss
      rollout["ref_logp"] = r["ref_logp"]
    # Batch-sharded as the update expects (XLA may leave a scoring output replicated, e.g. for
    # 24 rows on a (4, 1, 2) mesh); a no-op when it already is.
    state, update_metrics = self.update(state, jax.device_put(rollout, self.rollout_sharding))
    return state, {
        "out": r["out"],
        "episodes": r.get("episodes"),
        "reward": r["reward"],
        "scores": r["scores"],
        "eos_found": r["found"],
        "sequence_kl": adv["sequence_kl"],
        "update": update_metrics,
        "dynamic": dynamic,
    }

  def _rollout(
      self,
      state,
      reference,
      reward_params,
      prompt_tokens,
      prompt_mask,
      unsafe,
      rng,
      text_reward,
      records=None,
      sampled=None,
  ) -> dict:
    """K samples of each prompt, their log-probs, values, scores and rewards: every array [B =
    prompts x K, ...] (rows b K .. b K + K - 1 are prompt b's). With tools, multi-turn rollouts:
    "episodes" (one per row), the environment's rewards added, its tokens out of the mask."""
    cfg, k = self.cfg, self.cfg.samples_per_prompt
    episodes = None
    if isinstance(self.sampler, environments.ToolSampler):
      if records is None:
        raise ValueError("a multi-turn rollout needs the prompts' records")
      out, episodes = self.sampler.rollout(
          state.params["policy"],
          prompt_tokens,
          prompt_mask,
          records,
          rng,
          max_new_tokens=cfg.max_new_tokens,
          eos_id=self.eos_id,
          pad_id=self.pad_id,
          temperature=cfg.temperature,
          samples=k,
      )
    elif sampled is not None:
      out = sampled
    else:
      out = self.sample(state.params["policy"], prompt_tokens, prompt_mask, rng)
    if self.split:  # from the rollout devices to the training mesh
      out = jax.device_put(out, self.rollout_sharding)
    prompt_tokens, prompt_mask, unsafe = (
        jnp.repeat(jnp.asarray(x), k, axis=0) for x in (prompt_tokens, prompt_mask, unsafe)
    )
    batch = dict(
        zip(
            ("tokens", "segment_ids", "positions", "response_mask"),
            generate.full_sequence(prompt_tokens, prompt_mask, out),
        )
    )
    if out.tool_mask is not None:  # the environment's tokens: read by the model, not trained on
      batch["response_mask"] = jnp.concatenate(
          [jnp.zeros(prompt_mask.shape, bool), generate.model_mask(out)], axis=1
      )
    old_logp, ref_logp, values, scores = self.score(
        state.params["policy"], reference, state.params.get("value"), reward_params, batch
    )
    sampled_logp = old_logp
    if self.single_update or cfg.get("staleness", 0):  # column P + j is the sampler's column j
      sampled_logp = jnp.concatenate(
          [jnp.zeros(prompt_tokens.shape, jnp.float32), out.logprobs], axis=1
      )
    # Reward models' combination, a reward of the decoded texts (judge, gold, reward functions),
    # or both added.
    reward = self.reward_fn(scores, unsafe) if self.reward_fn is not None else 0.0
    if text_reward is not None:
      reward = reward + jnp.asarray(text_reward(out), jnp.float32)
    if episodes is not None:  # per-turn rewards of the environment
      reward = reward + jnp.asarray([e.reward for e in episodes], jnp.float32)
    return {
        "episodes": episodes,
        "batch": batch,
        "out": out,
        "old_logp": old_logp,
        "sampled_logp": sampled_logp,
        "ref_logp": ref_logp,
        "values": values,
        "scores": scores,
        "reward": jnp.asarray(reward, jnp.float32),
        "found": ppo_rollout.eos_found(out, self.eos_id),
    }

  def _dynamic_batch(self, r, state, reference, reward_params, rng, refill) -> tuple[dict, dict]:
    """DAPO's dynamic sampling: keep the groups whose K rewards are not all equal (the others
    have zero advantage and no gradient), sample further batches of prompts (`refill`) until as
    many groups as the batch holds are kept or `cfg.dynamic_sampling_rounds` rollouts are done,
    then fill what is still missing with dropped groups (zero advantage: shapes stay fixed).
    Returns (the rollout of the chosen groups, {"rounds", "kept": kept groups / sampled groups,
    "filled": groups filled with equal rewards, "groups": [(rollout, group)] chosen})."""
    k = self.cfg.samples_per_prompt
    groups = int(r["reward"].shape[0]) // k
    rollouts, kept, dropped = [r], [], []

    def sort(index: int, rollout: dict) -> None:
      rewards = np.asarray(rollout["reward"]).reshape(groups, k)
      varied = rewards.max(axis=1) - rewards.min(axis=1) > 1e-6
      kept.extend((index, g) for g in np.flatnonzero(varied))
      dropped.extend((index, g) for g in np.flatnonzero(~varied))

    sort(0, r)
    while len(kept) < groups and len(rollouts) < self.cfg.dynamic_sampling_rounds:
      prompt_tokens, prompt_mask, unsafe, text_reward, records = refill()
      more = self._rollout(
          state,
          reference,
          reward_params,
          prompt_tokens,
          prompt_mask,
          unsafe,
          jax.random.fold_in(rng, len(rollouts)),
          text_reward,
          records,
      )
      rollouts.append(more)
      sort(len(rollouts) - 1, more)
    chosen = (kept + dropped)[:groups]
    episodes = [rollout.pop("episodes", None) for rollout in rollouts]
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rollouts)
    rows = np.asarray([(i * groups + g) * k + j for i, g in chosen for j in range(k)])
    info = {
        "rounds": len(rollouts),
        "kept": len(kept) / (groups * len(rollouts)),
        "filled": max(0, groups - len(kept)),
        "groups": chosen,
    }
    chosen_rollout = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), stacked)
    if episodes[0] is not None:
      every = [e for batch in episodes for e in batch]
      chosen_rollout["episodes"] = [every[row] for row in rows]
    return chosen_rollout, info


def _update_fn(
    policy_graphdef,
    value_graphdef,
    policy_cfg: ModelConfig,
    optimizer,
    *,
    mesh,
    shardings,
    cfg: ml_collections.ConfigDict,
    estimator: str,
    share,
):
  """The iteration's jitted `cfg.epochs` x `cfg.minibatches` update (`make_ppo_update`) of the
  estimator's loss; with LoRA only the adapters (and a value head) train."""
  # The responses are the rollout's last max_new_tokens columns: only their logits are computed.
  loss_fn = make_ppo_loss_fn(
      policy_graphdef,
      value_graphdef,
      cfg,
      estimator=estimator,
      share=share,
      response_len=cfg.max_new_tokens,
  )
  if policy_cfg.lora_rank:  # only the adapters (and a value head) train
    loss_fn = lora.freeze_base(loss_fn)
  return make_ppo_update(
      loss_fn,
      optimizer,
      mesh=mesh,
      shardings=shardings,
      cfg=cfg,
      group=cfg.samples_per_prompt if share else 1,
  )


def _rollout_fns(
    policy_graphdef,
    value_graphdef,
    reward_graphdefs: dict,
    cfg: ml_collections.ConfigDict,
    *,
    reference_graphdef,
    estimator: str,
    single_update: bool,
    share,
):
  """The iteration's jitted rollout programs: (score, advantages, baseline).

  score(policy, reference, value, reward_params, batch) -> (old_logp, ref_logp, values, scores);
  advantages(old_logp, ref_logp, values, reward [B], response_mask, eos_found, beta) -> GAE
  (estimator "gae") or the group estimators' dict; baseline(reward [B]) -> [B] relative to the
  prompt's other samples (`cfg.reward_baseline`)."""
  score = jax.jit(
      ppo_rollout.make_score_fn(
          policy_graphdef,
          value_graphdef,
          reward_graphdefs,
          temperature=cfg.temperature,
          reference_graphdef=reference_graphdef,
          policy_pass=not single_update,
          share=share,
          response_len=cfg.max_new_tokens,
      )
  )
  if estimator == "gae":
    advantages = jax.jit(
        lambda old, ref, values, *args: ppo_rollout.advantages_fn(old, ref, values, *args, cfg=cfg)
    )
  else:
    advantages = jax.jit(
        lambda old, ref, values, *args: ppo_rollout.group_advantages_fn(
            old, ref, *args, cfg=cfg, estimator=estimator
        )
    )
  baseline = jax.jit(
      lambda r: ppo_rollout.baselined_reward(r, cfg.samples_per_prompt, cfg.reward_baseline)
  )
  return score, advantages, baseline


# config.algorithm -> advantage estimator. PPO, GRPO and RLOO share the `config.ppo` block and this
# driver: GRPO and RLOO are PPO's loop without a critic (ppo_rollout.group_advantages_fn).
ESTIMATOR_OF = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo"}
# Config fields naming other stages (a pipeline resolves them to those stages' exports).
_PPO_STAGE_FIELDS = (
    "ppo.reward.helpful",
    "ppo.reward.safety",
    "ppo.reward.judge",
    "ppo.value_init_from",
)


def check_group_config(config: ml_collections.ConfigDict, estimator: str) -> None:
  """The group methods' config constraints, checked before any model loads."""
  p = config.ppo
  if estimator == "gae":
    return
  name = config.algorithm
  if p.samples_per_prompt < 2:
    raise ConfigError(
        f"config.algorithm={name!r} compares a prompt's samples: set "
        f"config.ppo.samples_per_prompt >= 2 (it is {p.samples_per_prompt})"
    )
  if p.reward_baseline != "none":
    raise ConfigError(
        f"config.ppo.reward_baseline={p.reward_baseline!r} is PPO's option; "
        f"{name} has its own baseline: set it to 'none'"
    )
  if p.kl.adaptive:
    raise ConfigError(f"config.ppo.kl.adaptive=True: {name} uses a fixed config.ppo.kl.beta")


def check_policy_loss_config(p: ml_collections.ConfigDict, estimator: str) -> None:
  """The surrogate's options in `config.ppo` (clip-higher, aggregation, importance level, overlong
  penalty): ConfigError naming the field."""
  if p.clip_eps_high and p.clip_eps_high < p.clip_eps:
    raise ConfigError(
        f"config.ppo.clip_eps_high={p.clip_eps_high} is below config.ppo.clip_eps={p.clip_eps} "
        "(eps_low): clip-higher only widens the upper side; set it >= clip_eps, or 0 for "
        "clip_eps itself"
    )
  if p.loss_aggregation not in ppo_losses.LOSS_AGGREGATIONS:
    raise ConfigError(
        f"config.ppo.loss_aggregation={p.loss_aggregation!r}; choose one of "
        f"{ppo_losses.LOSS_AGGREGATIONS}"
    )
  if p.importance_level not in ppo_losses.IMPORTANCE_LEVELS:
    raise ConfigError(
        f"config.ppo.importance_level={p.importance_level!r}; choose one of "
        f"{ppo_losses.IMPORTANCE_LEVELS}"
    )
  if p.importance_level == "sequence" and estimator == "gae":
    raise ConfigError(
        "config.ppo.importance_level='sequence' (GSPO) weighs a whole sample by one ratio, which "
        "needs one advantage per sample: use it with algorithm 'grpo' or 'rloo'"
    )
  if p.dynamic_sampling and estimator == "gae":
    raise ConfigError(
        "config.ppo.dynamic_sampling=True drops groups of a prompt's samples whose rewards are "
        "all equal: use it with algorithm 'grpo' or 'rloo'"
    )
  if p.overlong_buffer > p.max_new_tokens:
    raise ConfigError(
        f"config.ppo.overlong_buffer={p.overlong_buffer} exceeds config.ppo.max_new_tokens="
        f"{p.max_new_tokens}: the penalty ramps over the last overlong_buffer tokens of the budget"
    )


def _value_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.init_from = config.ppo.value_init_from or config.init_from
  return c


def split_devices(config: ml_collections.ConfigDict) -> tuple[list, list]:
  """(training devices, rollout devices) for `config.ppo.rollout_devices` = k: the last k devices
  sample, the others train; ShardingConfigError naming the fields when they cannot."""
  devices, k = jax.devices(), config.ppo.rollout_devices
  if not 0 < k < len(devices):
    raise sharding.ShardingConfigError(
        f"config.ppo.rollout_devices={k} must leave devices to train on: choose 1 .. "
        f"{len(devices) - 1} of the {len(devices)} devices (0 = sample and train on all)"
    )
  train = devices[: len(devices) - k]
  try:
    sharding.make_mesh(config.mesh.shape, train)
  except sharding.ShardingConfigError as e:
    raise sharding.ShardingConfigError(
        f"config.mesh.shape={tuple(config.mesh.shape)} does not fit the {len(train)} training "
        f"devices left by config.ppo.rollout_devices={k} ({e}); e.g. config.mesh.shape=(-1, 1, 1)"
    ) from None
  return train, devices[len(devices) - k :]


def check_config(config: ml_collections.ConfigDict) -> str:
  """The advantage estimator of `config.algorithm` ("gae", "grpo", "rloo"), after checking the
  `config.ppo` block; ConfigError naming the field otherwise. Nothing is loaded."""
  p = config.ppo
  estimator = ESTIMATOR_OF.get(config.algorithm)
  if estimator is None:
    raise ConfigError(
        f"config.algorithm={config.algorithm!r}: ppo.train runs {', '.join(ESTIMATOR_OF)}"
    )
  check_group_config(config, estimator)
  check_policy_loss_config(p, estimator)
  if p.reward.get("functions") and (p.reward.judge or p.reward.gold):
    raise ConfigError(
        "config.ppo.reward.functions is set beside config.ppo.reward."
        f"{'judge' if p.reward.judge else 'gold'}: choose one reward (the gold reward is also "
        "the function rlhf_jax.toyworld.verifiers:gold)"
    )
  rows = p.prompts_per_iteration * p.samples_per_prompt
  if p.samples_per_prompt < 1 or rows % p.minibatches:
    raise ConfigError(
        f"config.ppo.prompts_per_iteration x samples_per_prompt = "
        f"{p.prompts_per_iteration} x {p.samples_per_prompt} is not a positive "
        f"multiple of config.ppo.minibatches={p.minibatches}"
    )
  if p.reward_baseline not in ppo_rollout.REWARD_BASELINES:
    raise ConfigError(
        f"config.ppo.reward_baseline={p.reward_baseline!r}; choose one of "
        f"{ppo_rollout.REWARD_BASELINES}"
    )
  if p.reward_baseline != "none" and p.samples_per_prompt < 2:
    raise ConfigError(
        f"config.ppo.reward_baseline={p.reward_baseline!r} compares a prompt's "
        f"samples: set config.ppo.samples_per_prompt >= 2 (it is "
        f"{p.samples_per_prompt})"
    )
  if p.share_prompt and (
      p.samples_per_prompt < 2 or p.prompts_per_iteration % (p.minibatches * p.accum_steps)
  ):
    raise ConfigError(
        f"config.ppo.share_prompt=True runs a prompt's samples together: it needs "
        f"samples_per_prompt >= 2 (it is {p.samples_per_prompt}) and whole prompts "
        f"per micro-batch (prompts_per_iteration={p.prompts_per_iteration} a multiple "
        f"of minibatches x accum_steps = {p.minibatches} x {p.accum_steps})"
    )
  if p.reward.get("normalize", "export") not in ("policy", "export"):
    raise ConfigError(
        f"config.ppo.reward.normalize={p.reward.normalize!r}; choose 'policy' (the "
        "start policy's samples) or 'export' (the reward export's statistics)"
    )
  if p.reward.gold and p.reward.judge:
    raise ConfigError("config.ppo.reward.gold and config.ppo.reward.judge are both set; choose one")
  if p.reward.judge:
    ai_feedback.check_judge_reward(p.reward, p.samples_per_prompt)
  if not config.init_from:
    raise ConfigError(
        "config.init_from is empty: PPO starts from a policy export (e.g. the SFT run's)"
    )
  if p.value_model not in ("separate", "policy_head"):
    raise ConfigError(
        f"config.ppo.value_model={p.value_model!r}; choose 'separate' (a value model "
        "from value_init_from) or 'policy_head' (a value head on the policy)"
    )
  if p.get("staleness", 0) not in (0, 1):
    raise ConfigError(
        f"config.ppo.staleness={p.staleness}: 0 (on-policy) or 1 (each rollout samples with the "
        "weights from before the previous update)"
    )
  if p.get("staleness", 0) and (p.get("tools") or p.dynamic_sampling):
    what = "config.ppo.tools" if p.get("tools") else "config.ppo.dynamic_sampling"
    raise ConfigError(
        f"config.ppo.staleness=1 samples the next batch while this one updates, which {what} "
        "cannot (its rollout needs the host between its steps); set staleness=0"
    )
  if p.get("tools"):
    if p.max_turns < 1:
      raise ConfigError(
          f"config.ppo.max_turns={p.max_turns}: with config.ppo.tools a sample may call a tool "
          "at least once (set max_turns >= 1, or tools=() for one-turn rollouts)"
      )
    if p.max_decode_steps and p.max_decode_steps < p.max_new_tokens:
      raise ConfigError(
          f"config.ppo.max_decode_steps={p.max_decode_steps} is below max_new_tokens="
          f"{p.max_new_tokens}: the turns' decode steps must cover a whole response (0 = "
          "(max_turns + 1) x max_new_tokens)"
      )
  if p.value_head not in ("fresh", "export"):
    raise ConfigError(
        f"config.ppo.value_head={p.value_head!r}; choose 'fresh' (re-initialise the "
        "value model's head) or 'export' (keep the exported one)"
    )
  return estimator


def load_eval_tasks(config: ml_collections.ConfigDict) -> list[dict] | None:
  """The held-out toy-world tasks of `config.ppo.eval_every` (None when it is 0)."""
  p = config.ppo
  if not p.eval_every:
    return None
  if not config.data.eval_source:
    raise ConfigError(
        "config.ppo.eval_every > 0 needs config.data.eval_source: held-out toy-world "
        "tasks (e.g. the world's eval_tasks.jsonl)"
    )
  tasks = load_prompts(config.data.eval_source)[: p.eval_prompts or None]
  if not all("family" in r and "answer" in r for r in tasks):
    raise ConfigError(
        f"config.data.eval_source={config.data.eval_source}: the held-out gold "
        "evaluation needs toy-world task records (with 'family' and 'answer')"
    )
  return tasks


@dataclasses.dataclass
class Models:
  """PPO's models: the trained params {"policy", "value"?} with their shardings and abstract
  shapes, the policy's config and graphdefs, and the frozen reference (None with a LoRA policy:
  its base, adapters off, `reference_of`)."""

  policy_cfg: ModelConfig
  policy_gd: Any
  value_gd: Any
  params: dict
  shardings: dict
  abstract: dict
  reference: Any
  reference_gd: Any

  def reference_of(self, policy_params):
    """The reference's params: the frozen copy, or a LoRA policy's base (made from the current
    params where it is used: a tree kept from the start would not survive the update, which
    donates the params it is given)."""
    return lora.reference_params(policy_params) if self.reference is None else self.reference


def _fresh_head(cfg: ModelConfig, head_sharding, seed: int):
  """A scalar head [E] ~ N(0, scalar_head_init_std): values ~0 at the start."""
  return jax.jit(
      lambda key: cfg.scalar_head_init_std
      * jax.random.normal(key, (cfg.embed_dim,), jnp.dtype(cfg.param_dtype)),
      out_shardings=head_sharding,
  )(jax.random.key(seed))


def build_models(
    config: ml_collections.ConfigDict, mesh, vocab_size: int, estimator: str
) -> Models:
  """The policy (and PPO's critic: a separate scalar-head model, or a value head on the policy)
  from their exports, and the reference (optionally held in `config.ppo.frozen_dtype`)."""
  p = config.ppo
  policy_cfg = common.model_config(config, vocab_size=vocab_size, head="lm")
  sharding.validate_model_mesh(policy_cfg, mesh)
  policy_gd, policy_abs, policy_axes = abstract_model(policy_cfg)
  psh = {"policy": sharding.param_shardings(policy_abs, policy_axes, mesh)}
  params = {"policy": common.initial_params(config, policy_cfg, mesh, psh["policy"])}
  abstract = {"policy": policy_abs}
  value_gd = None
  if estimator == "gae" and p.value_model == "separate":  # GRPO and RLOO have no critic
    value_config = _value_config(config)
    value_cfg = common.model_config(value_config, vocab_size=vocab_size, head="scalar")
    sharding.validate_model_mesh(value_cfg, mesh)
    value_gd, abstract["value"], value_axes = abstract_model(value_cfg)
    psh["value"] = sharding.param_shardings(abstract["value"], value_axes, mesh)
    params["value"] = common.initial_params(value_config, value_cfg, mesh, psh["value"])
    if p.value_head == "fresh":  # keep the export's trunk, not its head
      params["value"]["score"] = _fresh_head(value_cfg, psh["value"]["score"], config.seed + 1)
  elif estimator == "gae":  # "policy_head": one trunk, a scalar value head beside the LM head
    dtype = jnp.dtype(policy_cfg.param_dtype)
    abstract["value"] = {"score": jax.ShapeDtypeStruct((policy_cfg.embed_dim,), dtype)}
    psh["value"] = sharding.param_shardings(abstract["value"], {"score": P("embed")}, mesh)
    params["value"] = {"score": _fresh_head(policy_cfg, psh["value"]["score"], config.seed + 1)}
  lora_reference = bool(policy_cfg.lora_rank) and not p.frozen_dtype
  reference = (
      None if lora_reference else jax.tree.map(jnp.copy, lora.reference_params(params["policy"]))
  )
  reference_gd = policy_gd
  if p.frozen_dtype:  # reference (and reward models) held and run in e.g. bfloat16
    reference = cast_params(reference, p.frozen_dtype)
    reference_gd = abstract_model(
        dataclasses.replace(policy_cfg, dtype=p.frozen_dtype, param_dtype=p.frozen_dtype)
    )[0]
  return Models(policy_cfg, policy_gd, value_gd, params, psh, abstract, reference, reference_gd)


def build_reward(
    config: ml_collections.ConfigDict,
    mesh,
    tokenizer,
    prompts: list[dict],
    models: Models,
    workdir,
    functions: reward_functions.RewardFunctions = reward_functions.NONE,
):
  """(reward models {name: RewardModel}, their RewardSpec, a reward of the decoded texts or None):
  an AI judge's (direct RLAIF), the toy world's gold (no models), or the reward models'
  combination, whitened by their scores on the start policy's samples
  (`config.ppo.reward.normalize`), and/or the reward `functions` loaded from
  `config.ppo.reward.functions` (added to the models' reward; `function_reward`)."""
  p = config.ppo
  if p.reward.judge:  # direct RLAIF: the AI judge compares each prompt's samples
    return {}, None, ai_feedback.judge_reward_fn(p, mesh, tokenizer, seed=config.seed)
  if p.reward.gold:  # the toy world's gold reward instead of reward models
    if not all("family" in r and "answer" in r for r in prompts):
      raise ConfigError(
          f"config.ppo.reward.gold=True needs toy-world task records in "
          f"{config.data.source} (with 'family' and 'answer'); these prompts have none"
      )
    functions = reward_functions.RewardFunctions((verifiers.gold,), (1.0,), ("gold",))
    return {}, None, function_reward(functions, tokenizer, p.samples_per_prompt)
  rms = ppo_rollout.load_reward_models(
      p.reward, mesh, key="config.ppo.reward", dtype=p.frozen_dtype
  )
  text_reward = function_reward(functions, tokenizer, p.samples_per_prompt) if functions else None
  if not rms:  # reward functions alone
    return {}, None, text_reward
  spec = ppo_rollout.reward_spec(p.reward, rms)
  if spec.whiten and p.reward.get("normalize", "export") == "policy":
    sampler = generate.Sampler(
        models.policy_gd, models.policy_cfg, mesh=mesh, param_shardings=models.shardings["policy"]
    )
    stats = policy_score_stats(
        models.params["policy"],
        sampler,
        rms,
        tokenizer,
        prompts[: p.reward.normalize_prompts],
        p,
        seed=config.seed,
    )
    spec = dataclasses.replace(spec, stats=stats)
    metrics.write_json(spec.stats, os.path.join(workdir, "reward_stats.json"))
    _log.info("reward statistics on the start policy's samples: %s", spec.stats)
  return rms, spec, text_reward


def function_reward(functions: reward_functions.RewardFunctions, tokenizer, samples: int):
  """reward(records, out, *, iteration) -> [records x samples] the weighted reward functions of
  the rollout's decoded samples (task-major, as the rollout)."""

  def reward(records: list[dict], out, *, iteration: int) -> np.ndarray:
    del iteration
    rows = [r for r in records for _ in range(samples)]
    return functions(rows, ppo_rollout.decode_responses(tokenizer, out))

  return reward


@registry.register("ppo", policy=True, stage_fields=_PPO_STAGE_FIELDS, blocks=("ppo",))
@registry.register("grpo", policy=True, stage_fields=_PPO_STAGE_FIELDS, blocks=("ppo",))
@registry.register("rloo", policy=True, stage_fields=_PPO_STAGE_FIELDS, blocks=("ppo",))
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """PPO, GRPO or RLOO (`config.algorithm`) from `config.init_from` against reward models (or the
  gold reward, or an AI judge) on the prompts of `config.data.source`; resumes from the latest
  checkpoint; exports the policy when every iteration is done. -> {"iterations", "beta"}."""
  p = config.ppo
  split = bool(p.get("rollout_devices", 0))
  mesh = common.start_run(
      config,
      workdir,
      train_batch=False,
      devices=(lambda: split_devices(config)[0]) if split else None,
  )
  rollout_mesh = sharding.make_mesh((-1, 1, 1), split_devices(config)[1]) if split else None
  estimator = check_config(config)
  functions = reward_functions.from_config(p.reward, key="config.ppo.reward")  # before any model
  rows = p.prompts_per_iteration * p.samples_per_prompt
  sharding.check_batch_size(rows // p.minibatches // p.accum_steps, mesh)
  tokenizer_dir = config.data.tokenizer or checkpoint.read_export_metadata(config.init_from).get(
      "tokenizer"
  )
  tokenizer = data.load_tokenizer(tokenizer_dir)
  tools = None
  if p.get("tools"):  # before any model: a bad tool or template fails fast
    tools = environments.load_tools(
        p.tools, tokenizer, world=p.get("world"), key="config.ppo.tools"
    )
  prompts = load_prompts(config.data.source)
  eval_tasks = load_eval_tasks(config)
  models = build_models(config, mesh, len(tokenizer), estimator)
  rms, spec, text_reward_fn = build_reward(
      config, mesh, tokenizer, prompts, models, workdir, functions
  )
  total_steps = p.iterations * p.epochs * p.minibatches
  trainable = lora.trainable_mask if models.policy_cfg.lora_rank else None
  optimizer, _ = make_optimizer(config.optim, total_steps, trainable=trainable)
  shardings = state_shardings(optimizer, models.shardings, models.abstract, mesh)
  state = create_train_state(models.params, optimizer, shardings, seed=config.seed)
  models.params = None  # the state holds them now (and its update donates them)
  iterate = make_iteration(
      models.policy_gd,
      models.value_gd,
      {n: rm.graphdef for n, rm in rms.items()},
      models.policy_cfg,
      spec,
      optimizer,
      mesh=mesh,
      policy_shardings=models.shardings["policy"],
      shardings=shardings,
      cfg=p,
      eos_id=tokenizer.eos_token_id,
      pad_id=tokenizer.pad_token_id,
      reference_graphdef=models.reference_gd,
      estimator=estimator,
      tools=tools,
      rollout_mesh=rollout_mesh,
  )
  eval_sampler = generate.Sampler(
      models.policy_gd, models.policy_cfg, mesh=mesh, param_shardings=models.shardings["policy"]
  )
  if tools is not None:  # held-out gold of the answers after the tools' help
    eval_sampler = iterate.sampler
  loop = Loop(
      iterate=iterate,
      models=models,
      tokenizer=tokenizer,
      prompts=prompts,
      eval_tasks=eval_tasks,
      reward_params={n: rm.params for n, rm in rms.items()},
      text_reward_fn=text_reward_fn,
      eval_sampler=eval_sampler,
  )
  state, end, beta = run_iterations(config, workdir, loop, state, shardings)
  if end >= p.iterations:
    common.export_model(
        config,
        os.path.join(workdir, "export"),
        state.params["policy"],
        models.policy_cfg,
        tokenizer=os.path.abspath(tokenizer_dir),
        step=int(state.step),
    )
  return {"iterations": end, "beta": beta}


@dataclasses.dataclass
class Loop:
  """What PPO's iterations need beside the train state (`run_iterations`)."""

  iterate: Callable
  models: Models
  tokenizer: Any
  prompts: list[dict]
  eval_tasks: list[dict] | None
  reward_params: dict
  text_reward_fn: Callable | None  # reward(records, out, *, iteration): judge or functions
  eval_sampler: Any

  def held_out(self, config: ml_collections.ConfigDict, params) -> dict:
    """Gold of the policy on the held-out tasks and its KL to the reference; the same sampling
    key every time, so successive evaluations are paired (common random numbers)."""
    m = self.models
    if isinstance(self.eval_sampler, environments.ToolSampler):
      self.eval_sampler.reset_episodes()
    result = gold_eval.evaluate(
        gold_eval.Policy(m.policy_gd, params, self.eval_sampler),
        self.tokenizer,
        self.eval_tasks,
        jax.random.key(config.seed + 7),
        reference=gold_eval.Policy(m.reference_gd, m.reference_of(params), self.eval_sampler),
        max_new_tokens=config.ppo.max_new_tokens,
        temperature=config.ppo.temperature,
        win_rate=False,
    )
    row = {k: result["overall"][k] for k in ("combined", "helpfulness", "safety", "kl", "length")}
    for family, values in result["families"].items():
      row[f"{family}_helpfulness"] = values["helpfulness"]
      if "tool_call_rate" in values:  # sampled with tools: how often each kind of task calls
        row[f"{family}_tool_call_rate"] = values["tool_call_rate"]
    if isinstance(self.eval_sampler, environments.ToolSampler):  # policy rows, then reference's
      episodes = self.eval_sampler.episodes[: len(self.eval_tasks)]
      row.update({f"tool_{k}": v for k, v in environments.tool_metrics(episodes).items()})
    return row

  def text_reward(self, records: list[dict], iteration: int) -> Callable | None:
    """A reward of the decoded responses (judge, reward functions or gold; added to the reward
    models' where there are any), or None."""
    if self.text_reward_fn is None:
      return None
    return functools.partial(self.text_reward_fn, records, iteration=iteration)


def run_iterations(config: ml_collections.ConfigDict, workdir: str, loop: Loop, state, shardings):
  """PPO's loop from the latest checkpoint to `config.ppo.iterations` (or `stop_after_steps` more):
  rollout and update (`loop.iterate`), the adaptive KL coefficient, metrics (WORKDIR/metrics.jsonl,
  TensorBoard, progress bar), held-out gold every `eval_every`, checkpoints and SIGTERM as
  `common.checkpointed` does them. -> (state, the iteration it stopped at, beta).

  `config.ppo.staleness` 1: iteration i's rollout samples with the policy from before update
  i - 1 (the "behaviour" weights, checkpointed beside the state), and is dispatched before that
  update runs, so sampling overlaps updating (on devices of their own with rollout_devices)."""
  p, t = config.ppo, config.train
  stale = bool(p.get("staleness", 0))
  stream = data.BatchIterator(
      loop.prompts,
      batch_size=p.prompts_per_iteration,
      seq_len=1,
      seed=config.seed,
      packing=False,
      batching=Batching(pad=list, pack=None, length=lambda _: 1),
  )
  saved, saved_shardings = state, shardings
  if stale:  # the behaviour policy is part of what a resumed run needs
    behaviour = jax.tree.map(jnp.copy, state.params["policy"])
    saved = {"state": state, "behaviour": behaviour}
    saved_shardings = {"state": shardings, "behaviour": shardings.params["policy"]}
  export = state.params["policy"]
  with common.checkpointed(config, workdir, saved, saved_shardings, export=export) as run:
    state, start, beta = run.state, 0, float(p.kl.beta)
    if stale:
      state, behaviour = run.state["state"], run.state["behaviour"]
    if run.saved is not None:
      stream.restore(run.saved["prompts"])
      start, beta = run.saved["iteration"], run.saved["beta"]
      _log.info("resumed PPO at iteration %d (beta %.4f)", start, beta)
    end = p.iterations if not t.stop_after_steps else min(p.iterations, start + t.stop_after_steps)
    ahead = None  # staleness 1: (records, their dispatched rollout) of the next iteration
    with metrics.Progress(  # closed however the loop ends: an error prints after the bar
        p.iterations, initial=start, desc="ppo", show=("reward", "gold", "kl")
    ) as progress:
      if loop.eval_tasks and start == 0:
        run.writer.write(0, loop.held_out(config, state.params["policy"]), prefix="eval")
      for iteration in range(start, end):
        records, sampled = ahead if ahead is not None else (next(stream), None)
        stream_state = None  # staleness 1: the stream before the next iteration's prompts
        if stale:
          stream_state = stream.state()
          if sampled is None:  # the first iteration of this process: sample it now
            sampled = dispatch_rollout(config, loop, behaviour, records, iteration)
          behaviour = jax.tree.map(jnp.copy, state.params["policy"])  # the update donates state
          ahead = None
          if iteration + 1 < end:  # sampled while this iteration updates
            upcoming = next(stream)
            ahead = (upcoming, dispatch_rollout(config, loop, behaviour, upcoming, iteration + 1))
        state, row = ppo_iteration(
            config,
            loop,
            state,
            records,
            iteration,
            beta,
            more=lambda: next(stream),
            sampled=sampled,
        )
        beta = row["beta"]
        run.writer.write(iteration + 1, row, prefix="ppo")
        if loop.eval_tasks and (
            (iteration + 1) % p.eval_every == 0 or iteration + 1 == p.iterations
        ):
          run.writer.write(
              iteration + 1, loop.held_out(config, state.params["policy"]), prefix="eval"
          )
        shown = {"reward": row["reward"], "gold": row.get("gold_combined", 0.0), "kl": row["kl"]}
        progress.update(1, metrics=shown)
        # Counted in optimiser updates (epochs x mini-batches per iteration).
        check_nonfinite(
            state.opt_state,
            int(state.step),
            t.get("max_nonfinite_steps", 10),
            run.ckpt.latest_step(),
        )
        run.stop.save(
            run.ckpt,
            iteration + 1,
            end,
            {"state": state, "behaviour": behaviour} if stale else state,
            workdir=workdir,
            on_stop=progress.close,
            # With a rollout sampled ahead, the stream from before it: a resumed run draws
            # those prompts again and samples them with the saved behaviour weights.
            data_state={
                "prompts": stream_state if stale else stream.state(),
                "iteration": iteration + 1,
                "beta": beta,
            },
            config=config.to_dict(),
        )
  return state, end, beta


def dispatch_rollout(config, loop: Loop, params, records: list[dict], iteration: int):
  """Iteration `iteration`'s samples of `records` by `params`, dispatched (device arrays, not
  waited for): the same prompts and key `ppo_iteration` would sample them with."""
  prompt_tokens, prompt_mask = ppo_rollout.encode_prompts(
      loop.tokenizer, records, config.ppo.max_prompt_len
  )
  rng = jax.random.fold_in(jax.random.key(config.seed), iteration)
  return loop.iterate.sample(params, prompt_tokens, prompt_mask, rng)


def ppo_iteration(
    config,
    loop: Loop,
    state,
    records: list[dict],
    iteration: int,
    beta: float,
    more: Callable[[], list[dict]] | None = None,
    sampled=None,
):
  """One iteration on a batch of prompt records: rollout, rewards, the updates (`loop.iterate`),
  then the adaptive KL coefficient. more() -> the next batch of prompt records, for DAPO's
  dynamic sampling (`config.ppo.dynamic_sampling`). sampled: the records' samples when already
  drawn (`dispatch_rollout`, staleness 1). -> (state, the iteration's metrics row, its "beta" the
  next iteration's)."""
  p, tokenizer = config.ppo, loop.tokenizer
  rng = jax.random.fold_in(jax.random.key(config.seed), iteration)
  batches = [records]

  def prepare(batch: list[dict]):
    prompt_tokens, prompt_mask = ppo_rollout.encode_prompts(tokenizer, batch, p.max_prompt_len)
    unsafe = np.asarray([bool(r.get("unsafe", False)) for r in batch])
    return prompt_tokens, prompt_mask, unsafe, loop.text_reward(batch, iteration), batch

  def refill():
    batches.append(more())
    return prepare(batches[-1])

  prompt_tokens, prompt_mask, unsafe, text_reward, _ = prepare(records)
  state, info = loop.iterate(
      state,
      loop.models.reference_of(state.params["policy"]),
      loop.reward_params,
      prompt_tokens,
      prompt_mask,
      unsafe,
      rng,
      beta,
      text_reward=text_reward,
      refill=refill if more is not None and p.dynamic_sampling else None,
      records=records,
      sampled=sampled,
  )
  dynamic = info["dynamic"]
  if dynamic is not None:  # the groups trained on, from whichever batch each came
    records = [batches[i][g] for i, g in dynamic["groups"]]
  out, reward, found = info["out"], info["reward"], info["eos_found"]
  observed_kl = float(jnp.mean(info["sequence_kl"]))
  if p.kl.adaptive:
    rows = p.prompts_per_iteration * p.samples_per_prompt
    beta = float(
        kl_losses.adaptive_kl_update(
            beta, observed_kl, rows, target=p.kl.target, horizon=p.kl.horizon
        )
    )
  rows_records = [r for r in records for _ in range(p.samples_per_prompt)]  # as the rollout
  row = {
      **(
          {f"dynamic_{k}": float(dynamic[k]) for k in ("rounds", "kept", "filled")}
          if dynamic is not None
          else {}
      ),
      "reward": float(jnp.mean(reward)),
      "kl": observed_kl,
      "beta": beta,
      "length": float(jnp.mean(out.lengths)),
      "eos_rate": float(jnp.mean(found)),
      **{f"score_{n}": float(jnp.mean(s)) for n, s in info["scores"].items()},
      **{k: float(v) for k, v in jax.device_get(info["update"]).items()},
      **gold_metrics(rows_records, ppo_rollout.decode_responses(tokenizer, out)),
  }
  if info.get("episodes") is not None:
    tools = environments.tool_metrics(info["episodes"])
    row.update({f"tool_{k}": v for k, v in tools.items()})
  counts = nonfinite_counts(state.opt_state)
  if counts is not None:  # updates skipped so far for a NaN / Inf gradient (the update's own
    row["skipped_steps"] = int(counts[1])  # metric is a mean over this iteration's updates)
  return state, row


def policy_score_stats(
    policy_params,
    sampler,
    rms: dict,
    tokenizer,
    prompts: list[dict],
    p: ml_collections.ConfigDict,
    *,
    seed: int,
) -> dict:
  """{model name: {"mean", "std", "n"}} of each reward model's raw scores on one sample of the
  start policy for each of `prompts` (config.ppo.reward.normalize="policy").

  Whitening by these makes the sequence reward mean 0 and std 1 *on the policy PPO starts from*
  (as Ziegler et al. normalise their reward model), so `kl.beta` weighs the KL against a reward
  of known scale. The export's statistics come from held-out candidate responses, whose spread
  can differ from the policy's many-fold and silently rescale the effective KL coefficient. The
  samples are a pure function of the start policy and the seed, so a resumed run gets the same
  statistics."""
  if not prompts:
    raise ConfigError("config.ppo.reward.normalize='policy' needs training prompts to sample")
  samples = ppo_rollout.best_of_k(
      policy_params,
      sampler,
      rms,
      None,
      tokenizer,
      prompts,
      k=1,
      temperature=p.temperature,
      max_new_tokens=p.max_new_tokens,
      max_prompt_len=p.max_prompt_len,
      batch_prompts=max(p.prompts_per_iteration, 1),
      rng=jax.random.key(seed + 11),
  )
  out = {}
  for name in rms:
    scores = np.concatenate([s["scores"][name] for s in samples])
    out[name] = {"mean": float(scores.mean()), "std": float(scores.std()), "n": int(scores.size)}
  return out


def gold_metrics(records: list[dict], responses: list[str]) -> dict:
  """Mean gold helpfulness / safety / combined of toy-world responses ({} for other prompts)."""
  if not all("family" in r and "answer" in r for r in records):
    return {}
  gold = [world_lib.gold_scores(r, text) for r, text in zip(records, responses)]
  return {f"gold_{k}": float(np.mean([g[k] for g in gold])) for k in gold[0]}
