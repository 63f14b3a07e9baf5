"""Checkpoints: the train state through orbax, and params-only exports between stages.

Two kinds of directory live here:

* A *run directory* managed by `Checkpointer`: one sub-directory per saved step, each holding the
  train-state pytree (``state/``, orbax OCDBT/tensorstore, sharded arrays written by the hosts that
  own them), the data-loader position (``data_state/``, JSON) and the experiment config
  (``config/``, JSON). Used to resume a killed run bit-identically.
* A *params export* written by `export_params`: ``params/`` plus ``metadata/`` (JSON: model config,
  tokenizer path, ...). Later stages (reward model, PPO, DPO) initialise from an SFT export.

Atomicity (checked against orbax-checkpoint 0.12.8, the default ``AtomicRenameTemporaryPath``):
orbax writes every step into ``<dir>/<step>.orbax-checkpoint-tmp``, and only once every array and
JSON item is on disk (and, with several hosts, after a barrier) renames it to ``<dir>/<step>``.
A rename is atomic on POSIX file systems, and orbax's step discovery skips any name containing
``.orbax-checkpoint-tmp``; so a run killed mid-save leaves a tmp directory that `latest_step`
ignores, and restarting resumes from the previous complete step. (On GCS, where rename is not
atomic, orbax instead marks finished steps with ``commit_success.txt``.) Stale tmp directories are
*not* swept when a `Checkpointer` opens, because a reader (an eval job, a notebook) opening the
directory would otherwise delete a save the trainer still has in flight; orbax replaces a stale
one when that step is saved again.

A step that finished saving but no longer reads back (a file truncated or deleted afterwards, a
disk error) is not trusted either: `Checkpointer.restore` without a step falls back to the newest
step that reads, with a warning, and renames the unreadable ones to ``<step>.corrupt-<id>``. Bytes
changed in place (a disk or copy error that leaves every file readable) are caught too: each step
stores a fingerprint of every state leaf (``fingerprint/``, JSON: a position-weighted uint32 sum
of the leaf's bits, computed on device, `fingerprint`), and a restored leaf whose fingerprint
differs makes the step unreadable.

Random keys: the state may hold either typed keys (``jax.random.key``) or raw uint32 keys
(``jax.random.PRNGKey``); orbax 0.12.8 stores both and restores each as it was saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from rlhf_jax.data import files as file_io
from rlhf_jax.errors import ConfigError, ConfigPathError

PyTree = Any
_log = logging.getLogger(__name__)

_STATE, _DATA_STATE, _CONFIG, _FINGERPRINT = "state", "data_state", "config", "fingerprint"
_PARAMS, _METADATA = "params", "metadata"


class WorkdirError(OSError):
  """The work directory cannot be created or written to."""


def _as_path(directory: str | os.PathLike) -> epath.Path:
  """Absolute path; orbax wants absolute paths, and cloud URLs (gs://...) pass through."""
  path = epath.Path(directory)
  return path if "://" in str(directory) else epath.Path(os.path.abspath(os.fspath(directory)))


def check_workdir_writable(path: str | os.PathLike) -> epath.Path:
  """Creates `path` if needed and proves it is writable, so a run fails before training.

  Writes and deletes a small probe file with a unique name (safe when several hosts share a
  file system). Returns the absolute path.

  Raises:
    WorkdirError: naming the path and the operating-system reason.
  """
  workdir = _as_path(path)
  probe = workdir / f".write_probe_{uuid.uuid4().hex}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(
        f"work directory {workdir} cannot be created or written ({type(e).__name__}: {e}); "
        "pass --workdir=<a directory you can write to>"
    ) from e
  return workdir


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every array in `tree` (global shapes: what a checkpoint of it writes)."""
  return sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
      if hasattr(x, "shape") and hasattr(x, "dtype")
  )


def check_free_space(
    path: str | os.PathLike, state: PyTree, *, keep: int, export: PyTree | None = None
) -> None:
  """Raises WorkdirError before training when `path`'s file system lacks room for `keep` + 1
  checkpoints of `state` (orbax writes a new step before it deletes the oldest; those already in
  ``path/checkpoints`` count as written) plus an export of `export`: a disk that fills an hour
  into a run loses that hour. Remote paths are not checked."""
  if "://" in os.fspath(path):
    return
  per_checkpoint = tree_bytes(state)
  existing = os.path.join(os.fspath(path), "checkpoints")
  written = sum(name.isdigit() for name in os.listdir(existing)) if os.path.isdir(existing) else 0
  needed = max(keep + 1 - written, 1) * per_checkpoint + (
      tree_bytes(export) if export is not None else 0
  )
  free = shutil.disk_usage(os.fspath(path)).free
  if free < needed:
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    raise WorkdirError(
        f"work directory {path} has {gib(free)} free, but this run needs about {gib(needed)}: "
        f"{keep} + 1 checkpoints of {gib(per_checkpoint)} (config.train.keep_checkpoints={keep}"
        f", one more while a save is written){' and the final export' if export else ''}; free "
        "disk space, lower config.train.keep_checkpoints, or pass a --workdir on a larger disk"
    )


def _require_json_dict(name: str, value: Any) -> None:
  """Raises a ValueError unless `value` is a dict that JSON can store."""
  if not isinstance(value, Mapping):
    raise ValueError(f"{name} must be a dict of JSON values, got {type(value).__name__}")
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{name} is not JSON-serialisable ({e}); store plain ints/floats/strings/lists/dicts "
        "(e.g. int(x) for numpy scalars, config.to_dict() for a ConfigDict)"
    ) from e


def _require_shardings(name: str, abstract: PyTree) -> None:
  """Raises a ValueError naming the first leaf of `abstract` without a `.sharding`."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(
          f"{name}{jax.tree_util.keystr(key_path)} has no sharding; build the target as "
          "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) for every "
          "leaf, e.g. jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, "
          "sharding=s), jax.eval_shape(init_fn), shardings)"
      )


