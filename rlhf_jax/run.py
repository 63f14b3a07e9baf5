"""Experiment runner.

  python -m rlhf_jax.run --config=experiments/toy_sft.py --workdir=runs/sft [--config.train.steps=500]

Loads `get_config()` from the experiment file, applies `--config.*` overrides (unknown keys fail
with the list of valid ones), writes the resolved config to WORKDIR/config.json and runs the driver
registered under `config.algorithm` (rlhf_jax/algorithms/registry.py). Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import sharding
from rlhf_jax.algorithms import registry
from rlhf_jax.configs.base import METHOD_BLOCKS, RENAMED
from rlhf_jax.configs.ranges import check_ranges
from rlhf_jax.data.records import RecordError
from rlhf_jax.data.tokenizer import ChatTemplateError
from rlhf_jax.errors import ConfigError
from rlhf_jax.train import preemption
from rlhf_jax.train.checkpoint import WorkdirError, check_workdir_writable
from rlhf_jax.train.optim import NonFiniteError
from rlhf_jax.train.workdir_lock import workdir_lock

# Errors caused by the user's config or data, shown as one message without a traceback.
# tests/unit/test_bad_inputs.py lists the cases.
# A run stopped by its non-finite guard is not bad input, but its message is all there is to say.
USER_ERRORS = (
    sharding.ShardingConfigError,
    RecordError,
    ChatTemplateError,
    WorkdirError,
    ConfigError,
    NonFiniteError,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of a user error too (normally one `error:` line)."
)


def flat_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    key = f"{prefix}{name}"
    keys.append(key)
    if hasattr(value, "items"):
      keys.extend(flat_keys(value, key + "."))
  return keys


def moved_key(key: str, valid: list[str]) -> str | None:
  """The current spelling of an override key written the old way, if it names a valid field: a
  pipeline stage's own method block nested ("dpo.dpo.reference" -> "dpo.reference"; stages are
  flat now), or a DPO hyper-parameter that moved into its loss's block ("dpo.beta" ->
  "dpo.sigmoid.beta"). None if the key is not one of those."""
  parts = key.split(".")
  if len(parts) >= 3 and parts[1] in METHOD_BLOCKS:
    flat = ".".join(parts[:1] + parts[2:])
    if flat in valid:
      return flat
    parts = flat.split(".")
  if parts[-1] in RENAMED:
    new, note = RENAMED[parts[-1]]
    candidate = ".".join(parts[:-1] + [new])
    if candidate in valid:
      return candidate + (f" ({note})" if note else "")
  return None


def check_overrides(argv: list[str]) -> None:
  """Fails early, naming the valid keys, if a `--config.KEY=...` override names no field."""
  config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_path is None or not os.path.exists(config_path.split(":")[0]):
    return  # absl reports a missing/unreadable --config itself
  spec = importlib.util.spec_from_file_location("_experiment", config_path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  valid = flat_keys(module.get_config())
  for arg in argv:
    if arg.startswith("--config.") or arg.startswith("--noconfig."):
      key = arg.split("=", 1)[0].split("config.", 1)[1]
      if key not in valid:
        moved = moved_key(key, valid)
        if moved:
          sys.exit(f"error: --config.{key} has moved: it is now --config.{moved} ({config_path})")
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        # The fields next to the bad one (its section's, or the top level's): one paragraph.
        section = key.rsplit(".", 1)[0] if "." in key else ""
        fields = [k for k in valid if (k.rsplit(".", 1)[0] if "." in k else "") == section] or [
            k for k in valid if "." not in k
        ]
        where = f"config.{section}" if section in valid else "config"
        sys.exit(
            f"error: --config.{key} is not a field of {config_path}.{hint} The fields of "
            f"{where} are: {', '.join(fields)}"
        )


def resolve_driver(name: str):
  """The driver of `config.algorithm == name` (rlhf_jax/algorithms/registry.py)."""
  return registry.get(name).train


def enable_compilation_cache(config, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache in the directory `config.compile_cache` names
  ("workdir": WORKDIR/jax_cache; "" or absent: off), unless JAX_COMPILATION_CACHE_DIR already
  names one. Returns the directory in use, or None."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  where = config.get("compile_cache", "")
  if not where:
    return None
  directory = (
      os.path.join(workdir, "jax_cache") if where == "workdir" else os.path.expanduser(where)
  )
  import jax

  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def main(argv):
  del argv
  # Orbax and JAX log every save at INFO through absl; keep those quiet and our own INFO lines.
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("rlhf_jax").setLevel(std_logging.INFO)
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  try:
    driver = resolve_driver(config.algorithm)  # before the workdir: a typo leaves nothing behind
    check_ranges(config)  # every numeric field in its range, before anything is written
    check_workdir_writable(_WORKDIR.value)
    with workdir_lock(_WORKDIR.value):  # a second run in this workdir stops here, naming this one
      enable_compilation_cache(config, _WORKDIR.value)
      result = driver(config, _WORKDIR.value)
  except USER_ERRORS as e:  # bad input: the message says what to fix; a traceback would bury it
    if _DEBUG.value:
      raise
    sys.exit(f"error: {e}")
  except preemption.Preempted as e:  # SIGTERM / Ctrl-C: checkpointed; exit 143 / 130 as a shell
    print(e, file=sys.stderr)
    sys.exit(e.exit_status)
  print(json.dumps({"final": result}, default=float))


def run() -> None:
  check_overrides(sys.argv)
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
