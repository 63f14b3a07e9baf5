"""What every driver shares: mesh + model + state set-up, and the train loop with its side effects
(checkpoints, metrics, progress, resume). Methods differ only in their loss_fn and their data."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import generate, sharding
from rlhf_jax.configs.ranges import check_ranges
from rlhf_jax.errors import ConfigError, ConfigPathError
from rlhf_jax.evaluation.gold import Policy
from rlhf_jax.models import ModelConfig, abstract_model, create_model, lora, split_model
from rlhf_jax.models.config import LORA_FIELDS
from rlhf_jax.train import (
    TrainState,
    check_nonfinite,
    checkpoint,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    metrics,
    preemption,
    state_shardings,
)

_log = logging.getLogger(__name__)


def model_config(
    config: ml_collections.ConfigDict, vocab_size: int | None = None, head: str | None = None
) -> ModelConfig:
  """ModelConfig from `config.model`, or from the export metadata when `config.init_from` is set
  (the architecture is the checkpoint's; `config.model.dtype`/`param_dtype`/`remat`/`scan_layers`
  still apply). vocab_size 0 in the config = the tokenizer's, rounded up to a multiple of 128 so
  tensor parallelism and matmul tiles divide it. `head` ("lm" | "scalar") overrides both: a reward
  model is an SFT export with its LM head replaced (`setup_training` swaps the params).
  `config.lora.rank` > 0 adds LoRA adapters (rank, alpha, targets) to the model, whatever the
  export's: an export with unmerged adapters is merged when it is loaded (`initial_params`)."""
  d = config.model.to_dict()
  if config.init_from:
    saved = checkpoint.read_export_metadata(config.init_from)["model"]
    runtime = ("dtype", "param_dtype", "remat", "scan_layers", "scalar_head_init_std")
    d = {
        **{k: v for k, v in saved.items() if k not in LORA_FIELDS},
        **{k: d[k] for k in runtime if k in d},
    }
  lora_cfg = config.get("lora")
  if lora_cfg is not None and lora_cfg.rank:
    d.update(
        lora_rank=lora_cfg.rank,
        lora_alpha=float(lora_cfg.alpha),
        lora_targets=tuple(lora_cfg.targets),
    )
  if head is not None:
    d["head"] = head
  if not d.get("vocab_size"):
    if vocab_size is None:
      raise ConfigError(
          "config.model.vocab_size is 0 (auto) but no tokenizer size is known; set "
          "config.model.vocab_size"
      )
    d["vocab_size"] = -(-vocab_size // 128) * 128
  elif vocab_size is not None and d["vocab_size"] < vocab_size:
    if config.init_from:  # the architecture is the export's: the tokenizer is what to change
      raise ConfigError(
          f"the tokenizer (config.data.tokenizer={config.data.tokenizer!r}) has "
          f"{vocab_size} tokens but the model of config.init_from={config.init_from!r} "
          f"has vocab_size {d['vocab_size']}; use the tokenizer that came with it"
      )
    raise ConfigError(
        f"the tokenizer has {vocab_size} tokens but config.model.vocab_size = "
        f"{d['vocab_size']}; raise config.model.vocab_size (or set it to 0 = auto)"
    )
  try:
    model_cfg = ModelConfig.from_dict(d)
  except ValueError as e:
    if "lora_" in str(e):
      raise ConfigError(
          f"{e} (lora_rank, lora_alpha, lora_targets are config.lora.rank, alpha, " "targets)"
      ) from None
    raise ConfigError(f"config.model: {e}; change those config.model fields") from None
  seq_len = config.train.seq_len if "train" in config else 0
  if model_cfg.family == "gpt2" and seq_len > model_cfg.max_seq_len:
    # Learned positions past the table would be gathered out of range (NaN), not an error.
    source = f"config.init_from={config.init_from!r}" if config.init_from else "config.model"
    raise ConfigError(
        f"config.train.seq_len={seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}"
        f" ({source}: GPT-2 family models have learned positions up to it); lower "
        "config.train.seq_len"
    )
  return model_cfg


@dataclasses.dataclass
class Setup:
  """A mesh-placed model and train state, and the jitted step."""

  mesh: Any
  model_cfg: ModelConfig
  graphdef: Any
  param_shardings: Any
  shardings: TrainState
  state: TrainState
  step: Callable
  schedule: Callable


def start_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    write: bool = True,
    train_batch: bool = True,
    devices=None,
):
  """The opening every driver shares; returns the mesh. Checks WORKDIR can be written, joins the
  other hosts (multi-host), writes WORKDIR/config.json with its inputs resolved (`write_config`;
  write=False where an inner SFT run writes its own) and makes the mesh, checked against
  `config.train`'s batch (`make_mesh`; train_batch=False where the driver's batches are not
  `config.train.batch_size` rows). Every numeric field is range-checked first (`check_ranges`).
  devices: () -> the devices the mesh spans (default all), called after the hosts joined."""
  check_ranges(config)
  checkpoint.check_workdir_writable(workdir)
  sharding.maybe_initialize_distributed()
  if write:
    write_config(config, workdir)
  if devices is not None:
    return sharding.make_mesh(config.mesh.shape, devices())
  return make_mesh(config) if train_batch else sharding.make_mesh(config.mesh.shape)


