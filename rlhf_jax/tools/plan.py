"""Memory planner: will a run fit? Compiles the train step ahead of time on a (fake) mesh and reports
per-device bytes, without allocating a single parameter.

  python -m rlhf_jax.tools.plan --model=llama3_8b --devices=8 --mesh=1,8,1 --batch=8 --seq_len=4096 \\
      --algorithm=dpo --chip=h100
  python -m rlhf_jax.tools.plan --config=experiments/toy_sft.py --devices=8      # a config's model/batch/mesh

On a machine with fewer devices than `--devices` (this CPU), the planner runs on N fake CPU devices
(`--xla_force_host_platform_device_count`), so a 256-chip plan is made on a laptop. Per device:

  params        the trained model(s)' shards (policy; PPO: + value model), in param_dtype
  optimizer     AdamW moments (+ count), sharded like their parameters
  frozen        models held but not trained, in `--frozen_dtype`: DPO's reference (none with a
                precomputed reference: `--no_reference`), PPO's reference and reward model
  activations   the compiled train step's temporaries (XLA's `memory_analysis().temp_size_in_bytes`:
                activations kept for the backward pass, gradients, workspace) for one [B, T]
                micro-batch (B = batch / accum_steps), with the model's remat policy; DPO's step
                on rows of ~256-token pairs; PPO's and GRPO's own update (one epoch, one
                mini-batch; PPO with its value model), the sampling and scoring passes being
                smaller. The LM head runs where the trainers run it: on the `--response_share`
                of a row's slots that are responses (DPO, PPO, GRPO; default 0.5) or SFT targets
                (default 1.0: every slot, pretraining text; instruction data, whose prompts are
                no targets, lists its targets: give their share)
  total         their sum; `fits` compares it with `--chip`'s memory (minus `--reserve` for the
                runtime and fragmentation)

The activations come from the CPU compiler when planning on CPU; GPU and TPU compilers fuse
differently, so treat them as an estimate (docs/real_models.md, "Memory planner" has a check against a measured
GPU peak). Exits 0 when the plan fits, 3 when it does not.
"""

from __future__ import annotations

import os
import sys


def _force_devices(argv: list[str]) -> None:
  """Before JAX is imported: ask for `--devices` fake CPU devices (the planner needs none real)."""
  n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), None)
  if n and "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "host_platform_device_count" not in f)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _force_devices(sys.argv)

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rlhf_jax import sharding  # noqa: E402
from rlhf_jax.algorithms.dpo import make_dpo_loss_fn  # noqa: E402
from rlhf_jax.algorithms.ppo import make_ppo_loss_fn, make_ppo_update  # noqa: E402
from rlhf_jax.algorithms.reward import make_reward_loss_fn  # noqa: E402
from rlhf_jax.configs.base import base_config  # noqa: E402
from rlhf_jax.data.sft import budget_from_share  # noqa: E402
from rlhf_jax.losses.reward import margin_table  # noqa: E402
from rlhf_jax.losses.sft import make_sft_loss_fn  # noqa: E402
from rlhf_jax.models import ModelConfig, abstract_model  # noqa: E402
from rlhf_jax.models.config import PRESETS  # noqa: E402
from rlhf_jax.train import make_optimizer, make_train_step, state_shardings  # noqa: E402
from rlhf_jax.train.state import TrainState  # noqa: E402

