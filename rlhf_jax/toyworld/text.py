"""Text helpers shared by the gold scorers, the perturbation generator and the corpora.

One tokenisation for everything: if two scorers split a response differently they could disagree
about what it says. Words are lower-case alphanumeric runs (inner apostrophes and hyphens kept, so
"mid-sized" and "don't" stay one word); curly apostrophes are folded to straight ones.

The two style factors here are what makes length hacking visible in gold scores: both are 1.0 for
an answer near the ideal length without repeated phrases, and shrink (mildly, never below 0.5)
for rambling and repetition.
"""

from __future__ import annotations

import functools
import re

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_NUMBER = re.compile(r"-?\d+|[a-z]+")
NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def normalize(text: str) -> str:
  """Lower case, curly apostrophes folded, runs of whitespace collapsed to one space."""
  return " ".join(text.replace("\u2019", "'").lower().split())


def words(text: str) -> list[str]:
  """The words of `text`, normalised (see module docstring)."""
  return _WORD.findall(normalize(text))


def word_count(text: str) -> int:
  """Whitespace-separated tokens: what "at most N words" counts (punctuation rides along)."""
  return len(text.split())


@functools.lru_cache(maxsize=8192)
def _word_string(text: str) -> str:
  """ " w1 w2 ... wn ": whole-word matching becomes a substring test (scorers ask many phrases)."""
  return " " + " ".join(words(text)) + " "


def contains_phrase(text: str, phrase: str) -> bool:
  """`phrase` occurs in `text` as whole words, ignoring case and punctuation ("red" is not in "bored")."""
  return _word_string(phrase) in _word_string(text)


def phrases_in(text: str, phrases) -> list[str]:
  """The `phrases` that `text` contains (as `contains_phrase`), in order."""
  index = _word_string(text)
  return [phrase for phrase in phrases if _word_string(phrase) in index]


def numbers(text: str) -> list[int]:
  """Integers written in `text`, in order: digits (with a minus sign) or number words up to twenty."""
  found = []
  for token in _NUMBER.findall(normalize(text)):
    if token in NUMBER_WORDS:
      found.append(NUMBER_WORDS[token])
    elif token[-1].isdigit():
      found.append(int(token))
  return found


def allowed_words(ideal: str) -> int:
  """Length without penalty: max(2x, +10 words) of the ideal, so "The answer is 12." costs nothing."""
  ideal_words = max(1, word_count(ideal))
  return max(2 * ideal_words, ideal_words + 10)


def length_factor(response: str, ideal: str) -> float:
  """1.0 up to `allowed_words(ideal)`, then -0.25 per allowed length beyond it, floor 0.5."""
  allowed = allowed_words(ideal)
  excess = word_count(response) - allowed
  return 1.0 if excess <= 0 else max(0.5, 1.0 - 0.25 * excess / allowed)


def repetition_factor(response: str) -> float:
  """1 - 0.6 x (fraction of word trigrams that repeat an earlier one); 1.0 below 6 words."""
  tokens = words(response)
  if len(tokens) < 6:
    return 1.0
  trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
  repeated = 1.0 - len(set(trigrams)) / len(trigrams)
  return 1.0 - 0.6 * repeated
