"""Jitted KV-cache sampling: greedy / temperature / top-k / top-p, per-row EOS, left-padded prompts.

One prefill call writes the (left-padded) prompt into the cache; a `lax.while_loop` then decodes one
token per step and stops as soon as every row has emitted EOS (one loop per phase of the growing
cache, `decode_phases`). Two entry points:

- `generate(graphdef, params, ...)`: a pure jitted function, also callable inside other jitted code.
  It compiles once per prompt shape.
- `Sampler(graphdef, config, mesh=..., param_shardings=...)`: for driver loops. It pads prompts to
  length and batch buckets so that a stream of differently sized prompt batches compiles a handful
  of times, places prompts on the mesh, and keeps its compiled functions.

Log-probs (`GenerateOutput.logprobs`) are `log_softmax(logits / T)` of the sampled token, T the
sampling temperature (T = 1 for greedy). Top-k/top-p truncation is NOT renormalised into them: PPO
needs log-probs that a plain forward pass over prompt+response at the same temperature reproduces
(`full_sequence` builds that pass's inputs), and a forward pass knows nothing about truncation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import (
    KVCache,
    apply,
    init_cache,
    positions_from_mask,
    unstack_layers,
)

Array = jax.Array
_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


class GenerateOutput(NamedTuple):
  """tokens: [B, N] int32 new tokens (pad_id after EOS and for rows that never started);
  logprobs: [B, N] float32, log_softmax(logits / T) of each sampled token (T = 1 when greedy), 0
  where masked; mask: [B, N] bool, True on real response tokens including EOS;
  lengths: [B] int32 = mask.sum(1); base_logprobs: [B, N] float32, log_softmax(logits) of each
  sampled token (the model at T = 1), 0 where masked: with `logprobs`, KL(pi_T || pi) of a
  tempered sample without a second forward pass (None where an output was built by hand)."""

  tokens: Array
  logprobs: Array
  mask: Array
  lengths: Array
  base_logprobs: Array | None = None
  tool_mask: Array | None = None  # [B, N] bool, multi-turn rollouts: tokens the environment wrote


def model_mask(out: GenerateOutput) -> Array:
  """[B, N] bool: the response tokens the model chose (`out.mask` less `out.tool_mask`, the tool
  messages and turn headers an environment wrote into a multi-turn rollout). What losses, KL and
  log-prob sums count."""
  if out.tool_mask is None:
    return out.mask
  return jnp.logical_and(out.mask, jnp.logical_not(out.tool_mask))


def answer_mask(out: GenerateOutput) -> np.ndarray:
  """[B, N] bool (host): each row's final answer, the response tokens after the environment's last
  message (all of `out.mask` for a single-turn output). What the user reads and rewards score."""
  mask = np.asarray(jax.device_get(out.mask), bool)
  if out.tool_mask is None:
    return mask
  tool = np.asarray(jax.device_get(out.tool_mask), bool)
  last = np.where(tool.any(1), tool.shape[1] - 1 - np.argmax(tool[:, ::-1], axis=1), -1)
  return mask & (np.arange(mask.shape[1])[None, :] > last[:, None])


# --- sampling ------------------------------------------------------------------------------------


def sample_token(
    logits: Array, rng: Array, *, temperature, top_k: int = 0, top_p: float = 1.0
) -> Array:
  """Draws one token per row. logits: [B, V]; returns tokens [B] int32.

  temperature: scalar, may be traced; 0 means greedy (argmax), so greedy and sampling share one
  compiled function. top_k (static, 0 = off) keeps the k largest logits; top_p (static, 1.0 = off)
  then keeps the smallest prefix of the (top-k renormalised) sorted distribution whose mass reaches
  top_p, as HF does: temperature first, then top-k, then top-p. Row b's draw depends only on
  (rng, b, logits[b]), so padding the batch with extra rows does not change other rows' samples.
  """
  chex.assert_rank(logits, 2)
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]")
  batch, vocab = logits.shape
  logits = logits.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)

  indices = None
  if top_k or top_p < 1.0:
    # Sorted descending; with top-k only the k survivors are kept, so sampling costs O(k).
    scaled, indices = jax.lax.top_k(scaled, min(top_k, vocab) if top_k else vocab)
  if top_p < 1.0:
    probs = jax.nn.softmax(scaled, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exactly 0 for the top token: always kept
    scaled = jnp.where(mass_before < top_p, scaled, -jnp.inf)

  # Inverse-CDF sampling: one uniform per row against the running sum of exp(scaled - max),
  # i.e. the first token whose cumulative mass exceeds u x total. Exact, and ~5x cheaper than
  # jax.random.categorical's Gumbel trick, which draws (threefry) and takes two logs per logit:
  # at batch 64 x 4,096 logits that was ~8 ms of a decode step on the 2-core CPU.
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch))
  u = jax.vmap(jax.random.uniform)(row_keys)  # [B] in [0, 1)
  mass = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # the max's is exactly 1
  cumulative = jax.lax.associative_scan(jnp.add, mass, axis=-1)
  # Tokens of zero mass never win: the first cumulative sum >= u x total follows a step up.
  choice = jnp.sum(cumulative < (u * cumulative[:, -1])[:, None], axis=-1)
  if indices is not None:
    choice = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, choice.astype(jnp.int32), greedy)


def _token_logprobs(logits: Array, tokens: Array, temperature: Array) -> Array:
  """log_softmax(logits / T)[token] (T = 1 when T == 0). logits [B, V], tokens [B] -> [B] f32."""
  t = jnp.where(temperature > 0, temperature, 1.0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# --- the decode loop (pure, traced) ---------------------------------------------------------------


class _LoopState(NamedTuple):
  step: Array  # [] int32, the number of tokens sampled so far
  last: Array  # [B] int32, the token to feed next (last prompt token at step 0)
  cache: KVCache
  tokens: Array  # [B, N] int32
  logprobs: Array  # [B, N] float32
  base_logprobs: Array  # [B, N] float32, at T = 1
  lengths: Array  # [B] int32, tokens emitted while live
  done: Array  # [B] bool


def _constrain_cache(cache: KVCache) -> KVCache:
  """Per-layer caches [B, KV, S, D] (`init_cache(..., per_layer=True)`)."""
  constrain = lambda arrays: tuple(sharding.constrain(a, _CACHE_AXES) for a in arrays)
  return cache._replace(
      k=constrain(cache.k),
      v=constrain(cache.v),
      segment_ids=sharding.constrain(cache.segment_ids, ("batch", "length")),
  )


# Decode phases: one per DECODE_PHASE_TOKENS new tokens, at most MAX_DECODE_PHASES (each phase
# traces the decode step once more: compile time), and only for a whole-call KV cache of at least
# MIN_PHASED_CACHE_BYTES (the bench model's is 25-300 MB; a tiny model's, whose steps do not wait
# on cache reads, is well under 1 MB: it would only pay the compile time).
DECODE_PHASE_TOKENS, MAX_DECODE_PHASES, MIN_PHASED_CACHE_BYTES = 32, 4, 4 << 20


def decode_phases(max_new_tokens: int, cache_bytes: int | None = None) -> list[int]:
  """The step at which each decode phase ends (the last is `max_new_tokens`): the cache holds
  prompt - 1 + end slots during a phase, so early steps read fewer empty slots. Measured on the
  2-core CPU at batch 64, 128 new tokens (4 phases): the attention's cache reads were ~40% of a
  step. cache_bytes: the K and V cache of the whole call; one phase below
  MIN_PHASED_CACHE_BYTES."""
  if cache_bytes is not None and cache_bytes < MIN_PHASED_CACHE_BYTES:
    return [max_new_tokens]
  phases = min(MAX_DECODE_PHASES, max(1, max_new_tokens // DECODE_PHASE_TOKENS))
  return [max_new_tokens * (i + 1) // phases for i in range(phases)]


def _repeat_rows(cache: KVCache, samples: int) -> KVCache:
  """Each row of a (prefilled) per-layer cache repeated `samples` times, copies contiguous."""
  rep = lambda a: jnp.repeat(a, samples, axis=0)
  return _constrain_cache(
      cache._replace(
          k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)), segment_ids=rep(cache.segment_ids)
      )
  )


def _grow_cache(cache: KVCache, slots: int) -> KVCache:
  """The per-layer cache with empty slots appended up to `slots` (one copy per phase)."""
  grow = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, slots - a.shape[2]), (0, 0)))
  return _constrain_cache(
      cache._replace(
          k=tuple(map(grow, cache.k)),
          v=tuple(map(grow, cache.v)),
          segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, slots - cache.segment_ids.shape[1]))),
      )
  )


def _prefill(
    model, layers, prompt_tokens: Array, prompt_mask: Array, slots: int, samples: int
) -> tuple[KVCache, Array, Array]:
  """Writes all prompt columns but the last into a fresh per-layer cache of `slots` slots (the
  decode loop feeds the last one like a sampled token), each prompt once, then repeats each row
  `samples` times. Returns (cache, last prompt token [B K], its position [B K]: -1 for an empty
  prompt)."""
  prompts, prompt_len = prompt_tokens.shape
  cache = _constrain_cache(init_cache(model.cfg, prompts, slots, per_layer=True))
  if prompt_len > 1:
    context = prompt_mask[:, :-1]
    _, cache = model.hidden_states(
        prompt_tokens[:, :-1],
        positions_from_mask(context),
        context.astype(jnp.int32),
        cache,
        layers,
    )
  last_token = prompt_tokens[:, -1]
  last_position = prompt_mask.sum(axis=1).astype(jnp.int32) - 1  # of the last prompt token
  if samples > 1:
    cache = _repeat_rows(cache, samples)
    last_token, last_position = (
        jnp.repeat(x, samples, axis=0) for x in (last_token, last_position)
    )
  return cache, last_token, last_position


def _decode(
    graphdef: nnx.GraphDef,
    params,
    prompt_tokens: Array,
    prompt_mask: Array,
    rng: Array,
    temperature: Array,
    eos_ids: Array,
    pad_id: Array,
    *,
    max_new_tokens: int,
    top_k: int,
    top_p: float,
    samples: int = 1,
) -> GenerateOutput:
  """The traced body shared by `generate` and `Sampler`: prefill, then a while-loop decode.

  prompt_tokens, prompt_mask: [B, P] left-padded; temperature, pad_id: scalars; eos_ids: [E] int32.
  The KV cache ends up with P + N - 1 slots, grown in phases (`decode_phases`).
  samples: K draws per prompt. The B prompts are prefilled once and their cache rows repeated, so
  the decode runs B x K rows, prompt b's samples at rows b K .. b K + K - 1: the same samples as
  prompts repeated K times before the call (row r's draws depend on (rng, r) only), for 1 / K
  of the prefill.
  """
  prompts, prompt_len = prompt_tokens.shape
  batch = prompts * samples
  n = max_new_tokens
  prompt_tokens = sharding.constrain(prompt_tokens.astype(jnp.int32), ("batch", "length"))
  prompt_mask = sharding.constrain(prompt_mask.astype(bool), ("batch", "length"))
  temperature = jnp.asarray(temperature, jnp.float32)
  pad_id = jnp.asarray(pad_id, jnp.int32)

  # Prefill all prompt columns but the last; the loop feeds the last one like a sampled token.
  # One body (forward one token, then sample) thus serves every step: sampling is traced once
  # (compile time) and no forward pass is wasted on a token that is never fed back.
  # Slots: P-1 prefilled + N fed tokens (the last prompt token and N-1 sampled ones).
  # The layers run unrolled on per-layer weights and caches (see `unstack_layers`): slicing one
  # layer out of the stacked weights and cache at every step made XLA copy them, every step.
  model = nnx.merge(graphdef, params)
  layers = unstack_layers(params)
  # The cache grows in phases: every step's attention reads all of the cache's slots, so a cache
  # sized for the current phase's last step, not for the whole call, reads fewer empty ones.
  cfg = model.cfg
  cache_bytes = (
      2
      * cfg.num_layers
      * batch
      * cfg.kv_heads
      * (prompt_len - 1 + n)
      * cfg.dim_per_head
      * jnp.dtype(cfg.dtype).itemsize
  )
  ends = decode_phases(n, cache_bytes)
  cache, last_token, last_position = _prefill(
      model, layers, prompt_tokens, prompt_mask, prompt_len - 1 + ends[0], samples
  )

  def body(state: _LoopState) -> _LoopState:
    positions = jnp.maximum(last_position + state.step, 0)[:, None]
    # Finished rows keep decoding pad tokens (outputs discarded): the batch moves in lock step.
    logits, cache = apply(
        graphdef,
        params,
        state.last[:, None],
        positions,
        jnp.ones((batch, 1), jnp.int32),
        state.cache,
        layers,
    )
    logits = logits[:, 0]
    token = sample_token(
        logits,
        jax.random.fold_in(rng, state.step),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    logprob = _token_logprobs(logits, token, temperature)
    base_logprob = _token_logprobs(logits, token, jnp.ones((), jnp.float32))
    live = ~state.done
    token = jnp.where(live, token, pad_id)
    column = (0, state.step)
    return _LoopState(
        step=state.step + 1,
        last=token,
        cache=_constrain_cache(cache),
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], column),
        logprobs=jax.lax.dynamic_update_slice(
            state.logprobs, jnp.where(live, logprob, 0.0)[:, None], column
        ),
        base_logprobs=jax.lax.dynamic_update_slice(
            state.base_logprobs, jnp.where(live, base_logprob, 0.0)[:, None], column
        ),
        lengths=state.lengths + live.astype(jnp.int32),
        done=state.done | (live & jnp.isin(token, eos_ids)),
    )

  state = _LoopState(
      step=jnp.zeros((), jnp.int32),
      last=last_token,
      cache=cache,
      tokens=jnp.full((batch, n), pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, n), jnp.float32),
      base_logprobs=jnp.zeros((batch, n), jnp.float32),
      lengths=jnp.zeros((batch,), jnp.int32),
      done=last_position < 0,
  )  # an empty prompt (a bucket's dummy row) generates nothing
  for i, end in enumerate(ends):
    if i:
      state = state._replace(cache=_grow_cache(state.cache, prompt_len - 1 + end))
    state = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done), body, state)
  mask = jnp.arange(n)[None, :] < state.lengths[:, None]
  return GenerateOutput(state.tokens, state.logprobs, mask, state.lengths, state.base_logprobs)


# --- multi-turn decoding (tool calls): a loop that pauses and resumes on its KV cache ------------


class TurnState(NamedTuple):
  """The decode state of a multi-turn rollout between its turns (device arrays, `TurnSampler`).

  Rows decode until they emit EOS (done) or a tool-call stop token (paused); the host then runs
  the tools and queues each paused row's tool message, which the next `resume` feeds through the
  model before the row samples again, so nothing is prefilled twice. A row's tokens are written
  at its own length (no gaps); the cache's slots are shared steps, and a step in which a row is
  not live writes an empty slot (segment 0) that its later tokens never attend to.

  step: [] int32 steps run (cache slots used after the prefill); last: [B] the token to feed
  next; last_position: [B] the last prompt token's position (-1: an empty prompt);
  tokens / logprobs / base_logprobs: [B, N]; forced: [B, N] bool, tokens taken from the queue;
  lengths: [B] tokens written; done, paused: [B] bool; queue: [B, F] int32 tokens to feed
  before sampling again, queue_len / queue_pos: [B] int32.
  """

  step: Array
  last: Array
  last_position: Array
  cache: KVCache
  tokens: Array
  logprobs: Array
  base_logprobs: Array
  forced: Array
  lengths: Array
  done: Array
  paused: Array
  queue: Array
  queue_len: Array
  queue_pos: Array


def _turn_loop(
    graphdef,
    params,
    layers,
    state: TurnState,
    rng: Array,
    temperature: Array,
    eos_ids: Array,
    stop_ids: Array,
    *,
    max_steps: int,
    top_k: int,
    top_p: float,
) -> TurnState:
  """Decodes until every row is done or paused, or `max_steps` steps (the cache's slots) ran.
  Rows that never start keep their pad-filled columns."""
  n = state.tokens.shape[1]
  queue_size = state.queue.shape[1]
  columns = jnp.arange(n)[None, :]

  def live_rows(s: TurnState) -> Array:
    return ~(s.done | s.paused)

  def body(s: TurnState) -> TurnState:
    live = live_rows(s)
    # A row feeds `last` at its own position; a row that is not live writes an empty slot.
    positions = jnp.maximum(s.last_position + s.lengths, 0)[:, None]
    logits, cache = apply(
        graphdef,
        params,
        s.last[:, None],
        positions,
        live.astype(jnp.int32)[:, None],
        s.cache,
        layers,
    )
    logits = logits[:, 0]
    sampled = sample_token(
        logits, jax.random.fold_in(rng, s.step), temperature=temperature, top_k=top_k, top_p=top_p
    )
    forced = s.queue_pos < s.queue_len
    queued = jnp.take_along_axis(s.queue, jnp.minimum(s.queue_pos, queue_size - 1)[:, None], 1)
    token = jnp.where(forced, queued[:, 0], sampled)
    chosen = live & ~forced
    logprob = jnp.where(chosen, _token_logprobs(logits, token, temperature), 0.0)
    base_logprob = jnp.where(chosen, _token_logprobs(logits, token, jnp.ones((), jnp.float32)), 0.0)
    write = live[:, None] & (columns == s.lengths[:, None])  # [B, N]: the row's next column
    lengths = s.lengths + live.astype(jnp.int32)
    done = s.done | (chosen & jnp.isin(token, eos_ids)) | (live & (lengths >= n))
    paused = (s.paused | (chosen & jnp.isin(token, stop_ids))) & ~done
    return TurnState(
        step=s.step + 1,
        last=jnp.where(live, token, s.last),
        last_position=s.last_position,
        cache=_constrain_cache(cache),
        tokens=jnp.where(write, token[:, None], s.tokens),
        logprobs=jnp.where(write, logprob[:, None], s.logprobs),
        base_logprobs=jnp.where(write, base_logprob[:, None], s.base_logprobs),
        forced=jnp.where(write, forced[:, None], s.forced),
        lengths=lengths,
        done=done,
        paused=paused,
        queue=s.queue,
        queue_len=s.queue_len,
        queue_pos=s.queue_pos + (live & forced).astype(jnp.int32),
    )

  return jax.lax.while_loop(lambda s: (s.step < max_steps) & jnp.any(live_rows(s)), body, state)


def _start_turns(
    graphdef,
    params,
    prompt_tokens: Array,
    prompt_mask: Array,
    rng: Array,
    temperature: Array,
    eos_ids: Array,
    stop_ids: Array,
    pad_id: Array,
    *,
    max_new_tokens: int,
    max_steps: int,
    queue_size: int,
    top_k: int,
    top_p: float,
    samples: int,
) -> TurnState:
  """Prefill, then the first turn (`_turn_loop`). The cache holds P - 1 + max_steps slots."""
  prompts, prompt_len = prompt_tokens.shape
  batch, n = prompts * samples, max_new_tokens
  prompt_tokens = sharding.constrain(prompt_tokens.astype(jnp.int32), ("batch", "length"))
  prompt_mask = sharding.constrain(prompt_mask.astype(bool), ("batch", "length"))
  temperature = jnp.asarray(temperature, jnp.float32)
  pad_id = jnp.asarray(pad_id, jnp.int32)
  model = nnx.merge(graphdef, params)
  layers = unstack_layers(params)
  cache, last_token, last_position = _prefill(
      model, layers, prompt_tokens, prompt_mask, prompt_len - 1 + max_steps, samples
  )
  zeros = jnp.zeros((batch,), jnp.int32)
  state = TurnState(
      step=jnp.zeros((), jnp.int32),
      last=last_token,
      last_position=last_position,
      cache=cache,
      tokens=jnp.full((batch, n), pad_id, jnp.int32),
      logprobs=jnp.zeros((batch, n), jnp.float32),
      base_logprobs=jnp.zeros((batch, n), jnp.float32),
      forced=jnp.zeros((batch, n), bool),
      lengths=zeros,
      done=last_position < 0,  # an empty prompt (a bucket's dummy row) generates nothing
      paused=jnp.zeros((batch,), bool),
      queue=jnp.full((batch, queue_size), pad_id, jnp.int32),
      queue_len=zeros,
      queue_pos=zeros,
  )
  return _turn_loop(
      graphdef,
      params,
      layers,
      state,
      rng,
      temperature,
      eos_ids,
      stop_ids,
      max_steps=max_steps,
      top_k=top_k,
      top_p=top_p,
  )


def _resume_turns(
    graphdef,
    params,
    state: TurnState,
    queue: Array,
    queue_len: Array,
    end: Array,
    rng: Array,
    temperature: Array,
    eos_ids: Array,
    stop_ids: Array,
    *,
    max_steps: int,
    top_k: int,
    top_p: float,
) -> TurnState:
  """The next turn: paused rows with a queue (queue [B, F], queue_len [B]) feed it and sample on;
  rows marked `end` [B] bool are done. The same key `rng` as the first turn: steps fold in their
  own index, so every step draws afresh."""
  resumed = state.paused & (queue_len > 0) & ~end
  state = state._replace(
      queue=jnp.where(resumed[:, None], queue.astype(jnp.int32), state.queue),
      queue_len=jnp.where(resumed, queue_len.astype(jnp.int32), state.queue_len),
      queue_pos=jnp.where(resumed, 0, state.queue_pos),
      done=state.done | (state.paused & ~resumed) | end,
      paused=jnp.zeros_like(state.paused),
  )
  return _turn_loop(
      graphdef,
      params,
      unstack_layers(params),
      state,
      rng,
      jnp.asarray(temperature, jnp.float32),
      eos_ids,
      stop_ids,
      max_steps=max_steps,
      top_k=top_k,
      top_p=top_p,
  )


def turn_output(state: TurnState) -> GenerateOutput:
  """The rollout so far as a `GenerateOutput` whose `tool_mask` marks the queued tokens."""
  n = state.tokens.shape[1]
  mask = jnp.arange(n)[None, :] < state.lengths[:, None]
  return GenerateOutput(
      state.tokens, state.logprobs, mask, state.lengths, state.base_logprobs, state.forced & mask
  )


# --- public entry points --------------------------------------------------------------------------


def _eos_array(eos_id: int | Sequence[int]) -> np.ndarray:
  """EOS ids as data [E] int32: changing them does not recompile (changing E does)."""
  return np.atleast_1d(np.asarray(eos_id, np.int32))


def _check_inputs(
    prompt_tokens,
    prompt_mask,
    *,
    max_new_tokens: int,
    top_k: int,
    top_p: float,
    temperature,
    cfg: ModelConfig | None,
    samples: int = 1,
) -> None:
  """User-facing errors; array checks only run on concrete (host or device) values."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not isinstance(samples, (int, np.integer)) or samples < 1:
    raise ValueError(f"samples={samples!r} must be an int >= 1 (samples per prompt)")
  if top_k < 0 or (cfg is not None and top_k > cfg.vocab_size):
    raise ValueError(f"top_k={top_k} must be in [0, vocab_size] (0 = off)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1.0 = off)")
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  chex.assert_rank(prompt_tokens, 2)
  chex.assert_equal_shape([prompt_tokens, prompt_mask])
  if isinstance(prompt_mask, jax.core.Tracer):
    return
  mask = np.asarray(prompt_mask, bool)
  # Left padding: once a row's prompt starts it runs to the last column.
  bad = np.nonzero(mask.any(1) & (mask.sum(1) != mask[:, ::-1].cumprod(1).sum(1)))[0]
  if bad.size:
    raise ValueError(
        f"prompt_mask rows {bad.tolist()} are not left-padded: real tokens must be "
        "contiguous and end at the last column (build prompts with `prompt_batch`)"
    )
  if cfg is not None and cfg.family == "gpt2":
    longest = int(mask.sum(1).max(initial=0)) + max_new_tokens
    if longest > cfg.max_seq_len:
      raise ValueError(
          f"longest prompt + max_new_tokens = {longest} exceeds the GPT-2 model's "
          f"max_seq_len={cfg.max_seq_len} (learned positions); shorten the prompts or "
          "max_new_tokens"
      )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "top_p", "mesh", "samples")
)
def _generate_jit(
    graphdef,
    params,
    prompt_tokens,
    prompt_mask,
    rng,
    temperature,
    eos_ids,
    pad_id,
    *,
    max_new_tokens,
    top_k,
    top_p,
    mesh,
    samples,
):
  with sharding.activation_sharding(mesh):
    return _decode(
        graphdef,
        params,
        prompt_tokens,
        prompt_mask,
        rng,
        temperature,
        eos_ids,
        pad_id,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=top_p,
        samples=samples,
    )