# Memory per chip in GB (1e9 bytes), as the vendors state it.
CHIPS = {
    "h100": 80e9,
    "h200": 141e9,
    "a100-40": 40e9,
    "a100": 80e9,
    "l4": 24e9,
    "tpu-v4": 32e9,
    "tpu-v5e": 16e9,
    "tpu-v5p": 95e9,
    "tpu-v6e": 32e9,
}
ALGORITHMS = ("sft", "reward", "dpo", "ppo", "grpo")
# The share of a row's slots that are responses (DPO, PPO, GRPO) or targets (SFT) by default.
DEFAULT_RESPONSE_SHARE = {"sft": 1.0, "reward": 1.0, "dpo": 0.5, "ppo": 0.5, "grpo": 0.5}


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program (the bench defines some of the same
  names; importing both into one process must not clash)."""
  global _CONFIG, _MODEL, _DEVICES, _MESH, _ALGORITHM, _BATCH, _SEQ, _ACCUM, _DTYPE, _PARAM_DTYPE
  global _REMAT, _FROZEN_DTYPE, _NO_REFERENCE, _CHIP, _RESERVE, _RESPONSE_SHARE
  _CONFIG = flags.DEFINE_string(
      "config",
      "",
      "An experiment file: its model, train.batch_size, seq_len, "
      "accum_steps, mesh and algorithm (flags below override them).",
  )
  _MODEL = flags.DEFINE_string("model", "", f"A model preset: {sorted(PRESETS)}.")
  _DEVICES = flags.DEFINE_integer(
      "devices",
      0,
      "Devices to plan for (fake CPU devices when there are "
      "fewer real ones); 0 = the devices present.",
  )
  _MESH = flags.DEFINE_string(
      "mesh",
      "",
      "data,fsdp,tensor (one may be -1); default: the config's, " "or all devices on fsdp.",
  )
  _ALGORITHM = flags.DEFINE_enum("algorithm", "", ["", *ALGORITHMS], "Which models are held.")
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch (rows) per optimiser step.")
  _SEQ = flags.DEFINE_integer("seq_len", 0, "Tokens per row.")
  _ACCUM = flags.DEFINE_integer("accum_steps", 0, "Gradient-accumulation micro-batches per step.")
  _DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype (default: the model's).")
  _PARAM_DTYPE = flags.DEFINE_string("param_dtype", "", "Parameter dtype (default: the model's).")
  _REMAT = flags.DEFINE_string("remat", "", "Remat policy (default: the model's).")
  _FROZEN_DTYPE = flags.DEFINE_string("frozen_dtype", "bfloat16", "dtype of frozen models.")
  _NO_REFERENCE = flags.DEFINE_bool(
      "no_reference", False, "DPO with precomputed reference log-probs."
  )
  _CHIP = flags.DEFINE_enum(
      "chip", "h100", sorted(CHIPS), "The chip whose memory the plan must fit."
  )
  _RESERVE = flags.DEFINE_float("reserve", 0.1, "Fraction of the chip's memory kept free.")
  _RESPONSE_SHARE = flags.DEFINE_float(
      "response_share",
      None,
      "Share of a row's slots that are "
      "responses (DPO, PPO, GRPO: default 0.5) or SFT targets "
      "(default 1.0): where the LM head runs.",
  )


def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of `abstract` (a tree of ShapeDtypeStructs) placed with `shardings`;
  with uneven shards, the largest (the first device's)."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def plan(
    cfg: ModelConfig,
    mesh,
    *,
    algorithm: str,
    batch: int,
    seq_len: int,
    accum_steps: int = 1,
    frozen_dtype: str = "bfloat16",
    reference: bool = True,
    response_share: float | None = None,
) -> dict:
  """Per-device bytes of a `algorithm` run of `cfg` on `mesh` with [batch, seq_len] steps (see the
  module doc). Compiles, never allocates. response_share: the share of a row's slots that are
  responses or SFT targets (None: `DEFAULT_RESPONSE_SHARE`); the LM head runs on those."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm={algorithm!r}: choose one of {ALGORITHMS}")
  share = DEFAULT_RESPONSE_SHARE[algorithm] if response_share is None else response_share
  if not 0.0 < share <= 1.0:
    raise ValueError(f"response_share={share} must be in (0, 1]")
  if batch % accum_steps:
    raise ValueError(f"batch={batch} is not divisible by accum_steps={accum_steps}")
  sharding.check_batch_size(batch // accum_steps, mesh)
  sharding.validate_model_mesh(cfg, mesh)
  if algorithm == "reward":
    cfg = dataclasses.replace(cfg, head="scalar")
  rl = algorithm in ("ppo", "grpo")
  graphdef, abstract, axes = abstract_model(cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  # Trained: the model; PPO and GRPO train {"policy"} (PPO: + "value", the trunk with a scalar
  # head, whose architecture is also the reward model's).
  trained, trained_psh, value_graphdef = abstract, psh, None
  if rl:
    value_graphdef, scalar, scalar_axes = abstract_model(dataclasses.replace(cfg, head="scalar"))
    scalar_psh = sharding.param_shardings(scalar, scalar_axes, mesh)
    trained, trained_psh = {"policy": abstract}, {"policy": psh}
    if algorithm == "ppo":
      trained["value"], trained_psh["value"] = scalar, scalar_psh
  optimizer, _ = make_optimizer(base_config().optim, 1000)
  shardings = state_shardings(optimizer, trained_psh, trained, mesh)
  abstract_opt = jax.eval_shape(optimizer.init, trained)
  params_b = shard_bytes(trained, trained_psh)
  opt_b = shard_bytes(abstract_opt, shardings.opt_state)
  state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=trained,
      opt_state=abstract_opt,
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
  )

  # Frozen models, held in frozen_dtype: DPO's reference; PPO's and GRPO's reference (the
  # policy's architecture) and reward model (the scalar-head trunk).
  as_frozen = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(frozen_dtype)), tree
  )
  one_frozen = shard_bytes(as_frozen(abstract), psh)
  n_frozen = {"sft": 0, "reward": 0, "dpo": int(reference), "ppo": 2, "grpo": 2}[algorithm]
  frozen_b = n_frozen * one_frozen
  if rl:
    frozen_b = one_frozen + shard_bytes(as_frozen(scalar), scalar_psh)
  b, t = batch, seq_len
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  floats = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  listed = budget_from_share(share, t)  # the trainers' logit lists (data/sft.py, preference.py)
  if rl:
    temp = _rl_update_temp(
        mesh,
        algorithm,
        b,
        t,
        accum_steps,
        share,
        graphdef,
        value_graphdef if algorithm == "ppo" else None,
        state,
        shardings,
        optimizer,
    )
    return _record(
        cfg,
        mesh,
        algorithm,
        batch,
        seq_len,
        accum_steps,
        share,
        params_b,
        opt_b,
        n_frozen,
        frozen_b,
        temp,
    )
  if algorithm == "dpo":
    # Rows of whole pairs (about 256 tokens a pair), the responses `share` of the tokens: the
    # batch lists them (data/preference.py `logit_budget`), the LM head runs on those slots.
    pairs = max(1, t // 256)
    host = dict(
        tokens=ints(b, t),
        segment_ids=ints(b, t),
        positions=ints(b, t),
        score_index=ints(b, pairs, 2),
        response_start=ints(b, pairs, 2),
        valid=jax.ShapeDtypeStruct((b, pairs, 2), jnp.bool_),
        ref_logps=floats(b, pairs, 2),
        logit_index=ints(b, listed),
        logit_target=ints(b, listed),
        logit_end=ints(b, pairs, 2),
    )
    loss_fn = make_dpo_loss_fn(graphdef, base_config().dpo)
  elif algorithm == "reward":
    pairs = max(1, t // 256)
    host = dict(
        tokens=jax.ShapeDtypeStruct((b, t), jnp.int32),
        segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32),
        positions=jax.ShapeDtypeStruct((b, t), jnp.int32),
        score_index=jax.ShapeDtypeStruct((b, pairs, 2), jnp.int32),
        ranks=jax.ShapeDtypeStruct((b, pairs, 2), jnp.int32),
        valid=jax.ShapeDtypeStruct((b, pairs, 2), jnp.bool_),
        margin=jax.ShapeDtypeStruct((b, pairs), jnp.int32),
    )
    loss_fn = make_reward_loss_fn(
        graphdef, kind="pairwise", margins=margin_table("small"), center_coef=0.01
    )
  else:
    host = dict(
        tokens=jax.ShapeDtypeStruct((b, t), jnp.int32),
        loss_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_),
        segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32),
        positions=jax.ShapeDtypeStruct((b, t), jnp.int32),
    )
    if listed < t:  # targets listed for the LM head, as the SFT trainer's batches do
      host.update(
          logit_index=ints(b, listed),
          logit_target=ints(b, listed),
          logit_mask=jax.ShapeDtypeStruct((b, listed), jnp.bool_),
      )
    loss_fn = make_sft_loss_fn(graphdef)
  step = make_train_step(
      loss_fn, optimizer, mesh=mesh, state_shardings=shardings, accum_steps=accum_steps
  )
  temp = _temp_bytes(step.lower(state, host))
  return _record(
      cfg,
      mesh,
      algorithm,
      batch,
      seq_len,
      accum_steps,
      share,
      params_b,
      opt_b,
      n_frozen,
      frozen_b,
      temp,
  )


