"""The KV-cache sampler against plain references: cache-free greedy, one-pass log-probs, softmax.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/test_generate.py.
"""

import functools

import jax
import numpy as np
import pytest

from rlhf_jax import generate as generate_lib
from rlhf_jax import scoring, sharding
from rlhf_jax.generate import Sampler, full_sequence, generate, prompt_batch
from rlhf_jax.models import abstract_model, apply
from tests.helpers.generate import GPT2, LLAMA, NEVER, PROMPTS, N, _generate, _model, _sample

LONG = PROMPTS + [[(7 * i) % 64 for i in range(17)]]  # batch 5, prompt length 17


def _positions(mask):
  """Reference positions: the count of real tokens before each one."""
  return np.maximum(np.cumsum(mask, 1) - 1, 0) * mask


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, segment_ids, positions):
  """Cache-free forward over a whole (both-sides padded) sequence: logits [B, T, V]."""
  return apply(graphdef, params, tokens, positions, segment_ids)[0]


def _reference_greedy(graphdef, params, tokens, mask, n):
  """Argmax decoding with a full forward over the growing sequence at every step (no cache)."""
  b, p = tokens.shape
  seq = np.concatenate([tokens, np.zeros((b, n), np.int32)], 1)
  seq_mask = np.concatenate([mask, np.zeros((b, n), bool)], 1)
  for j in range(n):
    # Unwritten slots are padding on the right: causal attention never sees them.
    logits = _forward(graphdef, params, seq, seq_mask.astype(np.int32), _positions(seq_mask))
    seq[:, p + j] = np.asarray(logits[:, p + j - 1]).argmax(-1)
    seq_mask[:, p + j] = True
  return seq[:, p:]


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama_gqa", "gpt2"])
def test_greedy_matches_cache_free_reference(cfg):
  graphdef, params = _model(cfg)
  tokens, mask = prompt_batch(PROMPTS)
  out = _generate(cfg)
  np.testing.assert_array_equal(out.tokens, _reference_greedy(graphdef, params, tokens, mask, N))
  assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == N).all()
  assert len(set(map(tuple, np.asarray(out.tokens)))) > 1  # rows really differ


def test_sampled_logprobs_match_one_forward_pass():
  graphdef, params = _model(LLAMA)
  tokens, mask = prompt_batch(PROMPTS)
  t, p = 0.7, tokens.shape[1]
  sample = functools.partial(
      _generate, LLAMA, rng=jax.random.key(1), temperature=t, top_k=20, top_p=0.9
  )
  free = np.asarray(sample(eos_id=(NEVER, NEVER)).tokens)
  eos = (int(free[0, 2]), int(free[1, 4]))  # same rng, same draws: rows 0 and 1 stop early
  out = sample(eos_id=eos)
  seq, segments, positions, response_mask = map(np.asarray, full_sequence(tokens, mask, out))
  np.testing.assert_array_equal(response_mask[:, p:], out.mask)
  assert not response_mask[:, :p].any()
  np.testing.assert_array_equal(positions, _positions(segments > 0))
  logits = np.asarray(_forward(graphdef, params, seq, segments, positions), np.float64) / t
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # log_softmax(logits / T)
  # Logits at column t predict column t+1: response column P+j is scored by logits at P+j-1.
  want = np.take_along_axis(logp[:, p - 1 : -1], seq[:, p:, None], -1)[..., 0]
  m, got = np.asarray(out.mask), np.asarray(out.logprobs)
  assert out.lengths[0] <= 3 and out.lengths[1] <= 5  # EOS really stopped them
  np.testing.assert_allclose(got[m], want[m], atol=1e-5)
  assert (got[~m] == 0).all()
  assert not np.array_equal(out.tokens, _generate(LLAMA).tokens)  # it really sampled
  # base_logprobs: the same tokens under the model at T = 1 (KL of a tempered sample, no rescoring).
  raw = np.asarray(_forward(graphdef, params, seq, segments, positions), np.float64)
  base = np.take_along_axis(
      (raw - np.log(np.exp(raw).sum(-1, keepdims=True)))[:, p - 1 : -1], seq[:, p:, None], -1
  )[..., 0]
  got_base = np.asarray(out.base_logprobs)
  np.testing.assert_allclose(got_base[m], base[m], atol=1e-5)
  assert (got_base[~m] == 0).all() and not np.allclose(got_base[m], got[m])


def test_prompts_padded_to_a_multiple_sample_and_rescore_the_same():
  graphdef, params = _model(LLAMA)
  tokens, mask = prompt_batch(PROMPTS)
  wide, wide_mask = prompt_batch(PROMPTS, multiple=8)
  assert wide.shape[1] % 8 == 0 and wide.shape[1] > tokens.shape[1]
  pad = wide.shape[1] - tokens.shape[1]
  np.testing.assert_array_equal(wide[:, pad:], tokens)
  assert not wide_mask[:, :pad].any() and (wide[:, :pad] == 0).all()
  kw = dict(max_new_tokens=N, temperature=1.0, eos_id=NEVER)
  out = generate(graphdef, params, tokens, mask, jax.random.key(3), **kw)
  out_wide = generate(graphdef, params, wide, wide_mask, jax.random.key(3), **kw)
  np.testing.assert_array_equal(out.tokens, out_wide.tokens)
  score = lambda t, m, o: np.asarray(
      scoring.sequence_logprob_sums(graphdef, params, *full_sequence(t, m, o))
  )
  np.testing.assert_allclose(score(wide, wide_mask, out_wide), score(tokens, mask, out), atol=1e-4)
  with pytest.raises(ValueError, match="multiple"):
    prompt_batch(PROMPTS, multiple=0)