def batch_iterators(config: ml_collections.ConfigDict, train: list, held_out: list, batching):
  """(training batches, eval batches) of `config.train.batch_size` rows of `seq_len` in the
  `batching` layout: training shuffled (seed `config.seed`) and packed if `config.data.packing`;
  eval in order, unpacked, the same every time."""
  from rlhf_jax import data  # as in resolve_inputs: the drivers import it anyway

  t = config.train
  batches = data.BatchIterator(
      train,
      batch_size=t.batch_size,
      seq_len=t.seq_len,
      seed=config.seed,
      packing=config.data.packing,
      batching=batching,
  )
  eval_iter = data.BatchIterator(
      held_out,
      batch_size=t.batch_size,
      seq_len=t.seq_len,
      seed=0,
      packing=False,
      shuffle=False,
      batching=batching,
  )
  return batches, eval_iter


def make_mesh(config: ml_collections.ConfigDict):
  """The mesh, checked against the batch settings: call first, so a bad config fails at once."""
  mesh = sharding.make_mesh(config.mesh.shape)
  t = config.train
  if t.accum_steps < 1 or t.batch_size % t.accum_steps:
    raise ConfigError(
        f"config.train.batch_size={t.batch_size} is not divisible by "
        f"config.train.accum_steps={t.accum_steps}; set accum_steps to a divisor of "
        "batch_size (1 = no accumulation)"
    )
  sharding.check_batch_size(t.batch_size // t.accum_steps, mesh)
  return mesh


def setup_training(
    config: ml_collections.ConfigDict,
    mesh,
    model_cfg: ModelConfig,
    make_loss_fn: Callable[[Any], Callable],
    extra_params: Callable[[], tuple[dict, dict]] | None = None,
) -> Setup:
  """Params (random or `config.init_from`), optimiser, sharded TrainState and jitted step.

  extra_params: () -> (params, their shardings) trained beside the model's, under their own
  top-level names (e.g. the LM head a regularised reward model keeps); the loss receives them in
  its params dict and must split them off before applying the model."""
  sharding.validate_model_mesh(model_cfg, mesh)
  graphdef, abstract, axes = abstract_model(model_cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  params = initial_params(config, model_cfg, mesh, psh)
  if extra_params is not None:
    extra, extra_sh = extra_params()
    if set(extra) & set(params):
      raise ValueError(f"extra params {sorted(set(extra) & set(params))} clash with the model's")
    params, psh = {**params, **extra}, {**psh, **extra_sh}
    abstract = {**abstract, **jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), extra)}
  loss_fn, trainable = make_loss_fn(graphdef), None
  if model_cfg.lora_rank:  # only the adapters train (and have optimiser state)
    loss_fn, trainable = lora.freeze_base(loss_fn), lora.trainable_mask
  optimizer, schedule = make_optimizer(config.optim, config.train.steps, trainable=trainable)
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  state = create_train_state(params, optimizer, shardings, seed=config.seed)
  step = make_train_step(
      loss_fn,
      optimizer,
      mesh=mesh,
      state_shardings=shardings,
      accum_steps=config.train.accum_steps,
      schedule=schedule,
  )
  return Setup(mesh, model_cfg, graphdef, psh, shardings, state, step, schedule)