def _temp_bytes(lowered) -> int:
  stats = lowered.compile().memory_analysis()
  return int(getattr(stats, "temp_size_in_bytes", 0)) if stats is not None else 0


def _rl_update_temp(
    mesh,
    algorithm: str,
    b: int,
    t: int,
    accum_steps: int,
    share: float,
    graphdef,
    value_graphdef,
    state: TrainState,
    shardings: TrainState,
    optimizer,
) -> int:
  """Per-device temporaries of PPO's / GRPO's update (`ppo.make_ppo_update`: one epoch of one
  mini-batch of b rollout rows of t slots, the last share x t the responses) on the abstract
  `state` ({"policy"}, PPO: + "value", the separate value model of `value_graphdef`)."""
  response_len = min(t - 1, max(1, round(share * t)))
  ppo_cfg = base_config().ppo
  ppo_cfg.update(epochs=1, minibatches=1, accum_steps=accum_steps)
  loss_fn = make_ppo_loss_fn(
      graphdef,
      value_graphdef,
      ppo_cfg,
      estimator="gae" if algorithm == "ppo" else "grpo",
      response_len=response_len,
  )
  update = make_ppo_update(loss_fn, optimizer, mesh=mesh, shardings=shardings, cfg=ppo_cfg)
  ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
  floats = jax.ShapeDtypeStruct((b, t), jnp.float32)
  rollout = dict(
      tokens=ints,
      segment_ids=ints,
      positions=ints,
      advantages=floats,
      response_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_),
  )
  if algorithm == "ppo":
    rollout.update(old_logp=floats, old_values=floats, returns=floats)
  else:  # one update per rollout: the loss holds the policy's own log-probs as the old ones
    rollout["ref_logp"] = floats
  return _temp_bytes(update.lower(state, rollout))


