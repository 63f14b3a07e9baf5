"""Scoring helpers and plain-text tokenisation.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/test_scoring.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import generate, scoring
from rlhf_jax.models import ModelConfig, create_model, split_model

CFG = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64)


@pytest.mark.slow
def test_response_logprobs_match_sampler():
  graphdef, params = split_model(create_model(CFG, 0))
  tokens, mask = generate.prompt_batch([[1, 5, 6], [1, 7]], pad_id=0)
  out = generate.generate(
      graphdef, params, tokens, mask, jax.random.key(1), max_new_tokens=6, temperature=0.8, eos_id=2
  )
  seq = generate.full_sequence(tokens, mask, out)
  lp = scoring.response_logprobs(graphdef, params, *seq, temperature=0.8)
  np.testing.assert_allclose(
      lp[:, tokens.shape[1] :], np.where(out.mask, out.logprobs, 0.0), atol=1e-5
  )
  sums = scoring.sequence_logprob_sums(graphdef, params, *seq, temperature=0.8)
  np.testing.assert_allclose(sums, jnp.sum(out.logprobs * out.mask, axis=1), atol=1e-4)


@pytest.mark.slow
def test_last_token_scores_reads_last_real_token():
  cfg = CFG.replace(head="scalar")
  graphdef, params = split_model(create_model(cfg, 0))
  tokens = jnp.array([[1, 5, 6, 0], [1, 7, 0, 0]])
  seg = (tokens > 0).astype(jnp.int32)
  pos = jnp.array([[0, 1, 2, 0], [0, 1, 0, 0]])
  scores = scoring.last_token_scores(graphdef, params, tokens, seg, pos)
  alone = [
      scoring.last_token_scores(
          graphdef, params, tokens[i : i + 1, :n], seg[i : i + 1, :n], pos[i : i + 1, :n]
      )[0]
      for i, n in ((0, 3), (1, 2))
  ]
  np.testing.assert_allclose(scores, alone, atol=1e-6)
