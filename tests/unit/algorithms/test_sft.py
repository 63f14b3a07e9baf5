"""End to end: the SFT driver learns, resumes bit-identically, and the runner validates overrides.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_sft.py.
"""

from rlhf_jax.algorithms import sft


def test_chat_records_are_sampled_from_their_turns_before_the_last_answer():
  chat = {
      "messages": [
          {"role": "system", "content": "S"},
          {"role": "user", "content": "U1"},
          {"role": "assistant", "content": "A1"},
          {"role": "user", "content": "U2"},
          {"role": "assistant", "content": "A2"},
      ]
  }
  assert sft.prompt_of(chat) == chat["messages"][:4]
  assert sft.prompt_of({"prompt": "p", "completion": "c"}) == "p"


def test_the_sample_table_keeps_to_the_data_policy_and_scores_toy_tasks_only(words_tokenizer):
  """The before / after table samples only prompts the trainer would keep (shorter than
  seq_len tokens: a huge line is passed over untokenised), and scores only toy-world tasks: a
  user's record with a `family` field is metadata, not a task."""
  import numpy as np

  from rlhf_jax.configs.base import base_config
  from rlhf_jax.generate import GenerateOutput

  config = base_config("sft")
  config.train.seq_len, config.sample.num_examples = 48, 2
  records = [
      {"prompt": "sky " * 100, "completion": "too long"},
      {"prompt": "x" * 10_000_000, "completion": "huge"},
      {"prompt": "Name a colour.", "completion": "Blue.", "family": "colours"},
      {"prompt": "Hi", "completion": "Hello"},
      {"prompt": "Bye", "completion": "Bye"},
  ]
  chosen = sft.sample_prompts(records, words_tokenizer, config)
  assert [r["completion"] for r in chosen] == ["Blue.", "Hello"]

  def sampler(params, tokens, mask, rng, **kw):
    n = tokens.shape[0]
    zeros = np.zeros((n, 2), np.int32)
    return GenerateOutput(zeros, zeros.astype(np.float32), np.ones((n, 2), bool), np.full(n, 2))

  config.data.source = "data.jsonl"
  rows = sft.sample_table(sampler, None, words_tokenizer, chosen, config, None)
  assert [set(r) for r in rows] == [{"prompt", "response"}] * 2