def _record(
    cfg,
    mesh,
    algorithm,
    batch,
    seq_len,
    accum_steps,
    share,
    params_b,
    opt_b,
    n_frozen,
    frozen_b,
    temp,
) -> dict:
  return {
      "algorithm": algorithm,
      "devices": mesh.size,
      "mesh": dict(mesh.shape),
      "batch": batch,
      "seq_len": seq_len,
      "accum_steps": accum_steps,
      "response_share": share,
      "params_per_device": params_b,
      "optimizer_per_device": opt_b,
      "frozen_per_device": frozen_b,
      "frozen_models": n_frozen,
      "activations_per_device": temp,
      "total_per_device": params_b + opt_b + frozen_b + temp,
      "model_params": cfg.num_params(),
      "dtype": cfg.dtype,
      "param_dtype": cfg.param_dtype,
      "remat": cfg.remat,
      "compiled_on": jax.default_backend(),
  }


def verdict(record: dict, chip: str, reserve: float) -> dict:
  usable = CHIPS[chip] * (1.0 - reserve)
  return {
      "chip": chip,
      "chip_bytes": CHIPS[chip],
      "usable_bytes": usable,
      "fits": record["total_per_device"] <= usable,
      "headroom_bytes": usable - record["total_per_device"],
  }


def _gb(x: float) -> str:
  return f"{x / 1e9:8.2f} GB"


