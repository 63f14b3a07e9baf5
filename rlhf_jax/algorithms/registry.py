"""The algorithm registry: one entry per `config.algorithm`, declared by its driver.

A driver is a function `train(config, workdir) -> dict` of final metrics. It declares itself with

  @registry.register("dpo", policy=True)
  def train(config, workdir): ...

and everything that dispatches on `config.algorithm` reads the entry: the runner (`rlhf_jax.run`),
the pipeline (which stages produce policies, which config fields name other stages' exports or
data sets). Every module of `rlhf_jax.algorithms` is imported on the first lookup, so a driver
there needs nothing but its decorator; a driver elsewhere (your own module) registers when its
module is imported, or is named as `config.algorithm = "package.module:name"` (the module is
imported, then `name` looked up).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any, Callable

import ml_collections

from rlhf_jax.errors import ConfigError
from rlhf_jax.losses.registry import origin, qualname

Driver = Callable[[ml_collections.ConfigDict, str], dict]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A registered driver.

  name: the value of `config.algorithm` that selects it.
  train: the driver, `train(config, workdir) -> dict` of final metrics.
  policy: its export is a policy: a pipeline gold-evaluates it, and the next stage starts from it.
  stage_fields: dotted config fields (e.g. "ppo.reward.helpful") whose values name other stages of a
    pipeline; the pipeline replaces each by that stage's export directory ("" stays "").
  data_fields: dotted config fields that may name a pipeline data set (e.g. "sft"); the pipeline
    replaces each that does by the data set's path.
  data_kind: if set, the record kind the driver reads (`config.data.kind` is set to it).
  pipeline_stage: whether a pipeline may run it as a stage.
  blocks: the method blocks of the config it reads (`configs/base.METHOD_BLOCKS`), its own first:
    `base_config(name)` holds only these, and a pipeline stage holds its own block's fields at
    its top level (`--config.<stage>.beta`, not `--config.<stage>.dpo.beta`).
  """

  name: str
  train: Driver
  policy: bool
  stage_fields: tuple[str, ...] = ()
  data_fields: tuple[str, ...] = ()
  data_kind: str | None = None
  pipeline_stage: bool = True
  blocks: tuple[str, ...] = ()

  @property
  def own_block(self) -> str | None:
    return self.blocks[0] if self.blocks else None


_REGISTRY: dict[str, Algorithm] = {}
_LOADED = False


def register(
    name: str,
    *,
    policy: bool,
    stage_fields: tuple[str, ...] = (),
    data_fields: tuple[str, ...] = (),
    data_kind: str | None = None,
    pipeline_stage: bool = True,
    blocks: tuple[str, ...] = (),
) -> Callable[[Driver], Driver]:
  """Decorator: registers `train` as the driver of `config.algorithm == name` (see `Algorithm`).
  Registering a name twice is an error unless it is the same function (a module reloaded)."""

  def decorator(train: Driver) -> Driver:
    entry = Algorithm(
        name=name,
        train=train,
        policy=policy,
        stage_fields=tuple(stage_fields),
        data_fields=tuple(data_fields),
        data_kind=data_kind,
        pipeline_stage=pipeline_stage,
        blocks=tuple(blocks),
    )
    old = _REGISTRY.get(name)
    if old is not None and origin(old.train) != origin(train):
      raise ValueError(
          f"algorithm {name!r} is registered twice: by {qualname(old.train)} and {qualname(train)}"
      )
    _REGISTRY[name] = entry
    return train

  return decorator


def unregister(name: str) -> None:
  """Removes an entry (tests register throwaway algorithms)."""
  _REGISTRY.pop(name, None)


def _load_builtin() -> None:
  """Imports every module of rlhf_jax.algorithms once, so their decorators have run."""
  global _LOADED
  if _LOADED:
    return
  package = importlib.import_module("rlhf_jax.algorithms")
  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"rlhf_jax.algorithms.{info.name}")
  _LOADED = True


def algorithms() -> dict[str, Algorithm]:
  """Every registered algorithm, by name."""
  _load_builtin()
  return dict(_REGISTRY)


def get(name: Any) -> Algorithm:
  """The entry of `config.algorithm == name`; "module:name" imports the module first. Unknown
  names raise a ConfigError that lists the known ones (and the closest)."""
  _load_builtin()
  if isinstance(name, str) and ":" in name and name not in _REGISTRY:
    module, _, short = name.partition(":")
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"config.algorithm={name!r}: cannot import {module!r} ({e})") from e
    if short in _REGISTRY:
      return _REGISTRY[short]
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"config.algorithm={name!r} is not known{hint}; set it to one of "
        f"{', '.join(sorted(_REGISTRY))}"
    )
  return _REGISTRY[name]


def policy_algorithms() -> tuple[str, ...]:
  """The names of the algorithms whose exports are policies."""
  return tuple(sorted(n for n, a in algorithms().items() if a.policy))


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
