"""The bad-input suite: what a user can get wrong, and what they are told.

Every case below is one mistake a user can make in a data file, an experiment config, an export or
checkpoint directory, a Hugging Face checkpoint directory or a mesh. Each must raise one of
`rlhf_jax.run.USER_ERRORS` (the CLI prints those as a single `error: ...` line, with no traceback)
whose message names where the problem is (file:line and field, the config key, the tensor) and
what to change. A failed run leaves nothing half-written: no `export/`, no finished checkpoint
step, no `hf_import/`.

Read the table as documentation: `did` says what the user did, `says` what the message contains
(`{tmp}` is the case's scratch directory). The last tests check that nothing under `rlhf_jax/` can
unpickle data or run a checkpoint's remote code. tests/integration/test_bad_inputs.py runs the real
CLI (`python -m rlhf_jax.run`) on a few of the same mistakes.
"""

from __future__ import annotations

import ast
import atexit
import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import data, errors, run, sharding
from rlhf_jax.algorithms import common, dpo, pipeline
from rlhf_jax.configs import base as configs
from rlhf_jax.configs import toy as toy_configs
from rlhf_jax.data import RecordError
from rlhf_jax.data.files import DamagedFileError
from rlhf_jax.evaluation import compare
from rlhf_jax.models import ModelConfig, abstract_model
from rlhf_jax.train import checkpoint, make_optimizer, metrics
from tests.helpers import ROOT_PATH as ROOT
from tests.helpers.bad_inputs import SFT, assert_nothing_half_written, jsonl
from tests.helpers.configs import TINY_MODEL

ConfigError, ConfigPathError = errors.ConfigError, errors.ConfigPathError
ShardingConfigError = sharding.ShardingConfigError


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  did: str  # what the user did
  provoke: Callable[[Path], Any]  # does it, in a fresh scratch directory
  error: type  # the exception expected (always a subclass of one of run.USER_ERRORS)
  says: tuple[str, ...]  # fragments of the message; "{tmp}" is the scratch directory


def load(kind: str, *lines) -> Callable[[Path], Any]:
  """Loads a data file of `kind` records, as every driver does for `config.data.source`."""
  return lambda tmp: data.load_records(jsonl(tmp, *lines), kind)


def sft_config(**overrides) -> Any:
  """A small SFT experiment (tests/helpers/sft.py's sizes) with `--config.a.b=value`-style
  overrides given as a__b=value."""
  c = configs.base_config()
  c.model.update(TINY_MODEL)
  c.train.update(steps=4, batch_size=16, seq_len=64, checkpoint_every=2, async_checkpoint=False)
  c.data.update(source="toy", toy_num_records=60, tokenizer_vocab_size=300)
  c.sample.update(num_examples=0)
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = c
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return c


def run_driver(**overrides) -> Callable[[Path], Any]:
  """Runs the driver of `algorithm` (default sft) on `sft_config(**overrides)` in {tmp}/run, as
  `python -m rlhf_jax.run` does; string values may use "{tmp}"."""

  def provoke(tmp: Path):
    values = {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in overrides.items()}
    config = sft_config(**values)
    return run.resolve_driver(config.algorithm)(config, str(tmp / "run"))

  return provoke


def with_file(make: Callable[[Path], Any], then: Callable[[Path], Any]) -> Callable[[Path], Any]:
  """First `make(tmp)` (write the user's file), then `then(tmp)` (what fails on it)."""
  return lambda tmp: (make(tmp), then(tmp))[1]


def pipeline_config(**stage_overrides) -> Any:
  """The toy pipeline config; keys "stages" or "<stage>__<field>"."""
  c = toy_configs.toy_pipeline_config()
  for key, value in stage_overrides.items():
    if key == "stages":
      c.stages = value
    else:
      stage, field = key.split("__")
      c[stage][field] = value
  return c


def export(tmp: Path, name: str = "export", shape=(4,)) -> Path:
  """A params export of one array {"w": zeros(shape)} with a small metadata dict."""
  return checkpoint.export_params(
      tmp / name, {"w": np.zeros(shape, np.float32)}, metadata={"model": {}, "tokenizer": ""}
  )


def replicated(shape) -> jax.ShapeDtypeStruct:
  mesh = sharding.make_mesh((-1, 1, 1))
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P()))