def format_plan(record: dict) -> str:
  mesh = ", ".join(f"{k}={v}" for k, v in record["mesh"].items())
  lines = [
      f"{record['algorithm']} of a {record['model_params'] / 1e9:.2f}B-parameter model on "
      f"{record['devices']} devices ({mesh}), batch {record['batch']} x {record['seq_len']} "
      f"tokens, {record['accum_steps']} micro-batch(es), remat {record['remat']}, LM head on "
      f"{record['response_share']:.0%} of the slots; per device:",
      f"  params       {_gb(record['params_per_device'])}  ({record['param_dtype']})",
      f"  optimizer    {_gb(record['optimizer_per_device'])}  (AdamW moments)",
      f"  frozen       {_gb(record['frozen_per_device'])}  ({record['frozen_models']} model(s))",
      f"  activations  {_gb(record['activations_per_device'])}  (compiled step temporaries, "
      f"{record['compiled_on']} compiler)",
      f"  total        {_gb(record['total_per_device'])}",
  ]
  if "chip" in record:
    word = "fits" if record["fits"] else "does NOT fit"
    lines.append(
        f"  -> {word} a {record['chip']} ({_gb(record['usable_bytes']).strip()} usable of "
        f"{_gb(record['chip_bytes']).strip()}; headroom {_gb(record['headroom_bytes']).strip()})"
    )
  return "\n".join(lines)


def load_experiment(spec: str):
  """`get_config()` of an experiment file "path.py" (or "path.py:arg" -> get_config("arg"))."""
  import importlib.util

  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise app.UsageError(f"--config={spec!r}: no such file {path!r}")
  module_spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _settings() -> tuple[ModelConfig, tuple, str, int, int, int]:
  """(model config, mesh shape, algorithm, batch, seq_len, accum_steps) from --config and flags."""
  model, mesh_shape, algorithm, batch, seq_len, accum = None, None, "sft", 8, 1024, 1
  if _CONFIG.value:
    c = load_experiment(_CONFIG.value)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_fields = {k: v for k, v in c.model.to_dict().items() if k in fields}
    if model_fields.get("vocab_size") == 0 and not _MODEL.value:
      raise app.UsageError(
          f"{_CONFIG.value}: model.vocab_size=0 (taken from a tokenizer at run "
          "time); pass --model or a config with the vocabulary size set"
      )
    model = None if _MODEL.value else ModelConfig(**model_fields)
    mesh_shape = tuple(c.mesh.shape)
    algorithm = {
        "reward": "reward",
        "dpo": "dpo",
        "ppo": "ppo",
        "grpo": "grpo",
        "rloo": "grpo",
    }.get(c.algorithm, "sft")
    batch, seq_len, accum = c.train.batch_size, c.train.seq_len, c.train.get("accum_steps", 1)
  if _MODEL.value:
    if _MODEL.value not in PRESETS:
      raise app.UsageError(f"--model={_MODEL.value!r}: choose one of {sorted(PRESETS)}")
    model = PRESETS[_MODEL.value]()
  if model is None:
    raise app.UsageError("give --model or --config")
  overrides = {
      k: v
      for k, v in (
          ("dtype", _DTYPE.value),
          ("param_dtype", _PARAM_DTYPE.value),
          ("remat", _REMAT.value),
      )
      if v
  }
  model = dataclasses.replace(model, **overrides)
  if _MESH.value:
    mesh_shape = tuple(int(x) for x in _MESH.value.split(","))
  return (
      model,
      mesh_shape or (1, -1, 1),
      _ALGORITHM.value or algorithm,
      _BATCH.value or batch,
      _SEQ.value or seq_len,
      _ACCUM.value or accum,
  )


def main(argv):
  del argv
  model, mesh_shape, algorithm, batch, seq_len, accum = _settings()
  devices = jax.devices()
  if _DEVICES.value:
    if len(devices) < _DEVICES.value:
      raise app.UsageError(
          f"--devices={_DEVICES.value} but only {len(devices)} are present; run "
          "`python -m rlhf_jax.tools.plan` directly (it creates fake CPU devices)"
      )
    devices = devices[: _DEVICES.value]
  mesh = sharding.make_mesh(mesh_shape, devices)
  record = plan(
      model,
      mesh,
      algorithm=algorithm,
      batch=batch,
      seq_len=seq_len,
      accum_steps=accum,
      frozen_dtype=_FROZEN_DTYPE.value,
      reference=not _NO_REFERENCE.value,
      response_share=_RESPONSE_SHARE.value,
  )
  record.update(verdict(record, _CHIP.value, _RESERVE.value))
  print(format_plan(record))
  print(
      json.dumps({k: (v if not isinstance(v, np.generic) else v.item()) for k, v in record.items()})
  )
  if not record["fits"]:
    sys.exit(3)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