@pytest.mark.slow
def test_decoding_in_phases_matches_the_cache_free_reference(monkeypatch):
  """The cache grows in phases (`decode_phases`): greedy tokens still equal the cache-free
  reference, sampled log-probs one forward pass, with rows stopping by EOS inside a phase."""
  assert generate_lib.decode_phases(8) == [8] and generate_lib.decode_phases(64) == [32, 64]
  assert generate_lib.decode_phases(128) == [32, 64, 96, 128]
  assert generate_lib.decode_phases(300) == [75, 150, 225, 300]  # at most 4 phases
  assert generate_lib.decode_phases(64, cache_bytes=(4 << 20) - 1) == [64]  # a small cache: one
  assert generate_lib.decode_phases(64, cache_bytes=4 << 20) == [32, 64]
  monkeypatch.setattr(generate_lib, "DECODE_PHASE_TOKENS", 3)
  monkeypatch.setattr(generate_lib, "MIN_PHASED_CACHE_BYTES", 0)  # this tiny model's cache too
  n = 11  # a length no other test compiles (the jit cache does not see the constant)
  assert generate_lib.decode_phases(n) == [3, 7, 11]
  graphdef, params = _model(LLAMA)
  tokens, mask = prompt_batch(LONG)
  out = _generate(LLAMA, prompts=LONG, max_new_tokens=n)
  np.testing.assert_array_equal(out.tokens, _reference_greedy(graphdef, params, tokens, mask, n))

  t, p = 0.8, tokens.shape[1]
  sample = functools.partial(
      _generate, LLAMA, prompts=LONG, rng=jax.random.key(2), temperature=t, max_new_tokens=n
  )
  free = np.asarray(sample(eos_id=(NEVER, NEVER)).tokens)
  eos = (int(free[0, 4]), int(free[2, 8]))  # rows 0 and 2 stop in the second / third phase
  out = sample(eos_id=eos)
  assert out.lengths[0] <= 5 and out.lengths[2] <= 9
  seq, segments, positions, _ = map(np.asarray, full_sequence(tokens, mask, out))
  logits = np.asarray(_forward(graphdef, params, seq, segments, positions), np.float64) / t
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.take_along_axis(logp[:, p - 1 : -1], seq[:, p:, None], -1)[..., 0]
  m = np.asarray(out.mask)
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], want[m], atol=1e-5)


@pytest.mark.slow
def test_sampler_compiles_once_per_bucket_and_matches_generate():
  graphdef, params = _model(LLAMA)
  generate_lib.clear_compiled()  # other tests' Samplers of this model share the compiled functions
  sampler = Sampler(graphdef, LLAMA, length_bucket=16)
  assert sampler.buckets(3, 6) == (4, 16) and sampler.buckets(5, 17) == (8, 32)

  def check(prompts, temperature, eos_id=3):
    rng = jax.random.key(len(prompts))
    got = sampler(
        params,
        *prompt_batch(prompts),
        rng,
        max_new_tokens=N,
        temperature=temperature,
        eos_id=eos_id,
    )
    want = _generate(LLAMA, prompts, rng=rng, temperature=temperature, eos_id=eos_id)
    # Bucket padding changes neither greedy nor sampled tokens (per-row random streams).
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)

  # Batch 3..4 and prompt length 6..16 share bucket (4, 16); temperature and EOS are traced.
  for temperature, eos_id in ((0.0, 3), (1.0, 4)):
    check(PROMPTS, temperature, eos_id)
  for prompts in (PROMPTS[:3], [[4] * 16, [9, 8], [1]], [[2] * 10, [3], [5, 6], [7]]):
    sampler(params, *prompt_batch(prompts), jax.random.key(0), max_new_tokens=N, eos_id=3)
  assert sampler.trace_count == 1
  check(LONG, 1.0)  # batch 5, length 17: a new bucket (8, 32), 3 dummy rows
  assert sampler.trace_count == 2
  # A second Sampler of the same model (another policy of one architecture) compiles nothing new.
  other = Sampler(graphdef, LLAMA, length_bucket=16)
  other(
      jax.tree.map(lambda x: x * 0.5, params),
      *prompt_batch(PROMPTS),
      jax.random.key(1),
      max_new_tokens=N,
      eos_id=3,
  )
  assert other.trace_count == sampler.trace_count == 2  # the traces of the one shared function
  generate_lib.clear_compiled()
  assert sampler.trace_count == 0  # nothing compiled is left
  other(params, *prompt_batch(PROMPTS), jax.random.key(1), max_new_tokens=N, eos_id=3)
  assert other.trace_count == 1  # compiled again after the cache was cleared


