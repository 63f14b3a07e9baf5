"""The KV-cache sampler against plain references: cache-free greedy, one-pass log-probs, softmax.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in tests/integration/test_generate.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generate import Sampler, generate, prompt_batch
from tests.helpers.generate import GPT2, LLAMA, NEVER, PROMPTS, N, _generate, _model, _sample


def test_uniform_model_draws_fresh_noise_every_step_and_row():
  graphdef, params = _model(LLAMA)
  zeros = jax.tree.map(jnp.zeros_like, params)  # logits all 0: every token has p = 1/V
  out = generate(
      graphdef,
      zeros,
      *prompt_batch(PROMPTS),
      jax.random.key(0),
      max_new_tokens=N,
      temperature=1.0,
      eos_id=NEVER,
  )
  tokens = np.asarray(out.tokens)
  assert all(len(set(row)) > N // 2 for row in tokens.tolist())  # not one key reused per step
  assert len(set(map(tuple, tokens.tolist()))) == len(PROMPTS)  # nor one key for all rows
  np.testing.assert_allclose(out.logprobs, -np.log(LLAMA.vocab_size), rtol=1e-6)


def test_per_row_eos_stops_rows_and_pads_the_rest():
  free = np.asarray(_generate(LLAMA).tokens)
  # An EOS that some row emits mid-way (first occurrence at step >= 1), others later or never.
  eos = next(
      int(free[r, k])
      for r in range(len(PROMPTS))
      for k in range(1, N - 1)
      if free[r, k] not in free[r, :k]
  )
  out = _generate(LLAMA, eos_id=eos, pad_id=63)
  hits = free == eos
  want_len = np.where(hits.any(1), hits.argmax(1) + 1, N)
  assert 1 < want_len.min() < N
  np.testing.assert_array_equal(out.lengths, want_len)
  want_mask = np.arange(N)[None] < want_len[:, None]
  np.testing.assert_array_equal(out.mask, want_mask)
  np.testing.assert_array_equal(out.tokens, np.where(want_mask, free, 63))
  assert (np.asarray(out.logprobs)[~want_mask] == 0).all()
  assert (np.asarray(out.logprobs)[want_mask] < 0).all()

  # EOS ids covering every row's first token: all rows stop at once and the loop exits.
  firsts = sorted(set(free[:, 0].tolist()))
  out = _generate(LLAMA, eos_id=firsts + [NEVER] * (len(PROMPTS) - len(firsts)))
  np.testing.assert_array_equal(out.lengths, 1)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], free[:, 0])
  assert (np.asarray(out.tokens)[:, 1:] == 0).all()


def test_sample_token_truncation_and_distribution():
  draws, rng = 40_000, jax.random.key(3)
  logits = np.random.RandomState(0).randn(draws, 8).astype(np.float32) * 3
  greedy = logits.argmax(-1)
  np.testing.assert_array_equal(_sample(logits, rng, temperature=1.0, top_k=1), greedy)
  np.testing.assert_array_equal(_sample(logits, rng, temperature=1.0, top_p=1e-6), greedy)
  np.testing.assert_array_equal(_sample(logits, rng, temperature=0.0, top_k=3), greedy)

  row = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2], np.float32)
  many = np.broadcast_to(row, (draws, row.shape[0]))  # one distribution, many independent rows

  def chi2(probs, **kw):
    counts = np.bincount(np.asarray(_sample(many, rng, **kw)), minlength=row.shape[0])
    keep = probs > 0
    assert counts[~keep].sum() == 0, (counts, probs)  # truncated tokens are never drawn
    expected = draws * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum())

  t = 0.7
  probs = np.exp(row / t) / np.exp(row / t).sum()
  assert chi2(probs, temperature=t) < 25  # 7 dof: p ~ 1e-3
  assert chi2(probs, temperature=1.0) > 100  # ...and ignoring the temperature would be caught
  top3 = np.where(np.argsort(-probs).argsort() < 3, probs, 0)
  assert chi2(top3 / top3.sum(), temperature=t, top_k=3) < 16  # 2 dof, renormalised over 3
  # Top-p 0.8 keeps the shortest prefix of the sorted probabilities that reaches 0.8.
  order = np.argsort(-probs)
  kept = order[np.cumsum(probs[order]) - probs[order] < 0.8]
  nucleus = np.zeros_like(probs)
  nucleus[kept] = probs[kept]
  assert 1 < len(kept) < len(probs)
  assert chi2(nucleus / nucleus.sum(), temperature=t, top_p=0.8) < 25


def test_bad_inputs_get_clear_errors():
  graphdef, params = _model(GPT2)
  tokens, mask = prompt_batch(PROMPTS)
  with pytest.raises(ValueError, match="left-padded"):
    generate(graphdef, params, tokens, mask[:, ::-1], jax.random.key(0), max_new_tokens=2, eos_id=3)
  with pytest.raises(ValueError, match="max_seq_len"):
    Sampler(graphdef, GPT2)(params, tokens, mask, jax.random.key(0), max_new_tokens=60, eos_id=3)
  with pytest.raises(ValueError, match="empty"):
    prompt_batch([[1], []])