def initial_params(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh, psh) -> dict:
  """Random params (seed `config.seed`), or `config.init_from`'s restored into the shardings `psh`.

  An export whose head differs from `model_cfg.head` (an LM export under a reward or value model)
  keeps its backbone; the new head is initialised as `create_model` would (scalar head: N(0,
  scalar_head_init_std)) and the old head's params are dropped. An export with LoRA adapters is
  merged into a plain model; `model_cfg`'s adapters (if any) are then added fresh (B = 0).
  """
  fresh = lambda names: jax.jit(
      lambda: {
          k: v
          for k, v in split_model(create_model(model_cfg, config.seed))[1].items()
          if k in names
      },  # jit drops the init of every param not returned
      out_shardings={k: psh[k] for k in names},
  )()
  if not config.init_from:
    return fresh(set(psh))
  saved_cfg = ModelConfig.from_dict(checkpoint.read_export_metadata(config.init_from)["model"])
  load_cfg = dataclasses.replace(
      model_cfg, head=saved_cfg.head, **{f: getattr(saved_cfg, f) for f in LORA_FIELDS}
  )
  _, abstract, axes = abstract_model(load_cfg)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      sharding.param_shardings(abstract, axes, mesh),
  )
  params, _ = checkpoint.load_params(config.init_from, target)
  params, _ = lora.merge_lora(params, load_cfg)  # unchanged unless the export has adapters
  new = set(psh) - set(params)
  if new or set(params) - set(psh):
    _log.info(
        "init_from %s (head %s -> %s): new params %s, dropped %s",
        config.init_from,
        saved_cfg.head,
        model_cfg.head,
        sorted(new),
        sorted(set(params) - set(psh)),
    )
    params = {**{k: v for k, v in params.items() if k in psh}, **(fresh(new) if new else {})}
  else:
    _log.info("initialised params from %s", config.init_from)
  if model_cfg.lora_rank:
    params = lora.with_adapters(params, model_cfg, config.seed, psh)
  return params


def export_model(
    config: ml_collections.ConfigDict, export_dir: str, params, model_cfg: ModelConfig, **metadata
) -> None:
  """`checkpoint.export_params` (overwriting) with metadata {"model": model_cfg, **metadata}. A
  LoRA model is merged into a plain one first (`config.lora.merge_on_export`, the default), which
  is what later stages, `load_policy` and `hf.export_hf` expect."""
  lora_cfg = config.get("lora")
  if model_cfg.lora_rank and (lora_cfg is None or lora_cfg.merge_on_export):
    params, model_cfg = lora.merge_lora(params, model_cfg)
  checkpoint.export_params(
      export_dir, params, overwrite=True, metadata={"model": model_cfg.to_dict(), **metadata}
  )


def make_evaluate(
    loss_fn: Callable, setup: Setup, host_batches: Iterator[dict], num_batches: int
) -> Callable[[TrainState], dict]:
  """evaluate(state) -> the loss_fn's metrics over `num_batches` fixed batches, combined by each
  batch's `loss_weight` (as the train step combines micro-batches)."""
  eval_step = make_eval_step(loss_fn, mesh=setup.mesh, param_shardings=setup.param_shardings)
  batches = [sharding.put_batch(next(host_batches), setup.mesh) for _ in range(num_batches)]

  def evaluate(state: TrainState) -> dict:
    results = [jax.device_get(eval_step(state.params, b, jax.random.key(0))) for b in batches]
    weights = np.array([r["loss_weight"] for r in results])
    return {
        k: float(np.sum([r[k] for r in results] * weights) / weights.sum())
        for k in results[0]
        if k != "loss_weight"
    }

  return evaluate


def load_policy(export_dir: str, mesh) -> Policy:
  """A policy export restored into its shardings on `mesh`, with a Sampler for it."""
  meta = checkpoint.read_export_metadata(export_dir)
  model_cfg = ModelConfig.from_dict(meta["model"])
  graphdef, abstract, axes = abstract_model(model_cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, psh
  )
  params, _ = checkpoint.load_params(export_dir, target)
  sampler = generate.Sampler(graphdef, model_cfg, mesh=mesh, param_shardings=psh)
  return Policy(graphdef, params, sampler)


# Drivers that read `config.data.source` as prompt records (PPO's family), not `data.kind` records.
PROMPT_ALGORITHMS = ("ppo", "grpo", "rloo")


