"""The reliability table: faults and bad values through the command line, each followed to the end.

Every row is one thing a user does wrong (a bad value, a damaged or missing file, a busy workdir)
or one fault of the machine (a damaged checkpoint, a lock left by a killed run), made against the
same tiny SFT run (tests/workers/reliability_configs.py:table). For each, `python -m rlhf_jax.run`
(its `main`, run in this process as the CLI runs it) must

  1. exit with the status a shell sees: 1 for a user error, 0 where the run recovers by itself;
  2. say so in one line, `error: ...`, naming the key or the path (no traceback);
  3. leave nothing half-written: no export, and no checkpoint step it did not have before;
  4. after the row's fix (the bad flag dropped, the file put back, as the message says), end the
     same command in the same workdir with params identical, bit for bit, to an uninterrupted
     run's. A row whose run recovers by itself (status 0) must end identical without a fix.

A row whose bad run left no workdir at all (it stopped before creating one) is not rerun: its
fixed command, from the same empty start, is the uninterrupted run itself.

Read the table as documentation: `did` says what the user did, `says` what the line contains
({tmp} is the row's scratch directory). tests/unit/test_bad_inputs.py has the Python-level table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable
from unittest import mock

import jax
import numpy as np
import pytest
from absl import flags

from rlhf_jax import run
from rlhf_jax.data import train_tokenizer
from rlhf_jax.models import ModelConfig
from rlhf_jax.toyworld import corpus_texts, generate_sft_records
from rlhf_jax.train import checkpoint, metrics
from tests.helpers import ROOT, faults
from tests.helpers.compile_cache import persistent_compilation_cache
from tests.helpers.configs import TINY_MODEL

pytestmark = pytest.mark.slow

CONFIG = f"--config={ROOT}/tests/workers/reliability_configs.py:table"


def cli(*args: str) -> tuple[int, str]:
  """`python -m rlhf_jax.run ARGS` in this process: (exit status, what it printed to stderr).

  The same steps as `run.run()` (override check, flag parsing, `main`); a `sys.exit("error: ...")`
  is status 1 with that line, as the interpreter would print it."""
  argv = ["rlhf_jax.run", *args]
  err = io.StringIO()
  with (
      contextlib.redirect_stderr(err),
      contextlib.redirect_stdout(io.StringIO()),
      mock.patch.object(sys, "argv", argv),  # ml_collections reads the overrides from sys.argv
  ):
    try:
      run.check_overrides(argv)
      flags.FLAGS.unparse_flags()
      flags.FLAGS(argv)
      run.main(argv)
      status = 0
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else 1
      if isinstance(e.code, str):
        print(e.code, file=err)
    finally:  # as a fresh process would start: no parsed flags, no override flags defined
      flags.FLAGS.unparse_flags()
      for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
  return status, err.getvalue()


def base_args(tmp: Path) -> list[str]:
  return [
      CONFIG,
      f"--workdir={tmp / 'run'}",
      f"--config.data.source={tmp / 'data.jsonl'}",
      f"--config.data.tokenizer={tmp / 'tok'}",
  ]


def params(workdir: Path):
  return checkpoint.load_params(workdir / "export")[0]


def steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return (
      sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """The run's data file and tokenizer (each row copies them), under a compilation cache shared
  by every run of the module."""
  root = tmp_path_factory.mktemp("table_inputs")
  records = generate_sft_records(96, seed=0)
  metrics.write_jsonl(records, root / "data.jsonl")
  train_tokenizer(corpus_texts(records), 384, root / "tok")
  with persistent_compilation_cache(tmp_path_factory.mktemp("table_cache")):
    yield root


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
  """The uninterrupted run: its workdir (export, checkpoints 2 and 4) and its params."""
  tmp = tmp_path_factory.mktemp("uninterrupted")
  fresh_inputs(tmp, inputs)
  status, err = cli(*base_args(tmp))
  assert status == 0, err
  return tmp / "run", params(tmp / "run")


def fresh_inputs(tmp: Path, inputs: Path) -> None:
  shutil.copy(inputs / "data.jsonl", tmp / "data.jsonl")
  shutil.copytree(inputs / "tok", tmp / "tok")


# --- what the rows do ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  did: str  # what the user (or the machine) did
  says: tuple[str, ...]  # fragments of the one line; "{tmp}" is the row's scratch directory
  args: tuple[str, ...] = ()  # flags after the base command's (dropped by the fix)
  damage: Callable[[Path, Path], None] | None = None  # (tmp, uninterrupted workdir) before the run
  fix: Callable[[Path, Path], None] | None = None  # (tmp, inputs) after it, before the rerun
  status: int = 1
  saves: bool = False  # stops mid-run by design, keeping the steps it saved before (all finished)


def put_back_inputs(tmp: Path, inputs: Path) -> None:
  """The fix for a damaged data file or tokenizer: copy the good ones again."""
  if (tmp / "data.jsonl").is_dir():
    shutil.rmtree(tmp / "data.jsonl")
  (tmp / "data.jsonl").unlink(missing_ok=True)
  shutil.rmtree(tmp / "tok", ignore_errors=True)
  fresh_inputs(tmp, inputs)


def data_lines(*lines) -> Callable[[Path, Path], None]:
  """Replaces the data file with the good records followed by `lines` (dicts, or raw text)."""

  def damage(tmp: Path, _: Path) -> None:
    good = (tmp / "data.jsonl").read_bytes()
    extra = [json.dumps(x).encode() if isinstance(x, dict) else x.encode() for x in lines]
    (tmp / "data.jsonl").write_bytes(good + b"\n".join(extra) + b"\n")

  return damage


def damaged(path: str, how: str) -> Callable[[Path, Path], None]:
  """Damages {tmp}/path (`faults.damage`)."""
  return lambda tmp, _: faults.damage(tmp / path, how)


def partial_run(tmp: Path, done: Path) -> None:
  """The workdir of a run killed after its step-2 save: the uninterrupted run's, less its export
  and step 4."""
  shutil.copytree(done, tmp / "run", ignore=shutil.ignore_patterns("export", "4", ".lock"))
  metrics.write_jsonl(
      [r for r in metrics.read_jsonl(tmp / "run" / "metrics.jsonl") if r.get("step", 0) <= 2],
      tmp / "run" / "metrics.jsonl",
  )


def checkpoint_file(tmp: Path, step: int, how: str) -> None:
  """The largest array file of checkpoint `step` in {tmp}/run, damaged (`faults.damage`)."""
  faults.damage(faults.largest_file(tmp / "run" / "checkpoints" / str(step) / "state"), how)


def finished_then(how: str) -> Callable[[Path, Path], None]:
  """A finished run whose newest checkpoint (step 4) is then damaged, its export removed."""

  def damage(tmp: Path, done: Path) -> None:
    shutil.copytree(done, tmp / "run", ignore=shutil.ignore_patterns("export", ".lock"))
    checkpoint_file(tmp, 4, how)

  return damage


def all_damaged(tmp: Path, done: Path) -> None:
  shutil.copytree(done, tmp / "run", ignore=shutil.ignore_patterns("export", ".lock"))
  checkpoint_file(tmp, 2, "truncate")
  checkpoint_file(tmp, 4, "truncate")


TINY_FIELDS = {**TINY_MODEL, "vocab_size": 384}  # the table's tokenizer's vocabulary


def zero_params(cfg: ModelConfig):
  from rlhf_jax.models import abstract_model

  _, abstract, _ = abstract_model(cfg)
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)


def damaged_export(part: str) -> Callable[[Path, Path], None]:
  """A params export (zeros) of the tiny model in {tmp}/other_export whose `part` is cut short
  (a file, or the largest file under a folder)."""

  def damage(tmp: Path, _: Path) -> None:
    cfg = ModelConfig(**TINY_FIELDS)
    checkpoint.export_params(
        tmp / "other_export",
        zero_params(cfg),
        metadata={"model": cfg.to_dict(), "tokenizer": str(tmp / "tok")},
    )
    target = tmp / "other_export" / part
    faults.damage(faults.largest_file(target) if target.is_dir() else target, "truncate")

  return damage


def held_lock(tmp: Path, _: Path) -> None:
  """Another live run holds the workdir: its lock, taken through a second open file."""
  (tmp / "run").mkdir()
  fd = os.open(tmp / "run" / ".lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.write(
      fd, json.dumps({"host": "node-7", "pid": 4242, "started": "today", "command": "x"}).encode()
  )
  _HELD.append(fd)


def release_lock(tmp: Path, inputs: Path) -> None:
  for fd in _HELD:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
  _HELD.clear()


_HELD: list[int] = []


def stale_lock(tmp: Path, done: Path) -> None:
  """A lock file left by a run that was killed: it names its holder, but nobody holds it."""
  partial_run(tmp, done)
  (tmp / "run" / ".lock").write_text(
      json.dumps({"host": "node-7", "pid": 4242, "started": "yesterday", "command": "killed"})
  )


def damaged_hf(name: str) -> Callable[[Path, Path], None]:
  """A tiny HF checkpoint in {tmp}/hf (config.json, model.safetensors, the tokenizer) whose file
  `name` is cut short."""

  def damage(tmp: Path, _: Path) -> None:
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.hf import checkpoints as hf

    cfg = ModelConfig(**TINY_FIELDS)
    hf.export_hf(zero_params(cfg), cfg, tmp / "hf", tokenizer=load_tokenizer(tmp / "tok"))
    faults.damage(tmp / "hf" / name, "truncate")

  return damage


def huge_first_held_out_prompt(tmp: Path, _: Path) -> None:
  """The first held-out record (the sample table's first pick) replaced by a 1 MB prompt; the
  training split is unchanged."""
  lines = (tmp / "data.jsonl").read_bytes().splitlines()
  lines[-9] = json.dumps({"prompt": "word " * 200_000, "completion": "ok"}).encode()  # 96 x 0.1
  (tmp / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")


SFT_PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I refuse."}
LONG = {"prompt": "the lazy dog " * 60, "completion": "ok"}

ROWS = [
    # --- config values: one line naming the key, the value and the allowed range -----------------
    Row(
        "lr_negative",
        "set a negative learning rate",
        ("config.optim.lr=-1.0 is out of range",),
        ("--config.optim.lr=-1",),
    ),
    Row(
        "lr_nan",
        "set the learning rate to nan",
        ("config.optim.lr=nan",),
        ("--config.optim.lr=nan",),
    ),
    Row(
        "batch_zero",
        "set train.batch_size to 0",
        ("config.train.batch_size=0 is out of range",),
        ("--config.train.batch_size=0",),
    ),
    Row(
        "steps_zero", "set train.steps to 0", ("config.train.steps=0",), ("--config.train.steps=0",)
    ),
    Row(
        "checkpoint_every_zero",
        "set train.checkpoint_every to 0",
        ("config.train.checkpoint_every=0",),
        ("--config.train.checkpoint_every=0",),
    ),
    Row(
        "keep_checkpoints_zero",
        "set train.keep_checkpoints to 0",
        ("config.train.keep_checkpoints=0",),
        ("--config.train.keep_checkpoints=0",),
    ),
    Row(
        "log_every_zero",
        "set train.log_every to 0",
        ("config.train.log_every=0",),
        ("--config.train.log_every=0",),
    ),
    Row(
        "eval_fraction_above_one",
        "set data.eval_fraction to 1.5",
        ("config.data.eval_fraction=1.5",),
        ("--config.data.eval_fraction=1.5",),
    ),
    Row(
        "warmup_negative",
        "set a negative warm-up",
        ("config.optim.warmup_steps=-1",),
        ("--config.optim.warmup_steps=-1",),
    ),
    Row(
        "grad_clip_negative",
        "set a negative gradient clip",
        ("config.optim.grad_clip_norm=-1.0",),
        ("--config.optim.grad_clip_norm=-1",),
    ),
    Row(
        "seq_len_one",
        "set train.seq_len to 1",
        ("config.train.seq_len=1 is out of range: must be a whole number >= 2",),
        ("--config.train.seq_len=1",),
    ),
    Row(
        "gpt2_positions_too_few",
        "trained a GPT-2 model on rows longer than its positions",
        ("config.train.seq_len=128 exceeds the model's max_seq_len=64",),
        ("--config.model.family=gpt2", "--config.train.seq_len=128"),
    ),
    # --- config keys and names -------------------------------------------------------------------
    Row(
        "unknown_key",
        "misspelled train.steps",
        ("--config.train.stpes is not a field", "Did you mean train.steps"),
        ("--config.train.stpes=5",),
    ),
    Row(
        "moved_key",
        "used the old nested spelling of a DPO field",
        ("--config.dpo.dpo.reference has moved: it is now --config.dpo.reference",),
        ("--config.dpo.dpo.reference=precompute",),
    ),
    Row(
        "unknown_algorithm",
        "misspelled the algorithm",
        ("config.algorithm='sftt' is not known", "did you mean 'sft'"),
        ("--config.algorithm=sftt",),
    ),
    Row(
        "unknown_data_kind",
        "set data.kind to a kind that does not exist",
        ("unknown record kind 'banana' (config.data.kind)",),
        ("--config.data.kind=banana",),
    ),
    Row(
        "unknown_overflow_policy",
        "set data.prompt_overflow to 'truncate'",
        ("config.data.prompt_overflow",),
        ("--config.data.prompt_overflow=truncate",),
    ),
    Row(
        "split_on_jsonl",
        "set data.split for a JSONL file",
        ("config.data.split",),
        ("--config.data.split=train",),
    ),
    # --- mesh and model shapes -------------------------------------------------------------------
    Row(
        "mesh_wrong_size",
        "asked for a 3-device mesh on 8 devices",
        ("config.mesh.shape",),
        ("--config.mesh.shape=(3,1,1)",),
    ),
    Row(
        "tensor_axis_heads",
        "split 4 heads over a tensor axis of 8",
        ("tensor axis = 8 does not divide model num_heads = 4",),
        ("--config.mesh.shape=(1,1,8)",),
    ),
    Row(
        "batch_not_divisible",
        "set a batch the data axes do not divide",
        ("batch size 6 is not divisible by the 4 devices", "config.train.batch_size"),
        ("--config.train.batch_size=6",),
    ),
    Row(
        "kv_heads_not_dividing",
        "set 3 key/value heads for 4 heads",
        ("num_kv_heads",),
        ("--config.model.num_kv_heads=3",),
    ),
    # --- the data file ---------------------------------------------------------------------------
    Row(
        "data_missing",
        "pointed data.source at a file that does not exist",
        ("{tmp}/nope.jsonl: no such file", "config.data.source"),
        ("--config.data.source={tmp}/nope.jsonl",),
    ),
    Row(
        "data_is_a_directory",
        "pointed data.source at a directory",
        ("{tmp}/data.jsonl is a directory",),
        damage=damaged("data.jsonl", "dir"),
        fix=put_back_inputs,
    ),
    Row(
        "data_empty",
        "gave an empty data file",
        ("{tmp}/data.jsonl", "no records found"),
        damage=damaged("data.jsonl", "empty"),
        fix=put_back_inputs,
    ),
    Row(
        "json_data_empty",
        "gave an empty .json data file",
        ("{tmp}/data.json", "no records found (the file is empty)"),
        ("--config.data.source={tmp}/data.json",),
        damage=lambda tmp, _: (tmp / "data.json").write_text(""),
    ),
    Row(
        "data_cut_short",
        "copied the data file only partly (its last line cut)",
        ("{tmp}/data.jsonl:", "invalid JSON"),
        damage=data_lines('{"prompt": "Hi", "comp'),
        fix=put_back_inputs,
    ),
    Row(
        "data_not_utf8",
        "saved a line of the data file as Latin-1",
        ("{tmp}/data.jsonl:", "UTF-8"),
        damage=lambda tmp, _: (tmp / "data.jsonl").write_bytes(
            (tmp / "data.jsonl").read_bytes() + b'{"prompt": "caf\xe9", "completion": "ok"}\n'
        ),
        fix=put_back_inputs,
    ),
    Row(
        "record_missing_completion",
        "wrote a record without its completion",
        ("{tmp}/data.jsonl:97: field 'completion': missing",),
        damage=data_lines({"prompt": "Hi"}),
        fix=put_back_inputs,
    ),
    Row(
        "record_wrong_type",
        "wrote a completion as a number",
        ("{tmp}/data.jsonl:97: field 'completion': expected a string",),
        damage=data_lines({"prompt": "Hi", "completion": 4}),
        fix=put_back_inputs,
    ),
    Row(
        "record_bad_role",
        "wrote a chat turn with role 'bot'",
        ("{tmp}/data.jsonl:97:", "role"),
        damage=data_lines(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}
        ),
        fix=put_back_inputs,
    ),
    Row(
        "pairs_for_sft",
        "ran SFT on preference pairs",
        ("{tmp}/data.jsonl:97: field 'completion': missing", "config.data.kind='pairwise'"),
        damage=data_lines(SFT_PAIR),
        fix=put_back_inputs,
    ),
    Row(
        "prompt_longer_than_seq_len",
        "set prompt_overflow='error' with a prompt longer than seq_len",
        (
            "{tmp}/data.jsonl:1: field 'prompt'",
            ">= config.train.seq_len=64",
            "config.data.prompt_overflow='truncate_left'",
        ),
        ("--config.data.prompt_overflow=error",),
        damage=lambda tmp, _: (tmp / "data.jsonl").write_bytes(
            json.dumps(LONG).encode() + b"\n" + (tmp / "data.jsonl").read_bytes()
        ),
        fix=put_back_inputs,
    ),
    Row(
        "all_held_out",
        "gave a data file so small that the eval split takes all of it",
        ("config.data.eval_fraction=0.1 holds out all 1 records",),
        damage=lambda tmp, _: (tmp / "data.jsonl").write_text(
            (tmp / "data.jsonl").read_text().splitlines()[0] + "\n"
        ),
        fix=put_back_inputs,
    ),
    Row(
        "eval_source_missing",
        "pointed data.eval_source at a missing file",
        ("{tmp}/held_out.jsonl: no such file",),
        ("--config.data.eval_source={tmp}/held_out.jsonl",),
    ),
    Row(
        "data_unsupported_type",
        "gave a .txt data file",
        ("unsupported file type '.txt'",),
        ("--config.data.source={tmp}/data.txt",),
        damage=lambda tmp, _: (tmp / "data.txt").write_text("hello\n"),
    ),
    # --- the tokenizer ---------------------------------------------------------------------------
    Row(
        "tokenizer_missing",
        "pointed data.tokenizer at a missing directory",
        ("{tmp}/no_tok",),
        ("--config.data.tokenizer={tmp}/no_tok",),
    ),
    Row(
        "tokenizer_json_cut",
        "copied tokenizer.json only partly",
        ("{tmp}/tok/tokenizer.json", "not valid JSON"),
        damage=damaged("tok/tokenizer.json", "truncate"),
        fix=put_back_inputs,
    ),
    Row(
        "tokenizer_json_garbage",
        "has a garbled tokenizer.json",
        ("{tmp}/tok/tokenizer.json",),
        damage=damaged("tok/tokenizer.json", "garbage"),
        fix=put_back_inputs,
    ),
    Row(
        "tokenizer_json_deleted",
        "deleted tokenizer.json",
        ("{tmp}/tok",),
        damage=damaged("tok/tokenizer.json", "delete"),
        fix=put_back_inputs,
    ),
    # --- init_from exports and HF checkpoints ----------------------------------------------------
    Row(
        "init_from_missing",
        "pointed init_from at a missing export",
        ("{tmp}/no_export",),
        ("--config.init_from={tmp}/no_export",),
    ),
    Row(
        "init_from_not_an_export",
        "pointed init_from at the data folder",
        ("{tmp}/tok is not a params export",),
        ("--config.init_from={tmp}/tok",),
    ),
    Row(
        "init_from_metadata_damaged",
        "has an export whose metadata was cut short",
        ("{tmp}/other_export/metadata/metadata", "not valid JSON"),
        ("--config.init_from={tmp}/other_export",),
        damage=damaged_export("metadata/metadata"),
    ),
    Row(
        "init_from_params_damaged",
        "has an export whose params were cut short",
        ("{tmp}/other_export",),
        ("--config.init_from={tmp}/other_export",),
        damage=damaged_export("params"),
    ),
    Row(
        "hf_config_cut",
        "copied an HF checkpoint's config.json only partly",
        ("{tmp}/hf/config.json", "not valid JSON"),
        ("--config.hf_model_dir={tmp}/hf",),
        damage=damaged_hf("config.json"),
    ),
    Row(
        "hf_weights_cut",
        "copied an HF checkpoint's model.safetensors only partly",
        ("{tmp}/hf/model.safetensors",),
        ("--config.hf_model_dir={tmp}/hf",),
        damage=damaged_hf("model.safetensors"),
    ),
    # --- the workdir -----------------------------------------------------------------------------
    Row(
        "workdir_is_a_file",
        "pointed --workdir at a file",
        ("{tmp}/run",),
        damage=lambda tmp, _: (tmp / "run").write_text("notes"),
        fix=lambda tmp, _: (tmp / "run").unlink(),
    ),
    Row(
        "workdir_busy",
        "started a second run in a workdir another run holds",
        ("{tmp}/run is in use by another run (host node-7, pid 4242",),
        damage=held_lock,
        fix=release_lock,
    ),
    Row(
        "resume_other_shape",
        "resumed a run with a wider model",
        ("{tmp}/run/checkpoints/2 was saved by a run with another model", "or use a new --workdir"),
        ("--config.model.embed_dim=128",),
        damage=partial_run,
    ),
    Row(
        "diverged",
        "trained at lr 1e30: every step after the first is NaN",
        ("the last", "all had a NaN or Inf gradient", "Lower config.optim.lr"),
        (
            "--config.optim.lr=1e30",
            "--config.optim.warmup_steps=0",
            "--config.train.max_nonfinite_steps=2",
        ),
        fix=lambda tmp, _: shutil.rmtree(tmp / "run"),
        saves=True,
    ),
    # --- faults the run recovers from by itself (status 0, identical without a fix) --------------
    Row(
        "records_with_metadata",
        "kept a 'family' field (metadata) in every record",
        (),
        damage=lambda tmp, _: metrics.write_jsonl(
            [{**r, "family": "arithmetic"} for r in metrics.read_jsonl(tmp / "data.jsonl")],
            tmp / "data.jsonl",
        ),
        status=0,
    ),
    Row(
        "huge_prompt_in_the_sample_table",
        "asked for a before / after sample table with a 1 MB prompt among the held-out records",
        (),
        ("--config.sample.num_examples=2",),
        damage=huge_first_held_out_prompt,
        status=0,
    ),
    Row(
        "lock_left_by_a_killed_run",
        "rerun after a kill that left its lock file",
        (),
        damage=stale_lock,
        status=0,
    ),
    Row(
        "checkpoint_truncated",
        "rerun after a disk error cut the newest checkpoint short",
        (),
        damage=finished_then("truncate"),
        status=0,
    ),
    Row(
        "checkpoint_file_deleted",
        "rerun after a file of the newest checkpoint was lost",
        (),
        damage=finished_then("delete"),
        status=0,
    ),
    Row(
        "checkpoint_overwritten",
        "rerun after 4 KiB of the newest checkpoint were overwritten",
        (),
        damage=finished_then("overwrite"),
        status=0,
    ),
    Row(
        "every_checkpoint_damaged",
        "reran after a disk error cut every checkpoint short",
        (
            "no checkpoint in {tmp}/run/checkpoints can be read (steps 2, 4;",
            "move {tmp}/run/checkpoints away to start the run over",
        ),
        damage=all_damaged,
        fix=lambda tmp, _: (tmp / "run" / "checkpoints").rename(tmp / "run" / "checkpoints.bad"),
    ),
    Row(
        "killed_after_a_save",
        "rerun after a kill right after the step-2 save",
        (),
        damage=partial_run,
        status=0,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_fault_gives_one_line_leaves_nothing_half_written_and_the_fixed_rerun_ends_identical(
    row, tmp_path, inputs, uninterrupted
):
  done, expected = uninterrupted
  fresh_inputs(tmp_path, inputs)
  if row.damage:
    row.damage(tmp_path, done)
  workdir = tmp_path / "run"
  before = steps(workdir)
  status, err = cli(*base_args(tmp_path), *(a.format(tmp=tmp_path) for a in row.args))
  assert status == row.status, err
  if row.status:
    # Progress bars and log lines may come first: the error is one line of its own, at the end.
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("error: "), err
    for fragment in row.says:
      assert fragment.format(tmp=tmp_path) in lines[-1], (fragment, lines[-1])
    assert "Traceback" not in err
    assert not (workdir / "export").exists()
    assert row.saves or set(steps(workdir)) <= set(before), (before, steps(workdir))
    assert not list(workdir.glob("checkpoints/*tmp*")), "an unfinished save was left"
    if row.fix:
      row.fix(tmp_path, inputs)
    if not workdir.exists():
      return  # the fixed command from an empty start is the uninterrupted run itself
    status, err = cli(*base_args(tmp_path))
    assert status == 0, err
  jax.tree.map(np.testing.assert_array_equal, params(workdir), expected)
