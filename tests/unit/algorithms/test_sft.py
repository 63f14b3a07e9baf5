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