def import_hf_model(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.hf_model_dir` imported as a params export in WORKDIR/hf_import (with its tokenizer,
  pad token ensured, in hf_import/tokenizer), in `config.model.param_dtype`, sharded on the
  config's mesh while it loads. Idempotent: an import of the same directory in the same dtype is
  reused (a resumed run does not convert the checkpoint again)."""
  from rlhf_jax.hf import (
      checkpoints as hf,  # imports safetensors and transformers' tokenizers: only when needed
  )

  model_dir = os.path.abspath(config.hf_model_dir)
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise ConfigPathError(
        f"config.hf_model_dir={config.hf_model_dir!r} is not a local HF "
        "checkpoint directory (no config.json); download one, e.g. `hf download "
        "meta-llama/Llama-3.2-1B-Instruct --local-dir models/Llama-3.2-1B-Instruct`"
    )
  export_dir = os.path.abspath(os.path.join(workdir, "hf_import"))
  param_dtype = config.model.param_dtype
  try:
    meta = checkpoint.read_export_metadata(export_dir)
    if (
        meta.get("hf_source") == model_dir
        and meta["model"]["param_dtype"] == param_dtype
        and os.path.isdir(meta["tokenizer"])
    ):  # the tokenizer is written after the params
      return export_dir
  except (FileNotFoundError, ValueError):
    pass
  _log.info("importing %s into %s (%s params)", model_dir, export_dir, param_dtype)
  hf.import_hf(
      model_dir,
      export_dir,
      mesh=sharding.make_mesh(config.mesh.shape),
      param_dtype=param_dtype,
      overwrite=True,
  )
  return export_dir


def _fitting_prompts(config: ml_collections.ConfigDict):
  """keep(records) for PPO's prompts: those whose encoded prompt fits `config.ppo.max_prompt_len`
  (the rollout refuses a longer one); the rest are dropped and counted."""
  from rlhf_jax import data

  limit = config.ppo.max_prompt_len
  tokenizer_dir = config.data.tokenizer or checkpoint.read_export_metadata(config.init_from).get(
      "tokenizer"
  )

  def keep(records: list) -> list:
    tokenizer = data.load_tokenizer(tokenizer_dir)
    kept = [r for r in records if len(data.encode_prompt(tokenizer, r["prompt"])) <= limit]
    if len(kept) < len(records):
      _log.warning(
          "dropped %d of %d prompts longer than config.ppo.max_prompt_len=%d tokens",
          len(records) - len(kept),
          len(records),
          limit,
      )
    if not kept:
      raise ConfigError(
          f"no prompt of config.data.source={config.data.source!r} fits "
          f"config.ppo.max_prompt_len={limit}; raise it"
      )
    return kept

  return keep, f"max_prompt_len={limit},tokenizer={tokenizer_dir}"


