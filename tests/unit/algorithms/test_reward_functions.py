"""Reward functions: loading by name or file, fields passed as the records hold them, weights and
None, and each way a user's function can fail named with the function and the record; the toy
world's verifiers against its gold scorers.

Driver runs with reward functions (GRPO, rejection sampling, a failing function mid-run) are in
tests/integration/algorithms/test_reward_functions.py.
"""

import ml_collections
import numpy as np
import pytest

from rlhf_jax.algorithms import reward_functions as rf
from rlhf_jax.errors import ConfigError
from rlhf_jax.toyworld import World, verifiers
from rlhf_jax.toyworld.world import gold_scores

RECORDS = [
    {
        "prompt": "What is 2 + 3?",
        "family": "arithmetic",
        "answer": "5",
        "level": 1,
        "info": {"a": 2, "b": 3, "op": "+", "result": 5},
    },
    {
        "prompt": "What is 4 + 4?",
        "family": "arithmetic",
        "answer": "8",
        "level": 2,
        "info": {"a": 4, "b": 4, "op": "+", "result": 8},
    },
    {"prompt": "Name a fruit.", "family": "category", "answer": "pear", "level": 3, "info": {}},
]

USER_FUNCTIONS = """
def exact(prompts, completions, answer, **_):
  return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def level(prompts, completions, level, **_):
  return [float(x) for x in level]

def only_arithmetic(prompts, completions, family, **_):
  return [1.0 if f == "arithmetic" else None for f in family]

def picky(prompts, completions, **_):
  for c in completions:
    if c == "boom":
      raise KeyError("no such key")
  return [0.0] * len(completions)

def batch_only(prompts, completions, **_):
  if len(completions) > 1:
    raise RuntimeError("out of memory")
  return [0.0]

def short(prompts, completions, **_):
  return [0.0]

def nan(prompts, completions, **_):
  return [float("nan")] * len(completions)

def text(prompts, completions, **_):
  return ["high"] * len(completions)

def scalar(prompts, completions, **_):
  return 1.0

import nonexistent_module_for_a_test
"""


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("user") / "my_rewards.py"
  path.write_text(USER_FUNCTIONS.replace("import nonexistent_module_for_a_test\n", ""))
  return str(path)


def functions(*names, weights=(), path=None):
  cfg = ml_collections.ConfigDict(
      {"functions": tuple(f"{path}:{n}" if path else n for n in names), "function_weights": weights}
  )
  return rf.from_config(cfg, key="config.ppo.reward")


def test_functions_get_the_records_fields_and_sum_with_weights(user_file):
  f = functions("exact", "level", "only_arithmetic", weights=(2.0, 0.5, 1.0), path=user_file)
  completions = ["5", "9", "pear"]
  scores = f.scores(RECORDS, completions)
  np.testing.assert_array_equal(scores[f"{user_file}:exact"], [1, 0, 1])
  np.testing.assert_array_equal(scores[f"{user_file}:level"], [1, 2, 3])
  np.testing.assert_array_equal(scores[f"{user_file}:only_arithmetic"], [1, 1, 0])  # None -> 0
  np.testing.assert_allclose(f(RECORDS, completions), [2 + 0.5 + 1, 0 + 1 + 1, 2 + 1.5 + 0])
  same = functions("exact", path=user_file)
  assert same.weights == (1.0,) and not rf.NONE and same
  # An importable module by name: the toy verifiers.
  builtin = functions("rlhf_jax.toyworld.verifiers:arithmetic")
  assert builtin(RECORDS[:1], ["5"])[0] == 1.0


@pytest.mark.parametrize(
    "name, match",
    [
        ("picky", r"picky raised KeyError: 'no such key' on record 1 \(prompt 'What is 4 \+ 4\?'"),
        (
            "batch_only",
            r"batch_only raised RuntimeError: out of memory on a batch of 3 .* no record",
        ),
        ("short", r"short returned 1 values for 3 completions"),
        ("nan", r"nan returned nan for record 0 \(prompt 'What is 2 \+ 3\?', completion '5'\)"),
        ("text", r"text returned 'high' for record 0 .* a finite number, or None"),
        ("scalar", r"scalar returned float, not one value per completion"),
    ],
)
def test_a_failing_function_is_named_with_the_record(user_file, name, match):
  f = functions(name, path=user_file)
  with pytest.raises(rf.RewardFunctionError, match=match) as info:
    f(RECORDS, ["5", "boom", "pear"])
  assert user_file in str(info.value)
  assert isinstance(info.value, ConfigError)  # the CLI prints it as one line


def test_config_errors_name_the_field(tmp_path, user_file):
  bad = tmp_path / "bad.py"
  bad.write_text(USER_FUNCTIONS)
  cases = [
      (dict(functions="my:score"), r"config.ppo.reward.functions='my:score': give a list"),
      (dict(functions=("no_colon",)), r"'no_colon' is not 'package.module:function'"),
      (dict(functions=("missing.py:f",)), r"'missing.py:f': no file missing.py"),
      (dict(functions=(f"{user_file}:absent",)), r"has no function 'absent'"),
      (dict(functions=(f"{bad}:exact",)), r"importing .*bad.py failed: ModuleNotFoundError"),
      (dict(functions=("rlhf_jax.no_such_module:f",)), r"importing rlhf_jax.no_such_module failed"),
      (
          dict(functions=(f"{user_file}:exact",), function_weights=(1.0, 2.0)),
          r"function_weights has 2 entries for 1 functions",
      ),
  ]
  for fields, match in cases:
    cfg = ml_collections.ConfigDict({"functions": (), "function_weights": (), **fields})
    with pytest.raises(ConfigError, match=match):
      rf.from_config(cfg, key="config.ppo.reward")


def test_toy_verifiers_are_the_worlds_checkers():
  tasks = World(seed=0).tasks(60, seed=1)  # the capability families: arithmetic, word lists, ...
  prompts = [t["prompt"] for t in tasks]
  fields = {k: [t.get(k) for t in tasks] for k in ("family", "answer", "info", "unsafe")}
  right = [t["answer"] for t in tasks]
  for name in ("arithmetic", "word_list"):
    scores = getattr(verifiers, name)(prompts, right, **fields)
    for t, s in zip(tasks, scores):
      assert (s is None) == (t["family"] != name)
      assert s is None or s == 1.0  # the ideal answer is right
    assert any(s is not None for s in scores), name
  wrong = verifiers.arithmetic(prompts, ["no idea"] * len(tasks), **fields)
  assert all(s is None or s == 0.0 for s in wrong)
  met = verifiers.constraints(prompts, right, **fields)
  assert all((m is None) == (not t["info"].get("constraints")) for t, m in zip(tasks, met))
  assert all(m is None or m == 1.0 for m in met) and any(m is not None for m in met)
  gold = verifiers.gold(prompts, right, **fields)
  assert gold == [gold_scores(t, r)["combined"] for t, r in zip(tasks, right)]