def generate(
    graphdef: nnx.GraphDef,
    params,
    prompt_tokens,
    prompt_mask,
    rng: Array,
    *,
    max_new_tokens: int,
    temperature=1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int],
    pad_id: int = 0,
    mesh: Mesh | None = None,
    samples: int = 1,
) -> GenerateOutput:
  """Samples up to `max_new_tokens` tokens after each left-padded prompt.

  prompt_tokens: [B, P] int32; prompt_mask: [B, P] bool, True on real tokens, padding on the left
  (see `prompt_batch`); a row with no real token generates nothing. rng: a PRNG key.
  temperature: 0 = greedy. eos_id: one id or a sequence (EOS is part of the response).
  Traced, so changing them does not recompile: temperature, eos_id values, pad_id. Static:
  max_new_tokens, top_k (0 = off), top_p (1.0 = off), the number of EOS ids, mesh, samples.
  samples: K samples of each prompt, returned as rows b K .. b K + K - 1 ([B K, N] outputs): the
  draws of the prompts repeated K times, each prompt prefilled once.
  mesh: when given, activations are constrained to it and prompts sharded over its batch axes;
  params should already be placed (e.g. with `sharding.param_shardings`). Compiles once per
  prompt shape; `Sampler` buckets shapes.
  """
  _check_inputs(
      prompt_tokens,
      prompt_mask,
      max_new_tokens=max_new_tokens,
      top_k=top_k,
      top_p=top_p,
      temperature=temperature,
      cfg=nnx.merge(graphdef, params).cfg,
      samples=samples,
  )
  return _generate_jit(
      graphdef,
      params,
      prompt_tokens,
      prompt_mask,
      rng,
      temperature,
      _eos_array(eos_id),
      pad_id,
      max_new_tokens=max_new_tokens,
      top_k=top_k,
      top_p=float(top_p),
      mesh=mesh,
      samples=samples,
  )


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class Sampler:
  """Bucketed, cached `generate` for driver loops.

  Prompts are left-padded to a multiple of `length_bucket` and the batch is filled with empty
  dummy rows up to a power of two (and a multiple of the mesh's batch shards); dummy rows are
  done from the start and dropped from the output. One compiled function exists per
  (batch bucket, length bucket, max_new_tokens, top_k, top_p, number of EOS ids); temperature,
  EOS ids and pad_id are traced. The compiled functions are shared by every Sampler of the same
  model graph, mesh, rules and parameter shardings (a pipeline's evaluation samples several
  policies of one architecture: they compile once). `trace_count` counts the traces
  (= compilations) of the functions this Sampler uses, whichever Sampler triggered them, for
  tests and logs; `clear_compiled()` empties the shared cache.

  Multi-host: as with `sharding.put_batch`, every process passes the same global prompt batch.
  """

  def __init__(
      self,
      graphdef: nnx.GraphDef,
      config: ModelConfig,
      *,
      mesh: Mesh | None = None,
      param_shardings=None,
      length_bucket: int = 32,
      rules=sharding.DEFAULT_RULES,
  ):
    if config.head != "lm":
      raise ValueError(f"Sampler needs an LM head, got config.head={config.head!r}")
    if length_bucket < 1:
      raise ValueError(f"length_bucket={length_bucket} must be >= 1")
    self.graphdef, self.config, self.mesh = graphdef, config, mesh
    self.length_bucket, self.rules = length_bucket, rules
    if mesh is not None and param_shardings is None:
      param_shardings = sharding.replicated(mesh)  # a prefix: every parameter replicated
    self.param_shardings = param_shardings
    leaves, treedef = jax.tree.flatten(param_shardings)
    self._key = (graphdef, mesh, _freeze(rules), treedef, tuple(leaves))
    self._used: set[tuple] = set()
    self._batch_shards = 1
    if mesh is not None:
      spec = sharding.logical_to_spec(("batch",), rules)[0]
      parts = (spec,) if isinstance(spec, str) else tuple(spec or ())
      self._batch_shards = math.prod(mesh.shape[p] for p in parts)

  def buckets(self, batch: int, prompt_len: int) -> tuple[int, int]:
    """(bucketed batch size, bucketed prompt length) for a [batch, prompt_len] prompt array."""
    b = _round_up(1 << max(batch - 1, 0).bit_length(), self._batch_shards)
    return b, _round_up(prompt_len, self.length_bucket)

  @property
  def trace_count(self) -> int:
    return sum(_TRACES.get(key, 0) for key in self._used)

  def _function(self, static: tuple):
    key = (*self._key, static)
    self._used.add(key)
    if key in _COMPILED:
      return _COMPILED[key]
    max_new_tokens, top_k, top_p, samples = static
    graphdef, mesh, rules = self.graphdef, self.mesh, self.rules  # no reference to `self`

    def run(params, prompt_tokens, prompt_mask, rng, temperature, eos_ids, pad_id):
      _TRACES[key] += 1  # runs at trace time only: counts compilations
      with sharding.activation_sharding(mesh, rules):
        return _decode(
            graphdef,
            params,
            prompt_tokens,
            prompt_mask,
            rng,
            temperature,
            eos_ids,
            pad_id,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            top_p=top_p,
            samples=samples,
        )

    if mesh is None:
      fn = jax.jit(run)
    else:
      rows = sharding.batch_sharding(mesh, rules)
      rep = sharding.replicated(mesh)
      fn = jax.jit(
          run,
          in_shardings=(self.param_shardings, rows, rows, rep, rep, rep, rep),
          out_shardings=GenerateOutput(rows, rows, rows, rows, rows),
      )
    _COMPILED[key] = fn
    _TRACES[key] = 0
    return fn

  def __call__(
      self,
      params,
      prompt_tokens,
      prompt_mask,
      rng: Array,
      *,
      max_new_tokens: int,
      temperature=1.0,
      top_k: int = 0,
      top_p: float = 1.0,
      eos_id: int | Sequence[int],
      pad_id: int = 0,
      samples: int = 1,
  ) -> GenerateOutput:
    """Same contract as `generate`; prompts are host arrays [B, P]. Returns [B x samples, N]
    outputs (prompt b's samples at rows b x samples ...: each prompt prefilled once)."""
    batch = len(prompt_tokens)
    params, tokens, mask = self._place(
        params,
        prompt_tokens,
        prompt_mask,
        pad_id,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        samples=samples,
    )
    fn = self._function((max_new_tokens, top_k, float(top_p), int(samples)))
    out = fn(
        params, tokens, mask, rng, np.float32(temperature), _eos_array(eos_id), np.int32(pad_id)
    )
    if tokens.shape[0] != batch:  # the dummy prompts' samples are the last rows
      out = jax.tree.map(lambda x: x[: batch * samples], out)
    return out

  def _place(self, params, prompt_tokens, prompt_mask, pad_id: int, **checked):
    """(params, tokens, mask): host prompts checked (`_check_inputs` with the decoding arguments
    `checked`), bucketed (`buckets`: dummy rows below, padding on the left) and placed on the
    mesh."""
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    prompt_mask = np.asarray(prompt_mask, bool)
    _check_inputs(prompt_tokens, prompt_mask, cfg=self.config, **checked)
    batch, prompt_len = prompt_tokens.shape
    b_bucket, p_bucket = self.buckets(batch, prompt_len)
    pad = ((0, b_bucket - batch), (p_bucket - prompt_len, 0))
    tokens = np.pad(prompt_tokens, pad, constant_values=pad_id)
    mask = np.pad(prompt_mask, pad, constant_values=False)
    if self.mesh is not None:
      placed = sharding.put_batch({"tokens": tokens, "mask": mask}, self.mesh, self.rules)
      tokens, mask = placed["tokens"], placed["mask"]
      params = jax.device_put(params, self.param_shardings)  # no-op when already placed
    return params, tokens, mask


