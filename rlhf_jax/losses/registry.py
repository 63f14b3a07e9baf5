"""The registry of pair losses: the DPO family, selected by `config.dpo.loss_type`.

A pair loss is a pure function of a batch of preference pairs' summed log-probs and its own
hyper-parameters, returning `(loss, metrics)`:

  @register_pair_loss("dpop", reference=True, beta=0.1, lam=50.0)
  def dpop_loss(pairs: PairLogps, *, beta, lam):
    ...
    return loss, metrics

The keyword defaults become the loss's own config block, `config.dpo.<name>` (e.g.
`--config.dpo.dpop.lam=5`), which `base_config()` builds from this registry: a loss registered
before the config is made (the experiment file imports the module that defines it) is
configurable and trainable by the DPO driver with no other change. `reference=False` declares a
loss that never reads the reference model (SimPO, ORPO), so none is loaded or precomputed.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, NamedTuple

import jax

Array = jax.Array


def qualname(fn: Callable) -> str:
  return f"{fn.__module__}.{fn.__qualname__}"


def origin(fn: Callable) -> tuple[str, str]:
  """Where a function is defined, for the registries' "registered twice" check (this one and
  rlhf_jax.algorithms.registry's): a module loaded twice (an experiment file is read by the
  override check and by the config flag, under two module names) defines the same functions, which
  is no conflict."""
  code = getattr(fn, "__code__", None)
  return (code.co_filename if code else fn.__module__, fn.__qualname__)


class PairLogps(NamedTuple):
  """A batch of N preference pairs, all [N]: summed response log-probs of the chosen and the
  rejected response under the policy (`chosen`, `rejected`) and the reference (`ref_chosen`,
  `ref_rejected`; zeros when the loss or `config.dpo.reference_free` does without one), response
  token counts (`chosen_len`, `rejected_len`, int32) and per-pair weights (`weight`, 0/1 float32:
  the empty slots of a packed batch are 0; a loss returns weighted means)."""

  chosen: Array
  rejected: Array
  ref_chosen: Array
  ref_rejected: Array
  chosen_len: Array
  rejected_len: Array
  weight: Array


@dataclasses.dataclass(frozen=True)
class PairLoss:
  """A registered pair loss: `fn(pairs: PairLogps, **hparams) -> (loss, metrics)`, its
  hyper-parameters' defaults (the config block `config.dpo.<name>`), and whether it reads the
  reference's log-probs."""

  name: str
  fn: Callable[..., tuple[Array, dict[str, Array]]]
  defaults: dict[str, Any]
  reference: bool
  doc: str


_PAIR_LOSSES: dict[str, PairLoss] = {}


def register_pair_loss(
    name: str, *, reference: bool = True, **defaults: Any
) -> Callable[[Callable], Callable]:
  """Decorator: registers `fn(pairs, **hparams)` as the pair loss `name`; `defaults` are its
  hyper-parameters (every keyword-only argument of `fn` needs one). Returns `fn` unchanged."""

  def decorator(fn: Callable) -> Callable:
    params = inspect.signature(fn).parameters
    keyword = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if keyword != set(defaults):
      raise ValueError(
          f"register_pair_loss({name!r}): the defaults {sorted(defaults)} must name exactly the "
          f"keyword-only arguments of {fn.__qualname__}, {sorted(keyword)}"
      )
    old = _PAIR_LOSSES.get(name)
    if old is not None and origin(old.fn) != origin(fn):
      raise ValueError(
          f"pair loss {name!r} is registered twice: by {qualname(old.fn)} and {qualname(fn)}"
      )
    doc = (inspect.getdoc(fn) or "").split("\n\n")[0]
    _PAIR_LOSSES[name] = PairLoss(name, fn, dict(defaults), reference, doc)
    return fn

  return decorator


def unregister_pair_loss(name: str) -> None:
  """Removes a pair loss (tests register throwaway ones)."""
  _PAIR_LOSSES.pop(name, None)


def pair_losses() -> dict[str, PairLoss]:
  """Every registered pair loss, by name (the built-in ones of losses/preference.py, which the
  package imports, included)."""
  return dict(_PAIR_LOSSES)


def get_pair_loss(name: str) -> PairLoss:
  """The pair loss `name`; KeyError listing the registered ones (and the closest) otherwise."""
  losses = pair_losses()
  if name not in losses:
    close = difflib.get_close_matches(str(name), losses, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"unknown pair loss {name!r}{hint}; registered: {', '.join(sorted(losses))}")
  return losses[name]
