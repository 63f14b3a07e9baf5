"""Reward functions: plain Python callables that score decoded completions, in place of or beside
reward models (PPO, GRPO, RLOO, rejection sampling, ReST, best of n).

A reward function is called on a batch as TRL's `reward_funcs` are:

    fn(prompts: list[str], completions: list[str], **fields) -> Sequence[float | None]

`fields` holds, for every other field of the prompt records, the list of its values (one per
completion, a record repeated for each of its samples), so a toy-world checker reads `answer=`,
`family=`, `info=`; a function takes what it needs and `**_` for the rest. It returns one number
per completion; None means "does not apply" (it adds 0), so checkers of different task families
combine. Several functions are summed with `weights` (default 1 each); with reward models the sum
is added to their combined (whitened) reward.

In a config, `reward.functions` names them: "package.module:function" (importable) or
"path/to/file.py:function"; `reward.function_weights` gives their weights (empty: all 1). The toy
world's exact checkers are `rlhf_jax.toyworld.verifiers:<name>` (the verifiable-reward track).

A function that raises, returns the wrong number of values, or a NaN / infinite value stops the
run with one line naming the function and the record (its index and prompt), before the
iteration's update, so the last checkpoint is what a rerun resumes from.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.errors import ConfigError

RewardFunction = Callable[..., Sequence]


class RewardFunctionError(ConfigError):
  """A user's reward function failed or returned what a reward cannot be."""


def _short(text: str, n: int = 60) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[: n - 3] + "..."


def load_function(spec: str, *, key: str) -> RewardFunction:
  """The callable `spec` names: "package.module:function" or "path/to/file.py:function"; `key`
  names the config field in errors (ConfigError)."""
  module_name, sep, name = str(spec).rpartition(":")
  if not sep or not module_name or not name:
    raise ConfigError(
        f"{key}: {spec!r} is not 'package.module:function' or 'path/to/file.py:function'"
    )
  try:
    if module_name.endswith(".py"):
      if not os.path.isfile(module_name):
        raise ConfigError(f"{key}: {spec!r}: no file {module_name}")
      loader = importlib.util.spec_from_file_location(
          f"_reward_functions_{abs(hash(module_name))}", module_name
      )
      module = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(module)
    else:
      module = importlib.import_module(module_name)
  except ConfigError:
    raise
  except Exception as e:  # the user's module failed to import: say which and why, in one line
    raise ConfigError(
        f"{key}: {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}"
    ) from e
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ConfigError(f"{key}: {spec!r}: {module_name} has no function {name!r}")
  return fn


@dataclasses.dataclass(frozen=True)
class RewardFunctions:
  """Named reward functions and their weights; calling it scores a batch of completions."""

  functions: tuple[RewardFunction, ...]
  weights: tuple[float, ...]
  names: tuple[str, ...]

  def __bool__(self) -> bool:
    return bool(self.functions)

  def scores(self, records: Sequence[dict], completions: Sequence[str]) -> dict[str, np.ndarray]:
    """{name: [N] float64} each function's rewards of `completions` [N] (None -> 0), where
    records[i] is the prompt record of completions[i]. RewardFunctionError as the module says."""
    if len(records) != len(completions):
      raise ValueError(f"{len(records)} records for {len(completions)} completions")
    prompts = [str(r.get("prompt", "")) for r in records]
    keys = sorted({k for r in records for k in r} - {"prompt", "completions"})
    fields = {k: [r.get(k) for r in records] for k in keys}
    return {
        name: _checked(name, fn, prompts, list(completions), fields)
        for name, fn in zip(self.names, self.functions)
    }

  def __call__(self, records: Sequence[dict], completions: Sequence[str]) -> np.ndarray:
    """[N] float64: the weighted sum of the functions' rewards (`scores`)."""
    total = np.zeros(len(completions))
    for weight, values in zip(self.weights, self.scores(records, completions).values()):
      total += weight * values
    return total


def _checked(name, fn, prompts, completions, fields) -> np.ndarray:
  n = len(completions)

  def call(index: slice):
    return fn(prompts[index], completions[index], **{k: v[index] for k, v in fields.items()})

  try:
    values = call(slice(None))
  except Exception as e:
    raise _at_fault(name, fn, prompts, completions, fields, e) from e
  try:
    values = list(values)
  except TypeError:
    raise RewardFunctionError(
        f"reward function {name} returned {type(values).__name__}, not one value per completion"
    ) from None
  if len(values) != n:
    raise RewardFunctionError(
        f"reward function {name} returned {len(values)} values for {n} completions "
        f"(first prompt {_short(prompts[0])!r})"
    )
  out = np.zeros(n)
  for i, v in enumerate(values):
    if v is None:
      continue
    try:
      x = float(v)
    except (TypeError, ValueError):
      x = math.nan
    if not math.isfinite(x):
      raise RewardFunctionError(
          f"reward function {name} returned {v!r} for record {i} (prompt "
          f"{_short(prompts[i])!r}, completion {_short(completions[i])!r}): a reward must be a "
          "finite number, or None where the function does not apply"
      )
    out[i] = x
  return out


def _at_fault(name, fn, prompts, completions, fields, error: Exception) -> RewardFunctionError:
  """The error of a function that raised on a batch, naming the first record it raises on alone
  (each record is tried by itself), or the batch when none does."""
  for i in range(len(completions)):
    try:
      fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in fields.items()})
    except Exception as e:  # this record alone makes it raise
      return RewardFunctionError(
          f"reward function {name} raised {type(e).__name__}: {_short(e, 120)} on record {i} "
          f"(prompt {_short(prompts[i])!r}, completion {_short(completions[i])!r}); rerun with "
          "--debug for its traceback"
      )
  return RewardFunctionError(
      f"reward function {name} raised {type(error).__name__}: {_short(error, 120)} on a batch of "
      f"{len(completions)} completions (first prompt {_short(prompts[0])!r}), on no record alone; "
      "rerun with --debug for its traceback"
  )


def from_config(cfg, *, key: str) -> RewardFunctions:
  """The reward functions of a reward config block (`cfg.functions`, `cfg.function_weights`);
  `key` names the block in errors ("config.ppo.reward"). Empty when none are named."""
  return load(cfg.get("functions", ()), cfg.get("function_weights", ()), key=key)


def load(specs: Sequence[str], weights: Sequence[float] = (), *, key: str) -> RewardFunctions:
  """The reward functions `specs` names, weighted by `weights` (empty: 1 each); `key` names their
  config block in errors (`{key}.functions`, `{key}.function_weights`)."""
  if isinstance(specs, str):
    raise ConfigError(f"{key}.functions={specs!r}: give a list, e.g. ('my_module:score',)")
  specs, weights = tuple(specs or ()), tuple(weights or ())
  if weights and len(weights) != len(specs):
    raise ConfigError(
        f"{key}.function_weights has {len(weights)} entries for {len(specs)} functions; give one "
        "weight per function, or none (all 1)"
    )
  for w in weights:
    if not isinstance(w, (int, float)) or not math.isfinite(w):
      raise ConfigError(f"{key}.function_weights: {w!r} is not a finite number")
  functions = tuple(load_function(s, key=f"{key}.functions") for s in specs)
  return RewardFunctions(functions, tuple(map(float, weights or [1.0] * len(specs))), specs)


NONE = RewardFunctions((), (), ())
