"""Errors caused by the user's input, which `rlhf_jax.run` prints as one message without a traceback.

Data records raise `rlhf_jax.data.RecordError` (file:line: field), meshes
`rlhf_jax.sharding.ShardingConfigError`, work directories `rlhf_jax.train.checkpoint.WorkdirError`;
everything else a user can get wrong in a config raises `ConfigError`, whose message names the
config key (`config.train.accum_steps=3`) or the file a key points at, and what to change.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value that cannot work, or a file or directory a config key names that is not what
  the key needs (an export, an HF checkpoint). The message names the key or file and the fix."""


class DamagedFileError(ConfigError):
  """A file exists but cannot be read as what it should be (cut short, garbled, empty)."""


class ConfigPathError(ConfigError, FileNotFoundError):
  """A file or directory a config key names is missing, or lacks the files the key needs. Also a
  FileNotFoundError, which code that probes for an optional path catches."""


class ToolArgumentError(ValueError):
  """A tool (algorithms/environments.py) was called with arguments it cannot use ("seven * 2" for
  a calculator): the model's mistake, not the tool's. The environment turns it into an error
  observation the model reads; any other exception a tool raises stops the run, naming the tool
  and the record."""
