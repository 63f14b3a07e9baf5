"""Shared-prompt rows (prefix sharing): a comparison's prompt is held once and each response attends
to it and to itself only. Log-probs, reward-model scores, and the DPO loss and its gradients equal
those of the unshared layout, in packed rows long enough for the chunked attention.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/test_shared_prompt.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.preference import (
    Comparison,
    comparison_batch,
    comparison_length,
    logit_budget_for,
    tokenize_comparisons,
)
from tests.helpers.preference import ranking_records


def test_shared_layout_holds_each_prompt_once_and_refuses_responses_that_do_not_share_it():
  prompt = np.array([1, 5, 6, 7], np.int32)
  c = Comparison(
      [np.concatenate([prompt, [8, 9, 2]]), np.concatenate([prompt, [10, 2]])],
      np.array([0, 1], np.int32),
      1,
      0,
      prompt_len=4,
  )
  batch = comparison_batch([c], 16, 2, share_prompt=True)
  np.testing.assert_array_equal(batch["tokens"][0, :9], [1, 5, 6, 7, 8, 9, 2, 10, 2])
  np.testing.assert_array_equal(batch["branch_ids"][0, :10], [0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(batch["positions"][0, :9], [0, 1, 2, 3, 4, 5, 6, 4, 5])
  np.testing.assert_array_equal(batch["segment_ids"][0, :10], [1] * 9 + [0])
  np.testing.assert_array_equal(batch["response_start"][0, 0], [4, 7])
  np.testing.assert_array_equal(batch["score_index"][0, 0], [6, 8])
  # The logit list: each response token from its predecessor, a first token from the prompt's
  # last slot (3); 5 response tokens of 9 -> a budget of ceil(5 / 9 x 16) = 9, rounded up to 16.
  assert logit_budget_for([c], 16, True) == 16 and logit_budget_for([c], 16, True, multiple=1) == 9
  listed = comparison_batch([c], 16, 2, share_prompt=True, logit_budget=9)
  np.testing.assert_array_equal(listed["logit_target"][0], [4, 5, 6, 7, 8, 0, 0, 0, 0])
  np.testing.assert_array_equal(listed["logit_index"][0], [3, 4, 5, 3, 7, 0, 0, 0, 0])
  np.testing.assert_array_equal(listed["logit_end"][0, 0], [3, 5])
  plain = comparison_batch([c], 16, 2, logit_budget=5)  # sequences at 0..6 and 7..12
  np.testing.assert_array_equal(plain["logit_index"][0], [3, 4, 5, 10, 11])
  with pytest.raises(ValueError, match="row 0 needs 5 response log-probs > logit_budget=4"):
    comparison_batch([c], 16, 2, logit_budget=4)
  other = c._replace(sequences=[c.sequences[0], np.array([1, 5, 6, 3, 10, 2], np.int32)])
  with pytest.raises(ValueError, match="comparison 0, response 1: share_prompt"):
    comparison_batch([other], 16, 2, share_prompt=True)
  no_response = c._replace(sequences=[c.sequences[0], prompt])
  with pytest.raises(ValueError, match="response 1"):
    comparison_batch([no_response], 16, 2, share_prompt=True)


def test_tokenizing_with_shared_prompts_counts_the_prompt_once_against_the_row(words_tokenizer):
  records = ranking_records(6)
  plain, _ = tokenize_comparisons(records, "ranking", words_tokenizer, max_len=64)
  row = max(comparison_length(c, True) for c in plain)  # fits every shared comparison
  assert row < max(comparison_length(c) for c in plain)
  kept, stats = tokenize_comparisons(
      records, "ranking", words_tokenizer, max_len=64, max_total=row, share_prompt=True
  )
  assert stats["dropped"] == 0 and len(kept) == len(records)
  _, stats = tokenize_comparisons(records, "ranking", words_tokenizer, max_len=64, max_total=row)
  assert stats["dropped"] > 0


def test_reward_driver_refuses_the_lm_loss_on_shared_rows(tmp_path, words_tokenizer_dir):
  from rlhf_jax.algorithms import reward
  from tests.helpers.preference import export_lm, learnable_pairs, rm_config, write_jsonl

  export_lm(tmp_path / "lm", words_tokenizer_dir)
  config = rm_config(
      tmp_path, words_tokenizer_dir, write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(8))
  )
  config.reward.update(lm_coef=1.0, share_prompt=True)
  with pytest.raises(ValueError, match=r"lm_coef > 0 .*reward\.share_prompt=False"):
    reward.train(config, str(tmp_path / "rm"))


def test_group_rows_round_trip():
  from rlhf_jax.models import group_rows, ungroup_rows

  x = jnp.arange(6 * 7 * 2).reshape(6, 7, 2)
  x = x.at[1, :4].set(x[0, :4]).at[2, :4].set(x[0, :4]).at[4, :4].set(x[3, :4])
  x = x.at[5, :4].set(x[3, :4])  # groups of 3 rows sharing their first 4 columns
  grouped = group_rows(x, 3, 3)
  assert grouped.shape == (2, 4 + 3 * 3, 2)
  np.testing.assert_array_equal(grouped[1, :4], x[3, :4])
  np.testing.assert_array_equal(grouped[1, 4 + 3 : 4 + 6], x[4, 4:])
  np.testing.assert_array_equal(ungroup_rows(grouped, 3, 3), x)