class TurnSampler(Sampler):
  """The device half of multi-turn rollouts (tool calls): `start` prefills the prompts and decodes
  until each row emits EOS or a tool-call stop token; `resume` feeds each paused row's queued
  tokens (a tool message and the next turn's header) through the model, on the same KV cache, and
  samples on. The host half (`algorithms/environments.py`: parse the call, run the tool, tokenise
  its message) runs between the calls, so a rollout of T tool calls is T + 1 calls.

  Shapes are fixed by (batch and prompt buckets, max_new_tokens N, max_steps S, queue_size F), so
  every turn of every iteration reuses one compiled `start` and one `resume`. N bounds a row's
  response (its sampled and queued tokens together); S bounds the decode steps of all turns
  together (the cache has P - 1 + S slots; a row that is not live during a step still spends that
  step's slot), S >= N. A row still live when S steps have run is cut there, as one that reaches N.
  Rows that never call a tool draw exactly the tokens `Sampler` draws (same keys, positions and
  cache contents).
  """

  def start(
      self,
      params,
      prompt_tokens,
      prompt_mask,
      rng: Array,
      *,
      max_new_tokens: int,
      max_steps: int,
      queue_size: int,
      eos_id: int | Sequence[int],
      stop_id: int | Sequence[int],
      temperature=1.0,
      top_k: int = 0,
      top_p: float = 1.0,
      pad_id: int = 0,
      samples: int = 1,
  ) -> TurnState:
    """The first turn of [B, P] host prompts (`Sampler.__call__`'s contract); the state's rows
    are the bucketed batch's (B x samples real rows first)."""
    if max_steps < max_new_tokens or queue_size < 1:
      raise ValueError(
          f"max_steps={max_steps} must be >= max_new_tokens={max_new_tokens} and "
          f"queue_size={queue_size} >= 1"
      )
    params, tokens, mask = self._place(
        params,
        prompt_tokens,
        prompt_mask,
        pad_id,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        samples=samples,
    )
    fn = self._turn_function(
        ("start", max_new_tokens, max_steps, queue_size, top_k, float(top_p), int(samples))
    )
    return fn(
        params,
        tokens,
        mask,
        rng,
        np.float32(temperature),
        _eos_array(eos_id),
        _eos_array(stop_id),
        np.int32(pad_id),
    )

  def resume(
      self,
      params,
      state: TurnState,
      queue,
      queue_len,
      end,
      rng: Array,
      *,
      max_steps: int,
      eos_id: int | Sequence[int],
      stop_id: int | Sequence[int],
      temperature=1.0,
      top_k: int = 0,
      top_p: float = 1.0,
  ) -> TurnState:
    """The next turn. queue: [R, F] int32 tokens for each paused row to feed (queue_len [R] of
    them; 0 or end [R] True: the row is done), R = the state's rows. Same rng as `start`. The
    state is donated (its buffers are reused): read what you need from it before."""
    queue = np.asarray(queue, np.int32)
    rows, size = state.queue.shape
    if queue.shape != (rows, size):
      raise ValueError(f"queue has shape {queue.shape}; the state's is {(rows, size)}")
    if self.mesh is not None:
      params = jax.device_put(params, self.param_shardings)
    fn = self._turn_function(("resume", max_steps, top_k, float(top_p)))
    return fn(
        params,
        state,
        queue,
        np.asarray(queue_len, np.int32),
        np.asarray(end, bool),
        rng,
        np.float32(temperature),
        _eos_array(eos_id),
        _eos_array(stop_id),
    )

  def _turn_function(self, static: tuple):
    key = (*self._key, static)
    self._used.add(key)
    if key in _COMPILED:
      return _COMPILED[key]
    graphdef, mesh, rules = self.graphdef, self.mesh, self.rules

    if static[0] == "start":
      _, max_new_tokens, max_steps, queue_size, top_k, top_p, samples = static

      def run(params, prompt_tokens, prompt_mask, *args):
        _TRACES[key] += 1
        with sharding.activation_sharding(mesh, rules):
          return _start_turns(
              graphdef,
              params,
              prompt_tokens,
              prompt_mask,
              *args,
              max_new_tokens=max_new_tokens,
              max_steps=max_steps,
              queue_size=queue_size,
              top_k=top_k,
              top_p=top_p,
              samples=samples,
          )

    else:
      _, max_steps, top_k, top_p = static

      def run(params, state, *args):
        _TRACES[key] += 1
        with sharding.activation_sharding(mesh, rules):
          return _resume_turns(
              graphdef, params, state, *args, max_steps=max_steps, top_k=top_k, top_p=top_p
          )

    # resume donates the state: its KV cache is the largest buffer and is rewritten in place.
    fn = jax.jit(run, donate_argnums=(1,) if static[0] == "resume" else ())
    _COMPILED[key] = fn
    _TRACES[key] = 0
    return fn