def resume_with_other_shape(tmp: Path):
  """A run saved a state with w of shape (4,); rerun in the same workdir with w of shape (8,)."""
  with checkpoint.Checkpointer(tmp / "checkpoints", async_save=False) as ckpt:
    ckpt.save(1, {"w": jnp.zeros(4)}, data_state={}, force=True)
    return ckpt.restore({"w": replicated((8,))})


def damage_metadata(tmp: Path) -> str:
  export(tmp)
  (tmp / "export" / "metadata" / "metadata").write_text('{"model": {"vocab_size": 512,\n')
  return str(tmp / "export")


def drop_metadata(tmp: Path) -> str:
  export(tmp)
  shutil.rmtree(tmp / "export" / "metadata")
  return str(tmp / "export")


# A tiny, complete HF checkpoint (config.json, model.safetensors, tokenizer), built once; each HF
# case damages its own copy.
HF_TINY = ModelConfig(
    vocab_size=384, num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64, max_seq_len=64
)


@functools.cache
def _hf_checkpoint() -> Path:
  from rlhf_jax.hf import checkpoints as hf

  root = Path(tempfile.mkdtemp(prefix="bad_inputs_hf_"))
  atexit.register(shutil.rmtree, root, True)
  tokenizer = data.train_tokenizer(
      ["the quick brown fox jumps over the lazy dog"] * 4, 300, root / "tokenizer"
  )
  _, abstract, _ = abstract_model(HF_TINY)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  return hf.export_hf(params, HF_TINY, root / "model", tokenizer=tokenizer)