@pytest.mark.slow
def test_sharded_params_give_the_same_tokens():
  mesh = sharding.make_mesh((2, 2, 2))
  _, abstract, axes = abstract_model(LLAMA)
  shardings = sharding.param_shardings(abstract, axes, mesh)
  graphdef, params = _model(LLAMA)
  placed = jax.device_put(params, shardings)
  assert placed["blocks"]["attn"]["q"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor", None
  )
  prompts = LONG  # 5 rows: bucketed to 8 over 4 batch shards
  sampler = Sampler(graphdef, LLAMA, mesh=mesh, param_shardings=shardings)
  for temperature in (0.0, 1.0):
    rng = jax.random.key(len(prompts))
    want = _generate(LLAMA, prompts, rng=rng, temperature=temperature, eos_id=3)
    got = sampler(
        placed, *prompt_batch(prompts), rng, max_new_tokens=N, temperature=temperature, eos_id=3
    )
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
  # The pure entry point on the mesh: 4 rows = the batch shards, no bucketing.
  want = _generate(LLAMA, eos_id=3)
  got = generate(
      graphdef,
      placed,
      *prompt_batch(PROMPTS),
      jax.random.key(0),
      max_new_tokens=N,
      temperature=0.0,
      eos_id=3,
      mesh=mesh,
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.slow
def test_samples_per_prompt_equal_repeated_prompts():
  """samples=K prefills each prompt once and repeats its cache rows: the draws are those of the
  prompts repeated K times (row r's randomness depends on r only), on one device, through the
  Sampler's buckets (3 prompts -> 4, a dummy prompt's K rows dropped) and on a (2, 2, 2) mesh."""
  graphdef, params = _model(LLAMA)
  k, prompts = 3, PROMPTS[:3]
  repeated = [p for p in prompts for _ in range(k)]
  mesh = sharding.make_mesh((2, 2, 2))
  _, abstract, axes = abstract_model(LLAMA)
  shardings = sharding.param_shardings(abstract, axes, mesh)
  for temperature in (1.0, 0.7):
    rng = jax.random.key(7)
    want = _generate(LLAMA, repeated, rng=rng, temperature=temperature, eos_id=3)
    assert 0 < int(want.lengths.min()) < N  # EOS ends some rows early, others run to N
    assert len({tuple(t) for t in np.asarray(want.tokens)}) > len(prompts)  # the K draws differ
    got = {
        "generate": _generate(
            LLAMA, prompts, rng=rng, temperature=temperature, eos_id=3, samples=k
        ),
        "sampler": Sampler(graphdef, LLAMA)(
            params,
            *prompt_batch(prompts),
            rng,
            max_new_tokens=N,
            temperature=temperature,
            eos_id=3,
            samples=k,
        ),
        "mesh": Sampler(graphdef, LLAMA, mesh=mesh, param_shardings=shardings)(
            jax.device_put(params, shardings),
            *prompt_batch(prompts),
            rng,
            max_new_tokens=N,
            temperature=temperature,
            eos_id=3,
            samples=k,
        ),
    }
    for name, out in got.items():
      assert out.tokens.shape == (len(repeated), N), name
      np.testing.assert_array_equal(out.tokens, want.tokens, err_msg=name)
      np.testing.assert_array_equal(out.mask, want.mask, err_msg=name)
      np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="samples=0"):
    _generate(LLAMA, prompts, samples=0)


def test_sample_token_on_a_large_vocabulary():
  """4,096 logits, half of them -inf: masked tokens are never drawn, the draw's mass spectrum
  matches the distribution, and a row's draw does not depend on the rows beside it."""
  rng, vocab = jax.random.key(5), 4096
  logits = np.random.RandomState(1).randn(vocab).astype(np.float32) * 1.5
  logits[::2] = -np.inf
  many = np.broadcast_to(logits, (20_000, vocab))
  draws = np.asarray(_sample(many, rng, temperature=1.0))
  assert (draws % 2 == 1).all()
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  # Bins of the tokens sorted by probability, ~10% of the mass each: a chi-square on 10 bins.
  order = np.argsort(-probs)
  bins = np.minimum((np.cumsum(probs[order]) - probs[order]) * 10, 9).astype(int)
  bin_of = np.empty(vocab, int)
  bin_of[order] = bins
  expected = np.bincount(bins, weights=probs[order], minlength=10) * len(draws)
  counts = np.bincount(bin_of[draws], minlength=10)
  used = expected > 0  # a token holding more than 10% of the mass spans bins alone
  assert counts[~used].sum() == 0 and used.sum() >= 6
  assert ((counts[used] - expected[used]) ** 2 / expected[used]).sum() < 30  # <= 9 dof: p < 5e-4
  # Row b depends on (rng, b, logits[b]) only: the first rows are unchanged by other rows.
  mixed = np.random.RandomState(2).randn(16, vocab).astype(np.float32)
  alone = np.asarray(_sample(mixed[:4], rng, temperature=0.8))
  np.testing.assert_array_equal(np.asarray(_sample(mixed, rng, temperature=0.8))[:4], alone)
