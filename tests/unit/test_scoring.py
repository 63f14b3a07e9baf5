"""Scoring helpers and plain-text tokenisation.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in tests/integration/test_scoring.py.
"""

import numpy as np

from rlhf_jax.data.text import tokenize_text


class _Tok:
  bos_token_id, eos_token_id = 1, 2

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [[10 + len(w) for w in t.split()] for t in texts]}


def test_tokenize_text_chunks_long_documents_without_loss():
  records = [{"text": "a bb ccc"}, {"text": " ".join(["w"] * 9)}]
  examples, stats = tokenize_text(records, _Tok(), max_len=6)
  assert stats == {"examples": 3, "documents": 2, "chunked": 1}
  np.testing.assert_array_equal(examples[0].tokens, [1, 11, 12, 13, 2])
  np.testing.assert_array_equal(examples[0].loss_mask, [0, 1, 1, 1, 1])  # BOS is never a target
  # 1 + 9 + 1 = 11 tokens -> chunks of 6 and 5; the second chunk has no BOS.
  assert [len(e.tokens) for e in examples[1:]] == [6, 5]
  assert not examples[2].loss_mask[0] and examples[2].loss_mask[1:].all()
  assert examples[2].tokens[-1] == 2