def resolve_inputs(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Turns what the config names by reference into what the drivers read, in place; a no-op for a
  config without `hf_model_dir`, `data.schema` or a hub data-set name (today's configs).

  - `config.hf_model_dir` set and `config.init_from` empty: the checkpoint is imported
    (`import_hf_model`) and becomes `init_from`; an empty `data.tokenizer` becomes its tokenizer.
  - `config.data.source` (and `eval_source`, except for PPO's family, whose eval source is toy-world
    tasks) in a public schema (`data.schema`) or named on the hub: converted once into
    WORKDIR/data/{train,eval}.jsonl (`data.sources.resolve_source`; PPO's family: prompt records
    that fit `ppo.max_prompt_len`); `data.schema`, `split` and `eval_split` are cleared, so the
    config says what the driver reads (and resolving it again changes nothing).
  """
  from rlhf_jax.data import sources

  if config.get("hf_model_dir") and not config.init_from:
    config.init_from = import_hf_model(config, workdir)
    if not config.data.tokenizer:
      config.data.tokenizer = checkpoint.read_export_metadata(config.init_from)["tokenizer"]
  d = config.data
  schema = d.get("schema", "")
  prompts = config.algorithm in PROMPT_ALGORITHMS
  kind = sources.PROMPT_KIND if prompts else d.kind
  wanted = [("source", d.split, "train")]
  if not prompts and d.eval_source:
    wanted.append(("eval_source", d.get("eval_split", "") or d.split, "eval"))
  if not any(sources.needs_resolving(d[field], schema) for field, _, _ in wanted):
    return
  resolved = {}  # both or neither: data.split is cleared for both
  for field, split, name in wanted:
    out_path = os.path.abspath(os.path.join(workdir, "data", f"{name}.jsonl"))
    if jax.process_index() == 0:  # one writer; the other hosts read it after the barrier
      keep, tag = _fitting_prompts(config) if prompts else (None, "")
      sources.resolve_source(
          d[field], kind, out_path, schema=schema, split=split, keep=keep, keep_tag=tag, force=True
      )
    resolved[field] = out_path
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("resolve_inputs")
  d.update(schema="", split="", eval_split="", **resolved)  # now our own records, as read


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Resolves the config's references (`resolve_inputs`), then writes it to WORKDIR/config.json."""
  resolve_inputs(config, workdir)
  metrics.write_json(config.to_dict(), os.path.join(workdir, "config.json"), indent=2)


@dataclasses.dataclass
class Run:
  """An open training run (`checkpointed`): its checkpointer, metrics writer and SIGTERM handler,
  the state restored from the latest checkpoint (or the one given), and the data state saved with
  that checkpoint (None on a fresh start)."""

  ckpt: checkpoint.Checkpointer
  writer: metrics.MetricsWriter
  stop: preemption.StopSignal
  state: TrainState
  saved: dict | None


@contextlib.contextmanager
def checkpointed(
    config: ml_collections.ConfigDict, workdir: str, state: TrainState, shardings, *, export
) -> Iterator[Run]:
  """Opens what every training loop shares: checks the disk has room for the checkpoints and the
  export (`export`: the params that will be exported), opens WORKDIR/checkpoints
  (`config.train.checkpoint_every`, `keep_checkpoints`, `async_checkpoint`), WORKDIR/metrics.jsonl
  + tb, and the SIGTERM handler, and restores the newest checkpoint that reads back intact, if
  there is one (`Checkpointer.restore`)."""
  t = config.train
  checkpoint.check_free_space(workdir, state, keep=t.keep_checkpoints, export=export)
  with (
      checkpoint.Checkpointer(
          os.path.join(workdir, "checkpoints"),
          keep=t.keep_checkpoints,
          save_interval_steps=t.checkpoint_every,
          async_save=t.async_checkpoint,
      ) as ckpt,
      metrics.MetricsWriter(workdir) as writer,
      preemption.StopSignal() as stop,
  ):
    saved = None
    if ckpt.latest_step() is not None:
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
      )
      # The newest step that reads back intact; unreadable or changed newer ones are set aside.
      state, saved = ckpt.restore(abstract)
      _log.info("resumed from step %d", ckpt.latest_step())
    yield Run(ckpt, writer, stop, state, saved)


def train_loop(
    config: ml_collections.ConfigDict,
    workdir: str,
    setup: Setup,
    batches: Iterator[dict],
    *,
    data_state: Callable[[], dict],
    restore_data: Callable[[dict], None],
    evaluate: Callable[[TrainState], dict] | None = None,
    count_tokens: Callable[[dict], int] | None = None,
) -> TrainState:
  """Runs `setup.step` over `batches` to `config.train.steps`, resuming from the latest checkpoint.

  Side effects: WORKDIR/checkpoints (every `checkpoint_every` steps, at the end, and after the step
  in flight when SIGTERM arrives: then `preemption.Preempted` is raised),
  WORKDIR/metrics.jsonl + WORKDIR/tb (train metrics every `log_every`, eval every `eval_every`),
  a progress bar. `stop_after_steps` > 0 ends this invocation early (the next one resumes).
  """
  t = config.train
  with checkpointed(
      config, workdir, setup.state, setup.shardings, export=setup.state.params
  ) as run:
    state = run.state
    if run.saved is not None:
      restore_data(run.saved)
    start = int(state.step)
    end = t.steps if not t.stop_after_steps else min(t.steps, start + t.stop_after_steps)
    # Closed however the loop ends: an error then prints on its own line, after the bar.
    with metrics.Progress(
        t.steps, initial=start, desc=config.algorithm, show=("loss",)
    ) as progress:
      for step in range(start, end):
        host_batch = next(batches)
        batch = sharding.put_batch(host_batch, setup.mesh)
        state, step_metrics = setup.step(state, batch)
        progress.update(
            1, tokens=count_tokens(host_batch) if count_tokens else None, metrics=step_metrics
        )
        done = step + 1
        if done % t.log_every == 0 or done == end:
          run.writer.write(done, jax.device_get(step_metrics), prefix="train")
          # Before this step's save: a diverged run stops with its earlier checkpoints as they were.
          check_nonfinite(
              state.opt_state, done, t.get("max_nonfinite_steps", 10), run.ckpt.latest_step()
          )
        if evaluate is not None and (done % t.eval_every == 0 or done == t.steps):
          run.writer.write(done, evaluate(state), prefix="eval")
        run.stop.save(
            run.ckpt,
            done,
            end,
            state,
            workdir=workdir,
            on_stop=progress.close,
            data_state=data_state(),
            config=config.to_dict(),
        )
  return state
