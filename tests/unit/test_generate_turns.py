"""Multi-turn decoding (`generate.TurnSampler`): pausing at a tool-call token and resuming on the
same KV cache gives what a fresh prefill of the whole conversation gives."""

import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.generate import (
    Sampler,
    TurnSampler,
    full_sequence,
    model_mask,
    prompt_batch,
    turn_output,
)
from tests.helpers.generate import GPT2, LLAMA, NEVER, PROMPTS, _model

N, STEPS, QUEUE = 12, 24, 4


def _start(sampler, params, prompts=PROMPTS, **kw):
  kw = dict(
      dict(
          max_new_tokens=N,
          max_steps=STEPS,
          queue_size=QUEUE,
          eos_id=NEVER,
          stop_id=NEVER,
          temperature=0.0,
      ),
      **kw,
  )
  return sampler.start(params, *prompt_batch(prompts), jax.random.key(0), **kw)


def _forward_logprobs(cfg, prompts, out):
  """log_softmax(logits)[token] of each response token from one cache-free forward pass."""
  graphdef, params = _model(cfg)
  tokens, mask = prompt_batch(prompts)
  seq, segments, positions, _ = full_sequence(tokens, mask, out)
  logits, _ = nnx.merge(graphdef, params)(seq, positions, segments)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1)
  p = tokens.shape[1]
  picked = np.take_along_axis(logp[:, p - 1 : -1], np.asarray(seq)[:, p:, None], axis=-1)[..., 0]
  return picked


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_without_tool_calls_the_turn_sampler_draws_what_the_sampler_draws(cfg):
  graphdef, params = _model(cfg)
  kw = dict(max_new_tokens=N, temperature=1.0, eos_id=[3, 17], pad_id=0, samples=2)
  want = Sampler(graphdef, cfg)(params, *prompt_batch(PROMPTS), jax.random.key(4), **kw)
  state = TurnSampler(graphdef, cfg).start(
      params,
      *prompt_batch(PROMPTS),
      jax.random.key(4),
      max_steps=N,
      queue_size=1,
      stop_id=NEVER,
      **kw,
  )
  got = turn_output(state)
  rows = len(PROMPTS) * 2
  for name in ("tokens", "mask", "lengths"):
    np.testing.assert_array_equal(getattr(got, name)[:rows], getattr(want, name), err_msg=name)
  for name in ("logprobs", "base_logprobs"):
    np.testing.assert_allclose(getattr(got, name)[:rows], getattr(want, name), atol=1e-6)
  assert not np.asarray(got.tool_mask).any()


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_resuming_on_the_cache_equals_a_fresh_prefill_of_the_conversation(cfg):
  graphdef, params = _model(cfg)
  sampler = TurnSampler(graphdef, cfg)
  free = np.asarray(turn_output(_start(sampler, params)).tokens)[: len(PROMPTS)]
  # A stop token that row 0 emits at step >= 2 (first time), so its first turn is 3+ tokens.
  stop = next(int(t) for k, t in enumerate(free[0]) if k >= 2 and t not in free[0, :k])
  state = _start(sampler, params, stop_id=stop)
  first = jax.device_get(state)
  paused = first.paused[: len(PROMPTS)]
  assert paused[0] and first.lengths[0] >= 3
  queue = np.zeros(first.queue.shape, np.int32)
  queue[:, :3] = [13, 14, 15]
  queue_len = np.where(first.paused, 3, 0)
  end = np.zeros(first.paused.shape, bool)
  resumed = sampler.resume(
      params,
      state,
      queue,
      queue_len,
      end,
      jax.random.key(0),
      max_steps=STEPS,
      eos_id=NEVER,
      stop_id=stop,
      temperature=0.0,
  )
  out = jax.device_get(turn_output(resumed))
  out = jax.tree.map(lambda x: x[: len(PROMPTS)], out)

  for row in np.flatnonzero(paused):
    at = first.lengths[row]
    # The queued tokens follow the stop token, marked as the environment's; nothing is sampled
    # for them.
    np.testing.assert_array_equal(out.tokens[row, at : at + 3], [13, 14, 15])
    np.testing.assert_array_equal(np.flatnonzero(out.tool_mask[row]), [at, at + 1, at + 2])
    assert (out.logprobs[row, at : at + 3] == 0).all()
    # A fresh greedy decode of the whole conversation so far continues with the same tokens.
    conversation = [PROMPTS[row] + out.tokens[row, : at + 3].tolist()]
    rest = out.lengths[row] - at - 3
    fresh = _start(sampler, params, conversation, max_new_tokens=int(rest), stop_id=stop)
    fresh = jax.device_get(turn_output(fresh))
    np.testing.assert_array_equal(fresh.tokens[0, :rest], out.tokens[row, at + 3 : at + 3 + rest])
  # Every model-chosen token's log-prob equals a cache-free forward pass over prompt + response.
  forward = _forward_logprobs(cfg, PROMPTS, out)
  chosen = np.asarray(model_mask(out))
  np.testing.assert_allclose(out.base_logprobs[chosen], forward[chosen], atol=2e-5)
  assert chosen.sum() < np.asarray(out.mask).sum()  # the queued tokens are left out


def test_rows_ended_without_a_queue_stop_and_max_steps_cuts_the_rest():
  graphdef, params = _model(LLAMA)
  sampler = TurnSampler(graphdef, LLAMA)
  free = np.asarray(turn_output(_start(sampler, params)).tokens)
  stop = int(free[0, 1])
  state = _start(sampler, params, stop_id=stop)
  # Not the cache: on CPU a host copy may be a view of the device buffer, which then cannot be
  # donated (the rollout loop reads tokens, lengths and flags only).
  first = jax.device_get(state._replace(cache=None))
  assert first.paused.any()
  rows = first.paused.shape[0]
  resumed = jax.device_get(
      sampler.resume(
          params,
          state,
          np.zeros((rows, QUEUE), np.int32),
          np.zeros(rows, np.int32),
          np.zeros(rows, bool),
          jax.random.key(0),
          max_steps=STEPS,
          eos_id=NEVER,
          stop_id=stop,
          temperature=0.0,
      )
  )
  assert state.cache.k[0].is_deleted()  # resume reused the state's buffers (donated)
  # Paused rows given nothing to feed are done where they stopped.
  np.testing.assert_array_equal(resumed.lengths[first.paused], first.lengths[first.paused])
  assert resumed.done[first.paused].all() and not resumed.paused.any()

  # A step budget below what the rows need: the loop stops there.
  cut = jax.device_get(_start(sampler, params, max_steps=N, max_new_tokens=N))
  assert int(cut.step) <= N
  with pytest.raises(ValueError, match="max_steps=4 must be >= max_new_tokens=12"):
    _start(sampler, params, max_steps=4)