class CorruptCheckpointError(ValueError):
  """A saved step reads back with bytes that differ from what was saved."""


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 []: sum over the leaf's bit patterns w_i of (w_i ^ (i * 0x9E3779B1)) * (2 i + 1), mod
  2^32. Integer sums are exact in any order, so every sharding of a leaf gives the same number; a
  changed word or two swapped words change it (unless a multiple of 2^32 cancels out)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jax.numpy.asarray(x)
  if x.dtype == bool:
    words = x.astype(jax.numpy.uint32)
  else:
    unsigned = {1: jax.numpy.uint8, 2: jax.numpy.uint16, 4: jax.numpy.uint32, 8: jax.numpy.uint64}
    words = jax.lax.bitcast_convert_type(x, unsigned[x.dtype.itemsize])
    if x.dtype.itemsize == 8:  # two words each
      words = jax.lax.bitcast_convert_type(words, jax.numpy.uint32)
  words = words.reshape(-1).astype(jax.numpy.uint32)
  i = jax.lax.iota(jax.numpy.uint32, words.shape[0])
  return jax.numpy.sum((words ^ (i * np.uint32(0x9E3779B1))) * (2 * i + 1), dtype=jax.numpy.uint32)


@jax.jit
def _fingerprints(tree: PyTree) -> list:
  return [_leaf_fingerprint(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree: PyTree) -> dict[str, int]:
  """{leaf path: uint32 fingerprint} of a pytree of arrays (`_leaf_fingerprint`; computed on
  device, one small transfer). Saved with every checkpoint step and checked on restore."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  values = jax.device_get(_fingerprints(tree))
  return {p: int(v) for p, v in zip(paths, values)}


@contextlib.contextmanager
def _unreadable(what: str) -> Iterator[None]:
  """Turns any error raised while reading a saved step into CorruptCheckpointError("<what> cannot
  be read (<error>)"): tensorstore, orbax and json raise many kinds for a damaged file."""
  try:
    yield
  except Exception as e:  # noqa: BLE001
    raise CorruptCheckpointError(f"{what} cannot be read ({file_io.complaint(e)})") from e


class Checkpointer:
  """Saves and restores the train state, data position and config of one run.

  Usage::

      with Checkpointer(workdir / "checkpoints", keep=3, save_interval_steps=500) as ckpt:
          if (step := ckpt.latest_step()) is not None:
              state, data_state = ckpt.restore(abstract_state)
          ...
          ckpt.save(step, state, data_state=loader.state(), config=config.to_dict())

  With ``async_save=True`` (the default), `save` returns once the arrays are copied to host
  memory, so the caller may donate or overwrite `state` straight away; the files are written in
  a background thread. `wait` or `close` blocks until they are on disk.
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      *,
      keep: int = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    if keep < 1:
      raise ValueError(f"keep must be >= 1 checkpoints, got {keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = check_workdir_writable(directory)
    options = ocp.CheckpointManagerOptions(
        # Only the interval (and a TPU preemption notice) decide; orbax's default would also
        # save the very first step it is offered, whatever the interval.
        save_decision_policy=checkpoint_managers.AnySavePolicy(
            [
                checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        ),
        preservation_policy=checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA_STATE: ocp.JsonCheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
            _FINGERPRINT: ocp.JsonCheckpointHandler(),
        },
        options=options,
    )

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      data_state: dict,
      config: dict | None = None,
      force: bool = False,
  ) -> bool:
    """Saves `state` at `step` if the interval says so (or `force`); returns whether it did.

    Args:
      step: training step; a step already saved is skipped (returns False), so a final
        ``save(..., force=True)`` after an interval save of the same step is harmless.
      state: pytree of jax arrays (any sharding; typed or raw uint32 keys).
      data_state: JSON dict giving the data loader's position.
      config: JSON dict of the experiment config (``ConfigDict.to_dict()``), stored with the
        step so a checkpoint explains itself; read back with `restore_config`.
      force: save even when `step` is not a multiple of ``save_interval_steps``.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not (force or self._manager.should_save(step)):
      return False
    _require_json_dict("data_state", data_state)
    items = {
        _STATE: ocp.args.StandardSave(state),
        _DATA_STATE: ocp.args.JsonSave(data_state),
        _FINGERPRINT: ocp.args.JsonSave(fingerprint(state)),
    }
    if config is not None:
      _require_json_dict("config", config)
      items[_CONFIG] = ocp.args.JsonSave(config)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def all_steps(self) -> list[int]:
    """Steps kept, oldest first (includes a save still being written asynchronously)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest saved step, or None. Unfinished (tmp) step directories on disk are ignored."""
    return self._manager.latest_step()

  def _resolve_step(self, step: int | None) -> int:
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
      )
    return int(step)

  def restore(self, abstract_state: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
    """Reads a saved state straight into the target shardings.

    Args:
      abstract_state: pytree shaped like the saved state whose leaves are
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``; each array comes back with that
        sharding, which may differ from the mesh layout it was saved from.
      step: the step to read; None means the latest that reads back (an unreadable newer
        step is set aside as ``<step>.corrupt-*`` with a warning).

    Returns:
      (state, data_state) as given to `save`.

    Raises:
      FileNotFoundError: no such step (the message lists the available ones).
      ValueError: a leaf has no sharding, or the tree/shapes do not match the checkpoint.
      WorkdirError: `step` is None and no saved step reads back.
    """
    if step is None:
      return self._restore_latest_readable(abstract_state)
    return self._restore_step(abstract_state, self._resolve_step(step))

  def _restore_latest_readable(self, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """The newest step that reads back; a step that fails to read (a file truncated or lost
    after its save finished) is set aside as ``<step>.corrupt`` with a warning, and the one
    before it is tried. If none reads, a WorkdirError says so and sets nothing aside: losing
    every step is the user's call (restore a copy, or move the folder away to start over). A state
    that does not match `abstract_state` (another model or optimiser config) is a ConfigError at
    once."""
    self._resolve_step(None)  # waits for pending saves; raises if there is no step at all
    steps = self.all_steps()
    first_error = None
    for step in reversed(steps):
      try:
        restored = self._restore_step(abstract_state, step)
      except CorruptCheckpointError as e:  # a config mismatch is raised as it is: every step has it
        first_error = first_error or e
        _log.warning("%s; trying the one before it", e)
        continue
      if first_error is not None:
        self._set_aside([s for s in steps if s > step])
        _log.warning("resumed from step %d: the newer checkpoints could not be read", step)
      return restored
    raise WorkdirError(
        f"no checkpoint in {self.directory} can be read (steps {', '.join(map(str, steps))}; "
        f"the newest: {first_error}): restore them from a copy, or move {self.directory} away "
        "to start the run over"
    ) from first_error

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step directories to ``<step>.corrupt`` (kept for inspection; orbax's
    step discovery skips the name), so later saves of those steps are written afresh."""
    if jax.process_index() == 0:
      for step in steps:
        src = self.directory / str(step)
        if src.exists():
          src.rename(self.directory / f"{step}.corrupt-{uuid.uuid4().hex[:6]}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self._manager.reload()

  def _restore_step(self, abstract_state: PyTree, step: int) -> tuple[PyTree, dict]:
    _require_shardings("abstract_state", abstract_state)
    where = self.directory / str(step)
    with _unreadable(f"checkpoint {where}: its metadata"):  # names and shapes: no array is read
      metadata = self._manager.item_metadata(step)[_STATE]
      if metadata is None:  # orbax found the item but could not read its metadata
        raise FileNotFoundError(f"{where / _STATE}: no readable metadata")
      saved = _dotted_shapes(metadata)
    mismatch = _shape_mismatch(saved, _dotted_shapes(abstract_state))
    if mismatch:
      raise ConfigError(
          f"checkpoint {where} was saved by a run with another model or optimiser config "
          f"({mismatch}): resume with the config it was saved with ({where / _CONFIG}) or use a "
          "new --workdir"
      )
    args = ocp.args.Composite(
        **{
            _STATE: ocp.args.StandardRestore(abstract_state),
            _DATA_STATE: ocp.args.JsonRestore(),
        }
    )
    with _unreadable(f"checkpoint {where}"):
      restored = self._manager.restore(step, args=args)
    state = restored[_STATE]
    kinds = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
    if jax.tree.structure(state) != jax.tree.structure(abstract_state) or kinds(state) != kinds(
        abstract_state
    ):  # e.g. a typed random key read back as raw key data: its array metadata was lost
      raise CorruptCheckpointError(
          f"checkpoint {where} reads back with other array types than were saved"
      )
    self._check_fingerprint(step, state)
    return state, restored[_DATA_STATE]

  def _check_fingerprint(self, step: int, state: PyTree) -> None:
    """Raises CorruptCheckpointError naming the leaves whose bytes changed since `step` was saved
    (steps saved before fingerprints existed are not checked)."""
    where = self.directory / str(step)
    if not (where / _FINGERPRINT).exists():
      return  # saved before fingerprints existed
    with _unreadable(f"checkpoint {where}: its fingerprint"):
      saved = self._manager.restore(
          step, args=ocp.args.Composite(**{_FINGERPRINT: ocp.args.JsonRestore()})
      )[_FINGERPRINT]
      if not isinstance(saved, dict):
        raise TypeError(f"expected a JSON object, got {type(saved).__name__}")
    now = fingerprint(state)
    changed = [path for path, value in saved.items() if now.get(path) != value]
    if changed:
      raise CorruptCheckpointError(
          f"checkpoint {where}: {len(changed)} array(s) read back different "
          f"from what was saved (e.g. {changed[0]}): its files were changed after the save"
      )

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config dict saved with `step` (default: latest), or None if none was saved."""
    step = self._resolve_step(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
      )
    except KeyError:  # orbax: item not present in this step
      return None
    return restored[_CONFIG]

  def wait(self) -> None:
    """Blocks until every asynchronous save has been committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _export_checkpointer() -> ocp.Checkpointer:
  """Synchronous orbax checkpointer that knows the handler of each export item.

  A fresh `CompositeCheckpointHandler` cannot read an item's metadata unless the item's handler
  is registered up front, so the registry lists every args type used here.
  """
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args_type in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add(_PARAMS, args_type, ocp.StandardCheckpointHandler)
  registry.add(_PARAMS, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
  for args_type in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add(_METADATA, args_type, ocp.JsonCheckpointHandler)
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def export_params(
    directory: str | os.PathLike,
    params: PyTree,
    *,
    metadata: dict,
    overwrite: bool = False,
) -> epath.Path:
  """Writes `params` and a JSON `metadata` dict as one atomic export directory.

  Args:
    directory: destination; it must not exist unless `overwrite`.
    params: pytree (nested dicts) of jax or numpy arrays, any sharding.
    metadata: JSON dict for the next stage, e.g. ``{"model": model_cfg, "tokenizer": path}``.
    overwrite: replace an existing export. The old one is deleted first, so a crash during the
      rewrite leaves no export rather than a half-written one.

  Returns the absolute export path. Blocks until the export is on disk.
  """
  path = _as_path(directory)
  _require_json_dict("metadata", metadata)
  if path.exists() and not overwrite:
    raise FileExistsError(f"params export {path} already exists; pass overwrite=True to replace it")
  check_workdir_writable(path.parent)
  args = ocp.args.Composite(
      **{_PARAMS: ocp.args.StandardSave(params), _METADATA: ocp.args.JsonSave(metadata)}
  )
  checkpointer = _export_checkpointer()
  try:
    checkpointer.save(path, args=args, force=overwrite)
  finally:
    checkpointer.close()
  return path


def copy_export(source: str | os.PathLike, destination: str | os.PathLike) -> None:
  """Copies a params export to `destination` (replacing one there) through a temporary directory
  renamed at the end, so a kill mid-copy never leaves a partial export that a later stage or a
  rerun would take for a finished one."""
  destination = os.path.abspath(os.fspath(destination))
  tmp = f"{destination}.tmp-{uuid.uuid4().hex[:8]}"
  shutil.copytree(os.fspath(source), tmp)
  if os.path.exists(destination):
    shutil.rmtree(destination)
  os.replace(tmp, destination)


def load_params(
    directory: str | os.PathLike, abstract_params: PyTree | None = None
) -> tuple[PyTree, dict]:
  """Reads an export written by `export_params`.

  Args:
    directory: the export directory.
    abstract_params: optional pytree of ``jax.ShapeDtypeStruct`` with shardings; arrays are
      then restored directly into those shardings (and the tree must match the export).
      Without it, every leaf comes back as a host-local ``numpy.ndarray`` in the saved
      structure (nested dicts), ready for `jax.device_put`.

  Returns:
    (params, metadata).

  Raises:
    FileNotFoundError: `directory` does not exist.
    ValueError: `directory` is not an export, or does not match `abstract_params`.
  """
  path = _as_path(directory)
  if not path.exists():
    raise ConfigPathError(f"params export {path} does not exist")
  if not ((path / _PARAMS).is_dir() and (path / _METADATA).is_dir()):
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "a file"
    raise ConfigPathError(
        f"{path} is not a params export (expected the {_PARAMS}/ and {_METADATA}/ "
        f"directories written by export_params); found: {found}"
    )
  checkpointer = _export_checkpointer()
  fix = "export it again (rerun the stage that wrote it)"
  try:
    with file_io.reading(f"params export {path}", fix=fix):  # the params' names and shapes
      saved_tree = checkpointer.metadata(path).item_metadata[_PARAMS]
      if saved_tree is None:
        raise FileNotFoundError(f"{path / _PARAMS}: no readable metadata")
    if abstract_params is None:
      # PyTreeRestore (unlike StandardRestore) can ask for numpy leaves without a target.
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)
      params_args = ocp.args.PyTreeRestore(restore_args=as_numpy)
    else:
      _require_shardings("abstract_params", abstract_params)
      mismatch = _shape_mismatch(
          _dotted_shapes(saved_tree), _dotted_shapes(abstract_params), "the export", "the model"
      )
      if mismatch:
        raise ConfigError(
            f"params export {path} does not match abstract_params: {mismatch}; its params do not "
            "fit the model its metadata (or config.model) describes: re-export it"
        )
      params_args = ocp.args.StandardRestore(abstract_params)
    args = ocp.args.Composite(**{_PARAMS: params_args, _METADATA: ocp.args.JsonRestore()})
    with file_io.reading(f"params export {path}", fix=fix):
      restored = checkpointer.restore(path, args=args)
  finally:
    checkpointer.close()
  return restored[_PARAMS], restored[_METADATA]


def _dotted_shapes(tree: PyTree) -> dict[str, tuple]:
  """{"opt_state.0.mu.w": shape} of a state pytree or of orbax's metadata of a saved one (which
  names its arrays the same way)."""

  def name(key) -> str:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  def shape(leaf) -> tuple:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)  # saved as its key data
    return tuple(leaf.shape)

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(name(k) for k in path): shape(leaf) for path, leaf in leaves}


def _shape_mismatch(
    saved: dict[str, tuple],
    wanted: dict[str, tuple],
    saved_in: str = "the checkpoint",
    wanted_in: str = "this run",
) -> str | None:
  """The arrays only one side has, or the first whose shape differs; None if they match."""
  only_saved, only_wanted = sorted(saved.keys() - wanted.keys()), sorted(
      wanted.keys() - saved.keys()
  )
  if only_saved or only_wanted:
    return f"arrays only in {saved_in}: {only_saved[:3]}; only in {wanted_in}: {only_wanted[:3]}"
  for key, shape in saved.items():
    if shape != wanted[key]:
      return f"{key} has shape {shape} in {saved_in} but {wanted[key]} in {wanted_in}"
  return None


def read_export_metadata(directory: str | os.PathLike) -> dict:
  """The JSON metadata of a params export, without reading the params (cheap: no arrays)."""
  path = _as_path(directory)
  file = path / _METADATA / _METADATA
  if not file.exists():
    raise ConfigPathError(
        f"{path} is not a params export (no {_METADATA}/{_METADATA}); point config.init_from at "
        "a run's WORKDIR/export"
    )
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(
        f"{file}:{e.lineno}: the export's metadata is not valid JSON ({e.msg}); the export is "
        "damaged: export it again (rerun the stage that wrote it)"
    ) from None
