"""One sharding story: a `(data, fsdp, tensor)` mesh and rules that map logical axis names to it.

Parameters carry logical axes (see `rlhf_jax.models.layers`); activations are constrained by name
with `constrain`, which is a no-op outside an `activation_sharding(mesh, rules)` context. The train
step factory enters that context inside the traced function, so constraints are always applied at
trace time and never depend on the caller's state. A 1-device CPU is a (1, 1, 1) mesh: same code.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). FSDP shards the `embed`
# dimension of every weight; tensor parallelism shards heads, MLP and vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("positions", None),
)


class ShardingConfigError(ValueError):
  """A mesh or sharding setting that cannot work, with the number to change in the message."""


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Mesh with axes (data, fsdp, tensor); one entry may be -1 (= all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  shape = [int(s) for s in shape]
  if len(shape) != 3:
    raise ShardingConfigError(
        f"mesh shape {shape} must have 3 entries (data, fsdp, tensor); "
        "set config.mesh.shape to e.g. (-1, 1, 1)"
    )
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ShardingConfigError(
        f"mesh shape {shape}: use positive sizes and at most one -1 in " "config.mesh.shape"
    )
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ShardingConfigError(
          f"mesh shape {tuple(shape)}: the fixed axes multiply to {known}, which does not divide the "
          f"{n} devices; change config.mesh.shape so the product of the fixed entries divides {n}"
      )
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ShardingConfigError(
        f"mesh shape {tuple(shape)} has {math.prod(shape)} devices but {n} are available; change "
        f"config.mesh.shape so that data * fsdp * tensor = {n} (or use -1 for one axis)"
    )
  return jax.make_mesh(tuple(shape), MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Iterable[str | None], rules=DEFAULT_RULES) -> P:
  """Logical axis names -> a mesh PartitionSpec via `rules`; unknown names are replicated."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in axes:
    target = table.get(name) if name is not None else None
    parts = (target,) if isinstance(target, str) else tuple(target or ())
    parts = tuple(p for p in parts if p not in used)  # a mesh axis may appear once per spec
    used.update(parts)
    out.append(None if not parts else parts[0] if len(parts) == 1 else parts)
  return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dims they do not divide (e.g. batch 1 on a data axis of 8)."""
  fitted = []
  for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    parts = (part,) if isinstance(part, str) else tuple(part or ())
    kept, size = [], 1
    for p in parts:
      if dim % (size * mesh.shape[p]) == 0:
        kept.append(p)
        size *= mesh.shape[p]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def param_shardings(abstract_params, param_axes, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding per parameter. Fails if a sharded dimension does not divide its mesh axes."""

  def one(path, shape_struct, axes):
    spec = logical_to_spec(tuple(axes), rules)
    for dim, name, part in zip(shape_struct.shape, tuple(axes), spec):
      parts = (part,) if isinstance(part, str) else tuple(part or ())
      size = math.prod(mesh.shape[p] for p in parts)
      if dim % size:
        where = jax.tree_util.keystr(path)
        raise ShardingConfigError(
            f"parameter {where} dimension {name!r} has size {dim}, not divisible by mesh axes "
            f"{parts} of size {size}; change config.mesh.shape (or the model's {name} size) so that "
            f"{size} divides {dim}"
        )
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_params, param_axes)


def validate_model_mesh(model_cfg, mesh: Mesh) -> None:
  """Early, readable checks for the model/mesh combination (before any compilation)."""
  t = mesh.shape["tensor"]
  for name, value in (
      ("num_heads", model_cfg.num_heads),
      ("num_kv_heads", model_cfg.kv_heads),
      ("mlp_dim", model_cfg.mlp_dim),
      ("vocab_size", model_cfg.vocab_size),
  ):
    if value % t:
      raise ShardingConfigError(
          f"mesh tensor axis = {t} does not divide model {name} = {value}; set config.mesh.shape "
          f"to a tensor size that divides {value} (e.g. 1)"
      )
  f = mesh.shape["fsdp"]
  if model_cfg.embed_dim % f:
    raise ShardingConfigError(
        f"mesh fsdp axis = {f} does not divide model embed_dim = {model_cfg.embed_dim}; change "
        "config.mesh.shape"
    )


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of [B, ...] batch arrays: the leading axis over the batch mesh axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",), rules))


def check_batch_size(
    batch_size: int,
    mesh: Mesh,
    rules=DEFAULT_RULES,
    *,
    what: str = "config.train.batch_size / config.train.accum_steps",
) -> None:
  """Raises ShardingConfigError unless the batch axes of `mesh` divide `batch_size` rows (a
  micro-batch); `what` names the config keys that set it, for the message."""
  spec = logical_to_spec(("batch",), rules)[0]
  parts = (spec,) if isinstance(spec, str) else tuple(spec or ())
  size = math.prod(mesh.shape[p] for p in parts)
  if batch_size % size:
    raise ShardingConfigError(
        f"batch size {batch_size} is not divisible by the {size} devices of mesh axes {parts}; "
        f"set {what} (the micro-batch) to a multiple of {size}, or change config.mesh.shape"
    )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES
) -> dict[str, jax.Array]:
  """Global host batch (numpy, [B, ...]) -> arrays sharded over the batch axes.

  Multi-host: every process passes the same global batch (the loaders are deterministic) and each
  copies only the rows its own devices hold, whatever the device order of the mesh.
  """
  sharding = batch_sharding(mesh, rules)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return {k: put(v) for k, v in batch.items()}


# --- activation constraints -----------------------------------------------------------------------


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: Any = DEFAULT_RULES


_CONTEXT = _Context()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
  """Within this context `constrain` pins activations to the mesh (enter it inside traced code)."""
  old = (_CONTEXT.mesh, _CONTEXT.rules)
  _CONTEXT.mesh, _CONTEXT.rules = mesh, rules
  try:
    yield
  finally:
    _CONTEXT.mesh, _CONTEXT.rules = old


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axis names; identity outside `activation_sharding`."""
  mesh = _CONTEXT.mesh
  if mesh is None or mesh.size == 1:
    return x
  spec = _fit_spec(logical_to_spec(axes, _CONTEXT.rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --- multi-host ----------------------------------------------------------------------------------


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Calls `jax.distributed.initialize` when this looks like a multi-process job.

  Detected: explicit arguments / JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID),
  SLURM with more than one task, or a multi-host Cloud TPU slice. JAX's own cluster detection then
  fills in whatever was not given. Returns whether this is a multi-process job (initialised now or
  by an earlier call: the pipeline runner and each driver it calls may both call this).
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  if not (coordinator_address or slurm or tpu_pod):
    return False
  if coordinator_address and num_processes is None and "JAX_NUM_PROCESSES" in env:
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if coordinator_address and process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True