# Samplers' jitted functions, shared by model graph, mesh, rules, parameter shardings and the
# static decoding arguments; and how often each was traced.
_COMPILED: dict[tuple, Callable] = {}
_TRACES: dict[tuple, int] = {}


def clear_compiled() -> None:
  """Drops every Sampler's shared compiled functions (and their trace counts)."""
  _COMPILED.clear()
  _TRACES.clear()


def _freeze(rules):
  """A hashable copy of sharding rules (nested sequences -> tuples)."""
  if isinstance(rules, (list, tuple)):
    return tuple(_freeze(r) for r in rules)
  return rules


# --- host-side helpers ----------------------------------------------------------------------------


def prompt_batch(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token-id lists to (tokens [B, P] int32, mask [B, P] bool), P = the longest prompt
  rounded up to a multiple of `multiple` (e.g. the sampler's length bucket, so that rescoring
  prompt + response compiles once per bucket, not once per batch)."""
  if not prompts:
    raise ValueError("prompt_batch needs at least one prompt")
  if multiple < 1:
    raise ValueError(f"prompt_batch: multiple={multiple} must be >= 1")
  empty = [i for i, p in enumerate(prompts) if len(p) == 0]
  if empty:
    raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token (e.g. BOS)")
  width = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p) :] = np.asarray(p, np.int32)
    mask[row, width - len(p) :] = True
  return tokens, mask


def full_sequence(
    prompt_tokens, prompt_mask, out: GenerateOutput
) -> tuple[Array, Array, Array, Array]:
  """Prompt + response as one sequence, to rescore it with a single forward pass.

  prompt_tokens, prompt_mask: [B, P] left-padded; out: `GenerateOutput` with [B, N] fields.
  Returns (tokens, segment_ids, positions, response_mask), each [B, P+N]: the plain concatenation,
  so padding sits on both sides (left of the prompt, right of the response) and response column j
  is P+j for every row; `segment_ids` (0 = padding) give the attention mask and `positions` restart
  at 0 on each row's first real token, as during generation. Logits at column t predict column
  t+1, so the response log-probs are `log_softmax(logits[:, P-1:-1] / T)` gathered at
  `tokens[:, P:]`, masked with `response_mask[:, P:]` (== out.mask).
  """
  chex.assert_equal_shape([prompt_tokens, prompt_mask])
  chex.assert_equal_shape([out.tokens, out.logprobs, out.mask])
  chex.assert_equal_shape_prefix([prompt_tokens, out.tokens], 1)
  tokens = jnp.concatenate([jnp.asarray(prompt_tokens, jnp.int32), out.tokens], axis=1)
  mask = jnp.concatenate([jnp.asarray(prompt_mask, bool), out.mask], axis=1)
  response_mask = jnp.concatenate([jnp.zeros_like(prompt_mask, bool), out.mask], axis=1)
  return tokens, mask.astype(jnp.int32), positions_from_mask(mask), response_mask
