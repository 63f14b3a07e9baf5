"""Checkpointer and params exports on 8 fake CPU devices.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/train/test_checkpoint.py.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train.checkpoint import Checkpointer, export_params, load_params
from tests.helpers import faults


@struct.dataclass
class _State:
  """Stands in for train.TrainState: the same fields, any pytree works."""

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array
  raw_rng: jax.Array


def _mesh(shape):
  return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def _params(mesh):
  w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) / 7.0
  return {
      "layer": {
          "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
          "b": jax.device_put(jnp.linspace(-1, 1, 8), NamedSharding(mesh, P("model"))),
      },
      "emb": jax.device_put(jnp.ones((4, 2), jnp.bfloat16), NamedSharding(mesh, P())),
  }


def _state(mesh, seed=0):
  params = jax.tree.map(lambda x: x + seed, _params(mesh))
  opt_state = optax.adamw(1e-3).init(params)
  return _State(
      step=jnp.array(seed, jnp.int32),
      params=params,
      opt_state=opt_state,
      rng=jax.random.key(seed),
      raw_rng=jax.random.PRNGKey(seed + 100),
  )


def _abstract(state, mesh):
  """Target with the 8x8 weights (and their Adam moments) laid out transposed over `mesh`."""

  def leaf(x):
    spec = P("model", "data") if x.shape == (8, 8) else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree.map(leaf, state)


def _to_host(tree):
  """NumPy copy of `tree`; a typed key becomes {"typed_key": key_data} (unlike a raw key)."""

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return {"typed_key": np.asarray(jax.random.key_data(x))}
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


def _assert_trees_equal(actual, expected):
  actual, expected = _to_host(actual), _to_host(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(a, e)


def test_round_trip_onto_a_different_mesh_layout(tmp_path):
  saved_mesh, target_mesh = _mesh((4, 2)), _mesh((2, 4))
  state = _state(saved_mesh, seed=3)
  with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, data_state={"epoch": 1, "offset": 1234})
  with Checkpointer(tmp_path / "ckpt") as ckpt:  # a fresh process resuming
    assert ckpt.latest_step() == 10
    abstract = _abstract(state, target_mesh)
    restored, data_state = ckpt.restore(abstract)
  _assert_trees_equal(restored, state)
  assert data_state == {"epoch": 1, "offset": 1234}
  w = restored.params["layer"]["w"]
  assert w.sharding == NamedSharding(target_mesh, P("model", "data"))
  assert w.addressable_shards[0].data.shape == (2, 4)  # 8x8 split 4 ways by rows, 2 by cols
  # The restored arrays are usable in a jitted computation on the new mesh.
  np.testing.assert_allclose(
      jax.jit(lambda x: x.sum())(w), np.asarray(state.params["layer"]["w"]).sum()
  )
  # Typed keys still draw the same numbers.
  np.testing.assert_array_equal(
      jax.random.normal(restored.rng, (3,)), jax.random.normal(state.rng, (3,))
  )


def test_keep_last_n_and_interval(tmp_path):
  state = _state(_mesh((8, 1)))
  with Checkpointer(tmp_path, keep=2, save_interval_steps=5, async_save=False) as ckpt:
    saved = [step for step in range(1, 21) if ckpt.save(step, state, data_state={"s": step})]
    assert saved == [5, 10, 15, 20]
    assert ckpt.all_steps() == [15, 20]
    assert ckpt.save(23, state, data_state={}, force=True)
    assert ckpt.all_steps() == [20, 23]
    # Saving a step that already exists is a no-op rather than an orbax error.
    assert not ckpt.save(23, state, data_state={}, force=True)
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [20, 23]


def test_async_save_then_wait(tmp_path):
  mesh = _mesh((4, 2))
  state = _state(mesh, seed=1)
  expected = _to_host(state)
  ckpt = Checkpointer(tmp_path, async_save=True)
  assert ckpt.save(2, state, data_state={"pos": 2})
  # The caller may donate the state as soon as save() returns.
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait()
  assert os.path.isdir(tmp_path / "2")
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
  restored, data_state = ckpt.restore(_abstract(_state(mesh), mesh), step=2)
  ckpt.close()
  _assert_trees_equal(restored, expected)
  assert data_state == {"pos": 2}


def test_data_state_and_config_round_trip_per_step(tmp_path):
  mesh = _mesh((8, 1))
  config = {"lr": 1e-4, "model": {"layers": 2, "name": "toy"}, "seeds": [1, 2]}
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _state(mesh, 1), data_state={"offset": 10, "files": ["a.jsonl"]}, config=config)
    ckpt.save(2, _state(mesh, 2), data_state={"offset": 20, "files": ["b.jsonl"]})
  with Checkpointer(tmp_path) as ckpt:
    state1, data1 = ckpt.restore(_abstract(_state(mesh), mesh), step=1)
    state2, data2 = ckpt.restore(_abstract(_state(mesh), mesh))
    assert data1 == {"offset": 10, "files": ["a.jsonl"]}
    assert data2 == {"offset": 20, "files": ["b.jsonl"]}
    assert int(state1.step) == 1 and int(state2.step) == 2
    assert ckpt.restore_config(step=1) == config
    assert ckpt.restore_config() is None  # step 2 was saved without one


def test_latest_step_ignores_half_written_tmp_dirs(tmp_path):
  mesh = _mesh((8, 1))
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(4, _state(mesh, 4), data_state={"offset": 4})
  # What a run killed mid-save leaves behind: orbax's tmp directory for a newer step,
  # with some files in it.
  half_written = tmp_path / "8.orbax-checkpoint-tmp"
  os.makedirs(half_written / "state")
  (half_written / "state" / "partial").write_bytes(b"\0" * 10)
  os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-1795613444")  # older orbax naming
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 4
    assert ckpt.all_steps() == [4]
    state, data_state = ckpt.restore(_abstract(_state(mesh), mesh))
    assert int(state.step) == 4 and data_state == {"offset": 4}
    # Opening a directory must not delete another writer's in-flight save.
    assert half_written.is_dir()
    # Re-saving that step replaces the stale tmp directory.
    assert ckpt.save(8, _state(mesh, 8), data_state={"offset": 8}, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 8
  assert not half_written.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_latest_falls_back_to_the_previous_step(tmp_path, caplog, damage):
  """A finished step whose files are later truncated or lost is set aside with a warning, and the
  run resumes from the newest step that reads; a new save of that step is written afresh."""
  mesh = _mesh((8, 1))
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(mesh, step), data_state={"offset": step})
  files = [f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file()]
  assert files
  for f in files:
    if damage == "truncate":
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    else:
      f.unlink()
  with Checkpointer(tmp_path) as ckpt:
    with caplog.at_level("WARNING", logger="rlhf_jax.train.checkpoint"):
      state, data_state = ckpt.restore(_abstract(_state(mesh), mesh))
    assert int(state.step) == 1 and data_state == {"offset": 1}
    _assert_trees_equal(_to_host(state.params), _to_host(_state(mesh, 1).params))
    assert "cannot be read" in caplog.text and "resumed from step 1" in caplog.text
    assert ckpt.all_steps() == [1]
    assert len(list(tmp_path.glob("2.corrupt-*"))) == 1  # kept for inspection
    assert ckpt.save(2, _state(mesh, 2), data_state={"offset": 2}, force=True)
    ckpt.wait()
    state, data_state = ckpt.restore(_abstract(_state(mesh), mesh))
    assert int(state.step) == 2 and data_state == {"offset": 2}


def test_any_damaged_file_of_the_latest_step_never_restores_wrong_values(tmp_path):
  """Every file of the newest step, truncated, deleted or overwritten in place: the restore gives
  either that step exactly (the file was not needed) or the step before exactly (the damaged step
  set aside), never other values and never an error; a changed array is caught by the
  fingerprint saved with it."""
  mesh = _mesh((8, 1))
  template = tmp_path / "template"
  with Checkpointer(template, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _state(mesh, step), data_state={"offset": step}, config={"step": step})
  files = sorted(f.relative_to(template / "2") for f in (template / "2").rglob("*") if f.is_file())
  assert {f.parts[0] for f in files} >= {"state", "data_state", "config", "fingerprint"}
  outcomes = {}
  for i, name in enumerate(files):
    for how in faults.HOW:
      if how != "delete" and (template / "2" / name).stat().st_size == 0:
        continue
      run = tmp_path / f"run{i}_{how}"
      shutil.copytree(template, run)
      faults.damage(run / "2" / name, how)
      with Checkpointer(run) as ckpt:
        state, data_state = ckpt.restore(_abstract(_state(mesh), mesh))
      step = int(state.step)
      assert step in (1, 2) and data_state == {"offset": step}, (name, how)
      try:
        _assert_trees_equal(state, _state(mesh, step))
      except AssertionError as e:
        raise AssertionError(f"{name} {how}: {str(e)[:300]}") from None
      outcomes[(str(name), how)] = step
  # The data position and the fingerprints are always needed: damage there always falls back.
  for (name, how), step in outcomes.items():
    if name in ("fingerprint/metadata", "data_state/metadata"):
      assert step == 1, (name, how)
  # The silent case: the arrays' largest data file overwritten in place still reads, and only the
  # fingerprint tells.
  largest = max(
      (f for f in files if f.parts[0] == "state"), key=lambda f: (template / "2" / f).stat().st_size
  )
  assert outcomes[(str(largest), "overwrite")] == 1


def test_every_step_unreadable_raises_the_newest_error(tmp_path):
  mesh = _mesh((8, 1))
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _state(mesh, 1), data_state={})
    # A state that does not match is another config, not a damaged step: raised at once, naming
    # the first array that differs, and nothing is set aside.
    with pytest.raises(ValueError, match=r"another model or optimiser config \(arrays only in the"):
      ckpt.restore(_abstract(_state(mesh), mesh).params)
    assert ckpt.all_steps() == [1]  # nothing set aside


def test_restore_errors_are_clear(tmp_path):
  mesh = _mesh((8, 1))
  with Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(FileNotFoundError, match="no finished checkpoint in .*empty"):
      ckpt.restore(_abstract(_state(mesh), mesh))
  with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
    ckpt.save(1, _state(mesh), data_state={})
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available steps: \[1\]"):
      ckpt.restore(_abstract(_state(mesh), mesh), step=7)
    no_sharding = jax.eval_shape(lambda: _state(mesh))
    no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), no_sharding)
    with pytest.raises(ValueError, match=r"abstract_state\.step has no sharding"):
      ckpt.restore(no_sharding)
    with pytest.raises(ValueError, match="another model or optimiser config"):
      ckpt.restore(_abstract(_state(mesh), mesh).params)
    wider = _abstract(_state(mesh), mesh)
    wider = wider.replace(step=jax.ShapeDtypeStruct((2,), jnp.int32, sharding=wider.step.sharding))
    with pytest.raises(
        ValueError, match=r"step has shape \(\) in the checkpoint but \(2,\) in this"
    ):
      ckpt.restore(wider)
    with pytest.raises(ValueError, match="data_state is not JSON-serialisable"):
      ckpt.save(2, _state(mesh), data_state={"offset": object()})
    with pytest.raises(ValueError, match="config must be a dict"):
      ckpt.save(3, _state(mesh), data_state={}, config=[1, 2])
  with pytest.raises(ValueError, match="keep must be >= 1"):
    Checkpointer(tmp_path / "bad", keep=0)


def test_export_and_load_params(tmp_path):
  saved_mesh, target_mesh = _mesh((4, 2)), _mesh((2, 4))
  params = _params(saved_mesh)
  metadata = {"model": {"vocab": 32, "layers": 2}, "tokenizer": "/data/tok.json"}
  path = export_params(tmp_path / "sft_export", params, metadata=metadata)
  assert path == tmp_path / "sft_export"

  host_params, host_metadata = load_params(path)
  assert host_metadata == metadata
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host_params))
  _assert_trees_equal(host_params, jax.tree.map(np.asarray, params))

  abstract = _abstract(params, target_mesh)
  sharded, _ = load_params(str(path), abstract)
  _assert_trees_equal(sharded, params)
  assert sharded["layer"]["w"].sharding == NamedSharding(target_mesh, P("model", "data"))
  assert sharded["emb"].sharding == NamedSharding(target_mesh, P())

  with pytest.raises(FileExistsError, match="overwrite=True"):
    export_params(path, params, metadata=metadata)
  doubled = jax.tree.map(lambda x: x * 2, params)
  export_params(path, doubled, metadata={"v": 2}, overwrite=True)
  reloaded, reloaded_metadata = load_params(path)
  assert reloaded_metadata == {"v": 2}
  _assert_trees_equal(reloaded, jax.tree.map(np.asarray, doubled))


def test_load_params_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_params(tmp_path / "nowhere")
  not_export = tmp_path / "not_export"
  not_export.mkdir()
  (not_export / "model.safetensors").write_text("x")
  with pytest.raises(ValueError, match=r"not_export is not a params export.*model\.safetensors"):
    load_params(not_export)
  params = _params(_mesh((8, 1)))
  export_params(tmp_path / "e", params, metadata={})
  with pytest.raises(ValueError, match="does not match abstract_params"):
    load_params(tmp_path / "e", {"emb": _abstract(params, _mesh((8, 1)))["emb"]})
  with pytest.raises(ValueError, match="metadata is not JSON"):
    export_params(tmp_path / "f", params, metadata={"x": np.float32(1)})


def test_unwritable_workdir_fails_early(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ckpt_lib.WorkdirError, match=r"a_file/run cannot be created or written"):
    ckpt_lib.check_workdir_writable(blocker / "run")
  with pytest.raises(ckpt_lib.WorkdirError, match="--workdir"):
    Checkpointer(blocker / "ckpt")
  assert ckpt_lib.check_workdir_writable(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
  assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is cleaned up


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_workdir_fails_early(tmp_path):
  read_only = tmp_path / "ro"
  read_only.mkdir()
  read_only.chmod(0o500)
  try:
    with pytest.raises(ckpt_lib.WorkdirError, match="ro cannot be created or written"):
      ckpt_lib.check_workdir_writable(read_only)
  finally:
    read_only.chmod(0o700)


def test_fingerprint_is_layout_free_and_sees_one_changed_bit_or_two_swapped_values():
  a, b = _state(_mesh((8, 1)), 3), _state(_mesh((2, 4)), 3)
  b = b.replace(
      params=jax.tree.map(lambda x: jax.device_put(x, NamedSharding(_mesh((2, 4)), P())), b.params)
  )
  assert ckpt_lib.fingerprint(a) == ckpt_lib.fingerprint(b)
  w = np.asarray(a.params["layer"]["w"])
  flipped = w.copy()
  flipped.view(np.uint32)[3, 5] ^= 1 << 7  # one mantissa bit
  swapped = w.copy()
  swapped[0, 1], swapped[2, 3] = w[2, 3], w[0, 1]
  for changed in (flipped, swapped):
    c = a.replace(params={**a.params, "layer": {**a.params["layer"], "w": jnp.asarray(changed)}})
    before, after = ckpt_lib.fingerprint(a), ckpt_lib.fingerprint(c)
    assert [k for k in before if before[k] != after[k]] == [".params['layer']['w']"]
  bf16 = ckpt_lib.fingerprint({"x": jnp.ones((4,), jnp.bfloat16), "k": jax.random.key(0)})
  assert set(bf16) == {"['x']", "['k']"} and all(0 <= v < 2**32 for v in bf16.values())