def hf_checkpoint(
    tmp: Path,
    *,
    drop: tuple[str, ...] = (),
    edit_config: dict | None = None,
    edit_tensors: Callable[[dict], None] | None = None,
) -> Path:
  """A copy of the tiny HF checkpoint in {tmp}/hf: files in `drop` removed, config.json keys
  updated with `edit_config`, the safetensors tensors edited in place by `edit_tensors`."""
  from safetensors.numpy import load_file, save_file

  model_dir = Path(shutil.copytree(_hf_checkpoint(), tmp / "hf"))
  for name in drop:
    (model_dir / name).unlink()
  if edit_config:
    hf_config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**hf_config, **edit_config}))
  if edit_tensors:
    tensors = load_file(model_dir / "model.safetensors")
    edit_tensors(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
  return model_dir


# A pickle that creates the directory {tmp}/pwned when unpickled (`os.mkdir`, protocol 0): the
# refusal must come before anything reads it.
def evil_pickle(tmp: Path) -> bytes:
  return f"cos\nmkdir\n(V{tmp / 'pwned'}\ntR.".encode()


def pickle_only_checkpoint(tmp: Path, weights: str) -> Path:
  model_dir = hf_checkpoint(tmp, drop=("model.safetensors",))
  (model_dir / weights).write_bytes(evil_pickle(tmp))
  return model_dir


def import_hf(tmp: Path, model_dir: Path | str):
  """What `config.hf_model_dir` does at the start of a run: import into {tmp}/run/hf_import."""
  return common.import_hf_model(sft_config(hf_model_dir=str(model_dir)), str(tmp / "run"))


def truncated(path: Path) -> Path:
  """`path` cut to a third of its size, as an interrupted download or copy leaves it."""
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  return path


def truncated_hf(tmp: Path, name: str) -> Path:
  model_dir = hf_checkpoint(tmp)
  truncated(model_dir / name)
  return model_dir


def truncated_export_params(tmp: Path) -> str:
  """An SFT export whose largest params file was cut short, used as init_from."""
  exported = Path(str(export(tmp, shape=(4096,))))
  largest = max(
      (f for f in (exported / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
  )
  truncated(largest)
  return str(exported)


def empty_file(path: Path) -> Path:
  path.write_text("")
  return path


def load_params_into(path: str):
  return checkpoint.load_params(path, {"w": replicated((4096,))})


PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I refuse."}

CASES = [
    # Data records: every message starts with FILE:LINE and names the field.
    Case(
        "jsonl_invalid_json",
        "left a line of the JSONL file cut off (or with a trailing comma)",
        load("sft", SFT, '{"prompt": "Hi", "completion": '),
        RecordError,
        ("{tmp}/data.jsonl:2:", "invalid JSON", "each line must hold one JSON object"),
    ),
    Case(
        "jsonl_not_utf8",
        "saved the data file as Latin-1",
        load("sft", b'{"prompt": "caf\xe9", "completion": "ok"}'),
        RecordError,
        ("{tmp}/data.jsonl:1:", "not UTF-8", "re-encode the file as UTF-8"),
    ),
    Case(
        "missing_field",
        "wrote an SFT record without its completion",
        load("sft", SFT, {"prompt": "Hi"}),
        RecordError,
        ("data.jsonl:2: field 'completion': missing", "needs (prompt, completion) or (messages)"),
    ),
    Case(
        "misspelled_field",
        "misspelled a field name",
        load("sft", {"prompt": "Hi", "completon": "Hello"}),
        RecordError,
        ("data.jsonl:1: field 'completion'", "found 'completon': rename it to 'completion'"),
    ),
    Case(
        "wrong_type",
        "gave a number where text belongs",
        load("sft", {"prompt": 42, "completion": "Hello"}),
        RecordError,
        ("data.jsonl:1: field 'prompt'", "expected a string or a list of chat messages, got 42"),
    ),
    Case(
        "empty_file",
        "pointed at an empty file (or one of blank lines)",
        load("sft", "", "  "),
        RecordError,
        ("{tmp}/data.jsonl: no records found", "one record per line"),
    ),
    Case(
        "empty_prompt",
        "left a prompt blank",
        load("sft", SFT, SFT, {"prompt": "   ", "completion": "4"}),
        RecordError,
        ("data.jsonl:3: field 'prompt': is empty", "fill in the text or remove the record"),
    ),
    Case(
        "empty_response",
        "left the chosen response of a pair empty",
        load("pairwise", {**PAIR, "chosen": ""}),
        RecordError,
        ("data.jsonl:1: field 'chosen': is empty",),
    ),
    Case(
        "chosen_equals_rejected",
        "wrote a pair whose two responses are the same text",
        load("pairwise", {**PAIR, "rejected": " Blue. "}),
        RecordError,
        (
            "data.jsonl:1: field 'rejected': is identical to 'chosen'",
            "needs two different responses",
        ),
    ),
    Case(
        "ranking_one_response",
        "wrote a ranking with a single response",
        load("ranking", {"prompt": "Hi", "responses": ["Hello"]}),
        RecordError,
        ("data.jsonl:1: field 'responses'", "got 1", "needs at least 2 responses"),
    ),
    Case(
        "ranking_duplicates",
        "ranked the same response twice",
        load("ranking", {"prompt": "Hi", "responses": ["Hello", "Hey", "Hello"]}),
        RecordError,
        ("field 'responses'", "responses [0, 2] are identical", "keep one of them"),
    ),
    Case(
        "chat_bad_role",
        "used a role name the chat format does not have",
        load(
            "sft",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
        ),
        RecordError,
        (
            "data.jsonl:1: field 'messages[1].role'",
            "expected one of system, user, assistant",
            "got 'bot'",
        ),
    ),
    Case(
        "chat_ends_with_user",
        "ended an SFT conversation with a user turn",
        load("sft", {"messages": [{"role": "user", "content": "Hi"}]}),
        RecordError,
        ("field 'messages'", "must end with an assistant turn"),
    ),
    Case(
        "both_sft_forms",
        "gave a record both prompt/completion and messages",
        load("sft", {**SFT, "messages": [{"role": "assistant", "content": "4"}]}),
        RecordError,
        ("data.jsonl:1:", "not both; keep one form"),
    ),
    Case(
        "margin_out_of_range",
        "gave a Llama 2 margin outside 0..3",
        load("pairwise", {**PAIR, "margin": 7}),
        RecordError,
        ("field 'margin'", "expected an integer 0..3", "got 7"),
    ),
    Case(
        "kto_label_not_bool",
        "labelled a KTO record with a string",
        load("kto", {**SFT, "label": "yes"}),
        RecordError,
        ("field 'label'", "expected a boolean (JSON true/false)"),
    ),
    Case(
        "bad_record_in_a_run",
        "started an SFT run on a file with a broken record",
        with_file(
            lambda tmp: jsonl(tmp, SFT, {"prompt": "Hi"}),
            run_driver(data__source="{tmp}/data.jsonl", data__tokenizer="unused"),
        ),
        RecordError,
        ("{tmp}/data.jsonl:2: field 'completion': missing",),
    ),
    Case(
        "sft_on_pairwise_data",
        "ran SFT (config.data.kind='sft') on a file of preference pairs",
        with_file(
            lambda tmp: jsonl(tmp, PAIR, PAIR),
            run_driver(data__source="{tmp}/data.jsonl", data__tokenizer="unused"),
        ),
        RecordError,
        (
            "{tmp}/data.jsonl:1: field 'completion': missing",
            "it has the fields of a 'pairwise' record",
            "set config.data.kind='pairwise'",
        ),
    ),
    Case(
        "prompt_longer_than_seq_len",
        "set config.data.prompt_overflow='error' and gave a prompt longer than seq_len on line 3",
        lambda tmp: run_driver(
            data__source=jsonl(
                tmp, SFT, SFT, {"prompt": "the lazy dog " * 40, "completion": "ok"}, *[SFT] * 20
            ),
            data__tokenizer=str(_hf_checkpoint()),
            data__prompt_overflow="error",
        )(tmp),
        RecordError,
        (
            "{tmp}/data.jsonl:3: field 'prompt':",
            ">= config.train.seq_len=64",
            "set config.data.prompt_overflow='truncate_left'",
        ),
    ),
    # Files a run wrote into its workdir, damaged by hand or by the disk.
    Case(
        "workdir_gold_json_damaged",
        "compared methods on a workdir whose eval/gold.json was cut short",
        lambda tmp: (
            (tmp / "run" / "eval").mkdir(parents=True),
            (tmp / "run" / "eval" / "gold.json").write_text('{"sft": {"overall": '),
            compare.method_rows(str(tmp / "run")),
        ),
        DamagedFileError,
        ("{tmp}/run/eval/gold.json is not valid JSON (line 1", "delete it and rerun"),
    ),
    Case(
        "workdir_stage_json_damaged",
        "read a pipeline stage's record (stage.json) holding garbage",
        lambda tmp: (
            (tmp / "run" / "sft").mkdir(parents=True),
            (tmp / "run" / "sft" / "stage.json").write_bytes(b"\x00\xff" * 20),
            compare.read_stage_info(str(tmp / "run"), "sft"),
        ),
        DamagedFileError,
        ("{tmp}/run/sft/stage.json is not UTF-8 text", "delete it and rerun"),
    ),
    Case(
        "workdir_jsonl_damaged",
        "edited a run's metrics.jsonl and broke a line in the middle",
        lambda tmp: metrics.read_jsonl(
            jsonl(tmp, '{"step": 1,', {"step": 2}, name="metrics.jsonl")
        ),
        DamagedFileError,
        ("{tmp}/metrics.jsonl:1: not valid JSON", "delete it and rerun the stage that wrote it"),
    ),
    Case(
        "all_records_held_out",
        "ran SFT on a file so small that the eval split takes every record",
        with_file(
            lambda tmp: jsonl(tmp, SFT),
            run_driver(data__source="{tmp}/data.jsonl", data__tokenizer="{tmp}"),
        ),
        ConfigError,
        ("config.data.eval_fraction=0.05 holds out all 1 records", "config.data.eval_source"),
    ),
    Case(
        "optim_lr_negative",
        "set a negative learning rate",
        run_driver(optim__lr=-1.0),
        ConfigError,
        ("config.optim.lr=-1.0 is out of range: must be a finite number > 0",),
    ),
    Case(
        "log_every_zero",
        "set train.log_every to 0",
        run_driver(train__log_every=0),
        ConfigError,
        ("config.train.log_every=0 is out of range: must be a whole number >= 1",),
    ),
    Case(
        "unknown_data_kind",
        "set config.data.kind to a method name instead of a record kind",
        with_file(
            lambda tmp: jsonl(tmp, PAIR),
            run_driver(data__source="{tmp}/data.jsonl", data__kind="dpo"),
        ),
        ConfigError,
        ("unknown record kind 'dpo' (config.data.kind)", "expected one of text, sft, pairwise"),
    ),
    Case(
        "data_source_missing",
        "pointed config.data.source at a file that does not exist",
        run_driver(data__source="{tmp}/trian.jsonl"),
        ConfigPathError,
        ("{tmp}/trian.jsonl: no such file or directory", "config.data.source"),
    ),
    Case(
        "data_source_file_type",
        "pointed config.data.source at a .txt file",
        with_file(
            lambda tmp: (tmp / "data.txt").write_text("hello"),
            run_driver(data__source="{tmp}/data.txt"),
        ),
        ConfigError,
        ("{tmp}/data.txt: unsupported file type '.txt'", "use .jsonl, .json, .csv, .parquet"),
    ),
    Case(
        "no_tokenizer_for_own_data",
        "trained on their own data without naming a tokenizer",
        with_file(lambda tmp: jsonl(tmp, SFT, SFT), run_driver(data__source="{tmp}/data.jsonl")),
        ConfigError,
        ("config.data.tokenizer is empty", "give a tokenizer directory"),
    ),
    Case(
        "tokenizer_dir_missing",
        "pointed config.data.tokenizer at a directory without one",
        with_file(
            lambda tmp: jsonl(tmp, SFT, SFT),
            run_driver(data__source="{tmp}/data.jsonl", data__tokenizer="{tmp}"),
        ),
        ConfigPathError,
        ("{tmp}: no tokenizer.json or tokenizer_config.json", "point config.data.tokenizer at"),
    ),
    # Configs: the message names the config key and the value to use.
    Case(
        "unknown_algorithm",
        "misspelled config.algorithm",
        lambda tmp: run.resolve_driver("dpoo"),
        ConfigError,
        ("config.algorithm='dpoo' is not known (did you mean 'dpo'?)", "set it to one of"),
    ),
    Case(
        "accum_not_dividing_batch",
        "set train.accum_steps to a number that does not divide " "train.batch_size",
        run_driver(train__accum_steps=3),
        ConfigError,
        (
            "config.train.batch_size=16 is not divisible by config.train.accum_steps=3",
            "set accum_steps to a divisor of batch_size",
        ),
    ),
    Case(
        "batch_not_dividing_mesh",
        "chose a batch that the 8 data-parallel devices cannot split",
        run_driver(train__batch_size=12),
        ShardingConfigError,
        (
            "batch size 12 is not divisible by the 8 devices",
            "set config.train.batch_size / config.train.accum_steps",
            "multiple of 8",
        ),
    ),
    Case(
        "unknown_optimizer",
        "asked for an optimiser that does not exist",
        lambda tmp: make_optimizer(sft_config(optim__name="adam").optim, 10),
        ConfigError,
        ("config.optim.name='adam'", "use 'adamw' or 'sgd'"),
    ),
    Case(
        "unknown_schedule",
        "misspelled the learning-rate schedule",
        lambda tmp: make_optimizer(sft_config(optim__schedule="cosin").optim, 10),
        ConfigError,
        ("config.optim.schedule='cosin'", "use 'cosine', 'linear' or 'constant'"),
    ),
    Case(
        "dpo_unknown_loss_type",
        "named a DPO loss that does not exist",
        lambda tmp: dpo.check_loss_config(sft_config(dpo__loss_type="dpo").dpo),
        ConfigError,
        ("config.dpo.loss_type='dpo'", "choose one of cpl, hinge, ipo, orpo, sigmoid, simpo"),
    ),
    Case(
        "dpo_without_init_from",
        "started DPO without a policy export to start from",
        run_driver(algorithm="dpo", data__kind="pairwise"),
        ConfigError,
        ("config.init_from is empty: DPO starts from a policy export",),
    ),
    Case(
        "kto_on_sft_records",
        "ran KTO on SFT records",
        run_driver(algorithm="kto"),
        ConfigError,
        ("config.data.kind='sft': KTO trains on 'kto' records",),
    ),
    Case(
        "margins_on_rankings",
        "asked for Llama 2 margins on ranking data",
        run_driver(algorithm="reward", data__kind="ranking", reward__margins="small"),
        ConfigError,
        ("config.reward.margins applies to pairwise data", "set config.reward.margins='none'"),
    ),
    Case(
        "unknown_prompt_overflow",
        "set data.prompt_overflow to a policy that does not exist",
        lambda tmp: data.tokenize_sft([SFT], None, max_len=64, prompt_overflow="truncate"),
        ConfigError,
        (
            "prompt_overflow='truncate'",
            "expected one of 'skip', 'error'",
            "config.data.prompt_overflow",
        ),
    ),
    Case(
        "seq_len_below_every_prompt",
        "set train.seq_len shorter than every prompt",
        run_driver(train__seq_len=8),
        ConfigError,
        (
            "no training example fits config.train.seq_len=8 tokens",
            "raise config.train.seq_len",
            "prompt_overflow='truncate_left'",
        ),
    ),
    Case(
        "model_vocab_too_small",
        "set model.vocab_size below the tokenizer's size",
        lambda tmp: common.model_config(sft_config(model__vocab_size=128), vocab_size=300),
        ConfigError,
        (
            "the tokenizer has 300 tokens but config.model.vocab_size = 128",
            "raise config.model.vocab_size (or set it to 0 = auto)",
        ),
    ),
    Case(
        "gpt2_seq_len_beyond_positions",
        "trained a GPT-2 model on sequences longer than its learned positions",
        lambda tmp: common.model_config(
            sft_config(model__family="gpt2", model__max_seq_len=32, train__seq_len=64),
            vocab_size=300,
        ),
        ConfigError,
        (
            "config.train.seq_len=64 exceeds the model's max_seq_len=32",
            "lower config.train.seq_len",
        ),
    ),
    Case(
        "heads_not_dividing_embed",
        "chose num_heads that does not divide embed_dim",
        lambda tmp: common.model_config(
            sft_config(model__num_heads=3, model__num_kv_heads=3), vocab_size=300
        ),
        ConfigError,
        (
            "config.model:",
            "embed_dim=64 is not divisible by num_heads=3",
            "change those config.model fields",
        ),
    ),
    Case(
        "init_from_not_an_export",
        "pointed config.init_from at a directory that is not an "
        "export (a run's workdir instead of its export/)",
        run_driver(init_from="{tmp}"),
        ConfigPathError,
        (
            "{tmp} is not a params export (no metadata/metadata)",
            "point config.init_from at a run's WORKDIR/export",
        ),
    ),
    Case(
        "hf_model_dir_missing",
        "set config.hf_model_dir to a directory that holds no checkpoint",
        lambda tmp: import_hf(tmp, tmp),
        ConfigPathError,
        (
            "config.hf_model_dir=",
            "is not a local HF checkpoint directory (no config.json)",
            "hf download",
        ),
    ),
    Case(
        "unknown_pipeline_stage",
        "misspelled a stage in config.stages",
        lambda tmp: pipeline.training_stages(pipeline_config(stages=("world", "pretrian", "sft"))),
        ConfigError,
        (
            "config.stages names 'pretrian'",
            "is not an experiment config",
            "(did you mean 'pretrain'?)",
        ),
    ),
    Case(
        "pipeline_stage_algorithm",
        "gave a pipeline stage an algorithm no driver runs",
        lambda tmp: pipeline.training_stages(pipeline_config(sft__algorithm="sfft")),
        ConfigError,
        ("config.sft.algorithm='sfft'", "a pipeline stage runs one of"),
    ),
    Case(
        "pipeline_init_from_unknown",
        "made a stage start from a stage that does not exist",
        lambda tmp: pipeline.parent_stage(pipeline_config(sft__init_from="pretrian"), "sft", None),
        ConfigError,
        ("config.sft.init_from='pretrian' names no stage of config.stages",),
    ),
    # Exports and checkpoints.
    Case(
        "export_without_metadata",
        "copied an export without its metadata/ directory",
        lambda tmp: checkpoint.read_export_metadata(drop_metadata(tmp)),
        ConfigPathError,
        ("{tmp}/export is not a params export (no metadata/metadata)", "config.init_from"),
    ),
    Case(
        "export_metadata_corrupt",
        "used an export whose metadata file was cut off",
        lambda tmp: checkpoint.read_export_metadata(damage_metadata(tmp)),
        ConfigError,
        ("{tmp}/export/metadata/metadata:2:", "not valid JSON", "export it again"),
    ),
    Case(
        "export_shape_mismatch",
        "loaded an export into a model of another size",
        lambda tmp: checkpoint.load_params(export(tmp), {"w": replicated((8,))}),
        ConfigError,
        (
            "{tmp}/export does not match",
            "w has shape (4,) in the export but (8,) in the model",
            "re-export it",
        ),
    ),
    Case(
        "resume_with_another_model",
        "reran a workdir with a config whose model differs",
        resume_with_other_shape,
        ConfigError,
        (
            "{tmp}/checkpoints/1 was saved by a run with another model or optimiser config",
            "in the checkpoint but",  # names the first array whose shape differs
            "use a new --workdir",
        ),
    ),
    # Hugging Face checkpoint directories: safetensors only; the message names the file / tensor.
    # Files cut short or garbled (an interrupted download or copy): one line naming the file.
    Case(
        "hf_config_json_truncated",
        "a download of config.json was cut short",
        lambda tmp: import_hf(tmp, truncated_hf(tmp, "config.json")),
        ConfigError,
        ("{tmp}/hf/config.json", "not valid JSON"),
    ),
    Case(
        "hf_safetensors_truncated",
        "a download of model.safetensors was cut short",
        lambda tmp: import_hf(tmp, truncated_hf(tmp, "model.safetensors")),
        ConfigError,
        ("{tmp}/hf/model.safetensors", "download it again"),
    ),
    Case(
        "hf_tokenizer_json_truncated",
        "a download of tokenizer.json was cut short",
        lambda tmp: data.load_tokenizer(truncated_hf(tmp, "tokenizer.json")),
        ConfigError,
        ("{tmp}/hf/tokenizer.json is not valid JSON (line", "copy the tokenizer's files again"),
    ),
    Case(
        "export_params_truncated",
        "used an export whose params file was cut short as init_from",
        lambda tmp: load_params_into(truncated_export_params(tmp)),
        ConfigError,
        ("params export {tmp}/export", "cannot be read", "export it again"),
    ),
    Case(
        "empty_json_data_file",
        "pointed config.data.source at an empty .json file",
        lambda tmp: data.load_records(empty_file(tmp / "data.json"), "sft"),
        RecordError,
        ("{tmp}/data.json: no records found (the file is empty)",),
    ),
    Case(
        "data_source_is_a_directory",
        "pointed config.data.source at a directory",
        lambda tmp: data.load_records((tmp / "data.jsonl").mkdir() or tmp / "data.jsonl", "sft"),
        ConfigError,
        ("{tmp}/data.jsonl", "is a directory"),
    ),
    Case(
        "hf_no_config_json",
        "downloaded the weights but not config.json",
        lambda tmp: import_hf(tmp, hf_checkpoint(tmp, drop=("config.json",))),
        ConfigPathError,
        ("is not a local HF checkpoint directory (no config.json)", "hf download"),
    ),
    Case(
        "hf_unsupported_model_type",
        "pointed at a model type we do not implement",
        lambda tmp: import_hf(tmp, hf_checkpoint(tmp, edit_config={"model_type": "bert"})),
        ConfigError,
        (
            "{tmp}/hf/config.json: HF model_type 'bert' is not supported",
            "supported model types: ['gpt2', 'llama'",
        ),
    ),
    Case(
        "hf_missing_tensor",
        "used a checkpoint with a tensor missing from its safetensors",
        lambda tmp: import_hf(
            tmp,
            hf_checkpoint(
                tmp, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.q_proj.weight")
            ),
        ),
        ConfigError,
        (
            "{tmp}/hf: missing tensor(s) ['model.layers.1.self_attn.q_proj.weight']",
            "expected shape [32, 32]",
            "download the checkpoint again",
        ),
    ),
    Case(
        "hf_tensor_shape",
        "used a checkpoint whose config.json does not match its weights",
        lambda tmp: import_hf(tmp, hf_checkpoint(tmp, edit_config={"intermediate_size": 96})),
        ConfigError,
        (
            "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], expected " "[96, 32]",
            "config.json and the weights disagree",
        ),
    ),
    Case(
        "hf_pickle_weights_only",
        "downloaded only pytorch_model.bin (a pickle)",
        lambda tmp: import_hf(tmp, pickle_only_checkpoint(tmp, "pytorch_model.bin")),
        ConfigError,
        (
            "only PyTorch pickle weights (pytorch_model.bin)",
            "unpickling can run arbitrary code",
            "safe_serialization=True",
        ),
    ),
    Case(
        "hf_pt_weights_only",
        "downloaded only a .pt file",
        lambda tmp: import_hf(tmp, pickle_only_checkpoint(tmp, "model.pt")),
        ConfigError,
        ("only PyTorch pickle weights (model.pt)", "Convert them to safetensors"),
    ),
    Case(
        "hf_tokenizer_larger_than_vocab",
        "put a tokenizer with more tokens than the model's " "vocabulary next to the weights",
        lambda tmp: import_hf(tmp, hf_checkpoint(tmp, edit_config={"vocab_size": 128})),
        ConfigError,
        (
            "{tmp}/hf: the tokenizer has",
            "config.json vocab_size is 128",
            "use the tokenizer the checkpoint was trained with",
        ),
    ),
    # Meshes (8 fake CPU devices here).
    Case(
        "mesh_product_mismatch",
        "asked for a mesh of 4 devices on 8",
        run_driver(mesh__shape=(2, 2, 1)),
        ShardingConfigError,
        (
            "mesh shape (2, 2, 1) has 4 devices but 8 are available",
            "change config.mesh.shape",
            "data * fsdp * tensor = 8",
        ),
    ),
    Case(
        "mesh_fixed_axes_not_dividing",
        "fixed a mesh axis that does not divide the devices",
        lambda tmp: sharding.make_mesh((3, -1, 1)),
        ShardingConfigError,
        (
            "the fixed axes multiply to 3, which does not divide the 8 devices",
            "change config.mesh.shape",
        ),
    ),
    Case(
        "mesh_two_axes",
        "gave config.mesh.shape two entries",
        lambda tmp: sharding.make_mesh((8, 1)),
        ShardingConfigError,
        ("must have 3 entries (data, fsdp, tensor)", "set config.mesh.shape"),
    ),
    Case(
        "heads_not_dividing_tensor_axis",
        "sharded 6 heads over a tensor axis of 4",
        lambda tmp: sharding.validate_model_mesh(
            ModelConfig(num_heads=6, embed_dim=96, mlp_dim=128, vocab_size=512),
            sharding.make_mesh((2, 1, 4)),
        ),
        ShardingConfigError,
        ("mesh tensor axis = 4 does not divide model num_heads = 6", "set config.mesh.shape"),
    ),
]


def test_the_suite_is_large_and_its_ids_unique():
  assert len(CASES) >= 30
  assert len({case.id for case in CASES}) == len(CASES)
  assert all(issubclass(case.error, run.USER_ERRORS) for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_a_user_error_that_says_what_to_fix(case, tmp_path):
  with pytest.raises(run.USER_ERRORS) as info:
    case.provoke(tmp_path)
  assert isinstance(info.value, case.error), (type(info.value), info.value)
  message = str(info.value)
  for fragment in case.says:
    assert fragment.format(tmp=tmp_path) in message, (fragment, message)
  assert "\n" not in message.strip(), message  # one paragraph
  assert_nothing_half_written(tmp_path)
  assert not (tmp_path / "pwned").exists()  # no pickle was loaded


# --- safe loading: safetensors and orbax only -----------------------------------------------------

# Modules that deserialise by running code, and the calls that do.
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
UNSAFE_CALLS = {"torch.load", "pickle.load", "pickle.loads", "pd.read_pickle", "pandas.read_pickle"}
# Safe unless this keyword is set to something other than a literal False.
UNSAFE_KEYWORDS = {"allow_pickle", "trust_remote_code"}


def unsafe_loading(tree: ast.AST) -> list[str]:
  """'line: what' for every import of a pickle-like module, call of a pickle loader, and
  `allow_pickle=` / `trust_remote_code=` that is not the literal False."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
      found += [f"{node.lineno}: import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.Call):
      if ast.unparse(node.func) in UNSAFE_CALLS:
        found.append(f"{node.lineno}: {ast.unparse(node.func)}(...)")
      for k in node.keywords:
        if k.arg in UNSAFE_KEYWORDS and not (
            isinstance(k.value, ast.Constant) and k.value.value is False
        ):
          found.append(f"{node.lineno}: {k.arg}={ast.unparse(k.value)}")
  return found


def test_no_source_file_can_unpickle_or_run_remote_code():
  found = {}
  for path in sorted((ROOT / "rlhf_jax").rglob("*.py")):
    hits = unsafe_loading(ast.parse(path.read_text(), str(path)))
    if hits:
      found[str(path.relative_to(ROOT))] = hits
  assert not found, f"unsafe deserialisation (use safetensors / orbax / JSON): {found}"


def test_the_scan_catches_what_it_should():
  code = (
      "import pickle\nfrom joblib import load\nimport torch\nx = torch.load('m.bin')\n"
      "y = np.load('a.npy', allow_pickle=True)\nz = np.load('b.npy')\n"
      "t = AutoTokenizer.from_pretrained(d, trust_remote_code=True)\n"
      "u = AutoTokenizer.from_pretrained(d, trust_remote_code=False)\n"
  )
  assert sorted(unsafe_loading(ast.parse(code))) == [
      "1: import pickle",
      "2: import joblib",
      "4: torch.load(...)",
      "5: allow_pickle=True",
      "7: trust_remote_code=True",
  ]
