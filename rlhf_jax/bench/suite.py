"""Throughput benchmarks, printed as one JSON record per line.

  python -m rlhf_jax.bench                      # all benchmarks on the default model
  python -m rlhf_jax.bench --only=sft_step --sft_batch=16 --out=bench.jsonl

Every figure that should be compared is measured in the same run: MFU divides the achieved model
FLOP/s by the fp32 (or bf16) matmul peak measured here, first, on the same devices. Records:
  matmul_peak  {gflops}                                  square matmul, the peak MFU refers to
  sft_step     {tokens_per_s, step_s, model_gflops, mfu}  full train step (fwd+bwd+AdamW)
  rm_step      {tokens_per_s, pairs_per_s, ..., mfu}      reward-model step: scalar head, rows of
                                                          packed pairs, Llama 2 margin loss
  generate     {batch, new_tokens_per_s, ...}            KV-cache sampling, batch 8 and 64
  hbm_bandwidth {gbps}                                   device memory bandwidth: an elementwise pass
                                                          over a large array (bytes read + written)
  decode       {new_tokens_per_s, bandwidth_fraction}    batch-1 sampling against its weight-streaming
                                                          limit: bandwidth / bytes of parameters
  ppo_iteration {completions_per_s, iteration_s, ...}    one whole PPO iteration: sample prompts x
                                                          samples, score (policy, reference, value,
                                                          reward model), GAE, epochs x minibatches
                                                          of updates of policy and value
  dpo_step     {tokens_per_s, pairs_per_s, ..., mfu}     DPO step, two records: reference "per_step"
                                                          (the frozen reference's forward pass, then
                                                          the train step) and "precomputed" (the
                                                          train step on log-probs in the batch)
  grpo_iteration {completions_per_s, ...}                one GRPO iteration: no value model, k3 KL
                                                          to the reference in the loss, one update
  grpo_multiturn_iteration {completions_per_s, turns, ...} the same with multi-turn rollouts: rows
                                                          pause at a tool call, the host answers,
                                                          the sampler resumes on its KV cache
  checkpoint   {save_s, restore_s, fingerprint_s, ...}   a train state (params + AdamW moments)
                                                          saved synchronously and restored; the
                                                          integrity fingerprint's share of each
`--compare` runs generate, dpo_step and grpo_iteration beside HF `generate`, TRL's `DPOTrainer`
and `GRPOTrainer` on the same weights (rlhf_jax/bench/compare.py; `pip install -e .[compare]`).
The model is the Llama-style L6 d512 h8 MLP1344 vocab4096 config (`--model=bench`) unless
`--model=llama3_1b` (Llama-3.2-1B's shape: L16 d2048 h32 kv8 MLP8192 vocab128256, tied embeddings,
random weights) or `--model=tiny` (L2 d64, vocab 128: a smoke test of the code paths) is chosen.
On a GPU, e.g.:

  python -m rlhf_jax.bench --model=llama3_1b --dtype=bfloat16 --matmul_n=8192 \
      --only=matmul_peak,sft_step --sft_seq_len=1024
  python -m rlhf_jax.bench --model=llama3_1b --dtype=bfloat16 --param_dtype=bfloat16 \
      --only=hbm_bandwidth,decode
Train-step and generate records also report `compile_s` (first call minus a timed call), the RL
iterations `first_iteration_s`; every record reports its peak memory: `peak_bytes` (device memory
in use) where the backend reports it (GPU, TPU), else `peak_rss_bytes` (Linux: the process's
resident-set high-water mark, reset before each benchmark, so the runtime's own ~0.5 GB is in it).
The run ends with a readable table of the records (`summary_table`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import scoring, sharding
from rlhf_jax.algorithms.dpo import make_dpo_loss_fn
from rlhf_jax.algorithms.reward import make_reward_loss_fn
from rlhf_jax.configs.base import base_config
from rlhf_jax.data.preference import Comparison, logit_budget_for, pack_comparisons
from rlhf_jax.losses.reward import margin_table
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.models import (
    ModelConfig,
    abstract_model,
    create_model,
    llama_bench_config,
    split_model,
)
from rlhf_jax.models.config import PRESETS
from rlhf_jax.train import create_train_state, make_optimizer, make_train_step, state_shardings

BENCHES = (
    "matmul_peak",
    "sft_step",
    "rm_step",
    "dpo_step",
    "generate",
    "ppo_iteration",
    "grpo_iteration",
    "grpo_multiturn_iteration",
    "hbm_bandwidth",
    "decode",
    "checkpoint",
)


def timed(fn, repeats: int, reduce=np.median, warmup_s: float = 0.0) -> float:
  """Median (or `reduce`) wall time of `fn()` (which must block) after one warm-up call, or after
  `warmup_s` seconds of calls (a GPU idles at a low clock and needs ~1 s of load to reach its
  full clock, so a ceiling measured cold is too low and inflates MFU)."""
  fn()
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_s:
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(reduce(times))


def first_and_timed(fn, repeats: int) -> tuple[float, float]:
  """(wall time of the first call of `fn`, which compiles; `timed(fn, repeats)` after it)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  return first, timed(fn, repeats)


def matmul_peak(dtype: str, repeats: int, n: int = 2048) -> dict:
  """Best-case matmul throughput on all devices: [n*D, n] @ [n, n], rows sharded over devices."""
  mesh = sharding.make_mesh((-1, 1, 1))
  d = mesh.size
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (n * d, n), dtype), sharding.batch_sharding(mesh))
  b = jax.device_put(jax.random.normal(kb, (n, n), dtype), sharding.replicated(mesh))
  f = jax.jit(lambda a, b: a @ b)
  # The best of several runs: a peak, so noise must not lower it (and inflate MFU).
  seconds = timed(
      lambda: f(a, b).block_until_ready(), max(repeats, 10), reduce=np.min, warmup_s=2.0
  )
  return {"gflops": 2 * n * n * n * d / seconds / 1e9, "n": n}


_PROC_STATUS, _PROC_CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def reset_peak_memory() -> None:
  """Starts a new host peak-memory window (Linux: writing 5 to clear_refs resets the process's
  resident-set high-water mark, VmHWM). Device peaks (GPU, TPU) cannot be reset from JAX."""
  try:
    with open(_PROC_CLEAR_REFS, "w") as f:
      f.write("5")
  except OSError:  # not Linux, or not allowed: peak_rss_bytes is then the process's whole peak
    pass


def _proc_status_bytes(field: str) -> int | None:
  """A "<field>:  <n> kB" line of /proc/self/status in bytes (Linux), else None."""
  try:
    with open(_PROC_STATUS) as f:
      status = f.read()
  except OSError:
    return None
  for line in status.splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  return None


def peak_memory() -> dict:
  """{"peak_bytes": ...}: peak memory in use on device 0 where the backend reports it (GPU,
  TPU); else {"peak_rss_bytes": ...}: the process's resident-set high-water mark since the last
  `reset_peak_memory` (Linux), which on a CPU backend holds the arrays and the compiled
  programs' buffers; {} where neither is available."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_bytes": int(stats["peak_bytes_in_use"])}
  peak = _proc_status_bytes("VmHWM")
  return {} if peak is None else {"peak_rss_bytes": peak}


def hbm_bandwidth(repeats: int, mib: int = 2048) -> dict:
  """Device-memory bandwidth of device 0: `x * 2` over a `mib` MiB fp32 array reads and writes every
  byte once; the best of several runs."""
  x = jax.device_put(jnp.ones((mib * 2**20 // 4,), jnp.float32), jax.devices()[0])
  f = jax.jit(lambda x: x * 2.0)
  seconds = timed(lambda: f(x).block_until_ready(), max(repeats, 10), reduce=np.min, warmup_s=2.0)
  return {"gbps": 2 * x.nbytes / seconds / 1e9, "mib": mib}


def random_model(cfg: ModelConfig, mesh, seed: int = 0):
  """(graphdef, abstract params, param shardings, params): a random model of `cfg`, its params
  initialised directly into their shardings on `mesh`."""
  graphdef, abstract, axes = abstract_model(cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  params = jax.jit(lambda: split_model(create_model(cfg, seed))[1], out_shardings=psh)()
  return graphdef, abstract, psh, params


def random_train_state(cfg: ModelConfig, mesh):
  """(graphdef, optimizer, state shardings, train state): a random model of `cfg` with
  base_config's AdamW state, laid out on `mesh`."""
  graphdef, abstract, psh, params = random_model(cfg, mesh)
  optimizer, _ = make_optimizer(base_config().optim, 1000)
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  return graphdef, optimizer, shardings, create_train_state(params, optimizer, shardings, seed=0)


def train_step_bench(
    cfg: ModelConfig,
    make_loss_fn,
    host: dict,
    repeats: int,
    peak_gflops: float | None,
    make_add_reference=None,
    workload_tokens: int | None = None,
    head_tokens: int | None = None,
) -> dict:
  """Times the shared train step on `host` (a [B, T] batch of real tokens, no padding).

  make_add_reference(graphdef, mesh) -> add(reference params, batch) -> batch: when given, every
  timed step first runs `add` on a frozen copy of the starting params (a reference forward pass,
  counted as 1/3 of a train step's model FLOPs). workload_tokens: the tokens the step stands for
  when the rows hold fewer (shared prompts): tokens_per_s counts these; model FLOPs and MFU count
  the B x T tokens actually run. head_tokens: the positions the LM head runs on when fewer than
  B x T (a batch's logit list); the model FLOPs count the head's on those only.
  """
  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, optimizer, shardings, state = random_train_state(cfg, mesh)
  # A copy: the step donates the params it is given.
  reference = jax.tree.map(jnp.copy, state.params) if make_add_reference else None
  step = make_train_step(make_loss_fn(graphdef), optimizer, mesh=mesh, state_shardings=shardings)
  data = sharding.put_batch(host, mesh)
  add_reference = make_add_reference(graphdef, mesh) if make_add_reference else None
  holder = [state]

  def run():
    batch = add_reference(reference, data) if add_reference else data
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  first, seconds = first_and_timed(run, repeats)
  batch, seq_len = host["tokens"].shape
  tokens = batch * seq_len
  passes = 4 / 3 if add_reference else 1.0  # + the reference's forward pass
  flops = cfg.flops_per_token(seq_len) * tokens - cfg.head_flops_per_token() * (
      tokens - (head_tokens or tokens)
  )
  gflops = passes * flops / seconds / 1e9
  record = {
      "batch": batch,
      "seq_len": seq_len,
      "step_s": seconds,
      "tokens_per_s": (workload_tokens or tokens) / seconds,
      "row_tokens": tokens,
      "head_tokens": head_tokens or tokens,
      "model_gflops": gflops,
      "compile_s": max(first - seconds, 0.0),
      "remat": cfg.remat,
  }
  if peak_gflops:
    record["mfu"] = gflops / peak_gflops
  return record


def pairs_per_row(bench: str, seq_len: int, sequence_len: int, field: str) -> int:
  """How many pairs of `sequence_len`-token sequences fill a `seq_len`-token row exactly (the
  rows of rm_step and dpo_step, and --compare's TRL pair count); anything else is refused by
  name (`field`: the sequence length's flag)."""
  per_row = seq_len // (2 * sequence_len)
  if per_row < 1 or seq_len % (2 * sequence_len):
    raise ValueError(
        f"{bench}: seq_len={seq_len} must be a multiple of 2 x {field}="
        f"{sequence_len} (rows of whole pairs, no padding)"
    )
  return per_row


def sft_step(cfg: ModelConfig, batch: int, seq_len: int, repeats: int, peak_gflops: float | None):
  rs = np.random.RandomState(0)
  host = dict(
      tokens=rs.randint(1, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
      loss_mask=np.ones((batch, seq_len), bool),
      segment_ids=np.ones((batch, seq_len), np.int32),
      positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
  )
  return train_step_bench(cfg, make_sft_loss_fn, host, repeats, peak_gflops)


def rm_step(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    repeats: int,
    peak_gflops: float | None,
    response_len: int = 128,
) -> dict:
  """Rows of `seq_len` tokens, each packed with pairs of `response_len`-token sequences (the
  layout of data/preference.py), Bradley-Terry loss with the Llama 2 "small" margins."""
  cfg = dataclasses.replace(cfg, head="scalar")
  per_row = pairs_per_row("rm_step", seq_len, response_len, "response_len")
  rs = np.random.RandomState(0)
  segment = np.repeat(np.arange(1, 2 * per_row + 1, dtype=np.int32), response_len)
  host = dict(
      tokens=rs.randint(1, cfg.vocab_size, (batch, seq_len)).astype(np.int32),
      segment_ids=np.tile(segment, (batch, 1)),
      positions=np.tile(np.tile(np.arange(response_len, dtype=np.int32), 2 * per_row), (batch, 1)),
      score_index=np.tile(
          (np.arange(1, 2 * per_row + 1, dtype=np.int32) * response_len - 1).reshape(per_row, 2),
          (batch, 1, 1),
      ),
      ranks=np.tile(np.array([0, 1], np.int32), (batch, per_row, 1)),
      valid=np.ones((batch, per_row, 2), bool),
      margin=rs.randint(0, 4, (batch, per_row)).astype(np.int32),
  )
  make = lambda graphdef: make_reward_loss_fn(
      graphdef, kind="pairwise", margins=margin_table("small"), center_coef=0.01
  )
  record = train_step_bench(cfg, make, host, repeats, peak_gflops)
  record.update(response_len=response_len, pairs_per_s=batch * per_row / record["step_s"])
  return record


def dpo_pairs(
    cfg: ModelConfig, count: int, sequence_len: int, prompt_len: int, seed: int = 0
) -> list[Comparison]:
  """`count` random pairs: two `sequence_len`-token sequences sharing a `prompt_len`-token
  prompt."""
  rs = np.random.RandomState(seed)
  out = []
  for index in range(count):
    prompt = rs.randint(3, cfg.vocab_size, prompt_len)
    responses = rs.randint(3, cfg.vocab_size, (2, sequence_len - prompt_len))
    sequences = [np.concatenate([prompt, r]).astype(np.int32) for r in responses]
    out.append(
        Comparison(
            sequences=sequences,
            ranks=np.array([0, 1], np.int32),
            margin=-1,
            index=index,
            prompt_len=prompt_len,
        )
    )
  return out


def dpo_step(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    repeats: int,
    peak_gflops: float | None,
    sequence_len: int = 128,
    prompt_len: int = 64,
    reference: str = "per_step",
    share_prompt: bool = False,
    list_logits: bool = True,
) -> dict:
  """DPO (sigmoid, beta 0.1). reference "per_step": the reference's log-probs computed every step,
  a jitted forward pass of the frozen reference, then the shared train step (the trainer's
  `reference="per_batch"`; TRL's DPOTrainer without `precompute_ref_log_probs`); "precomputed":
  the step alone, the log-probs read from the batch (`reference="precompute"`, TRL's
  `precompute_ref_log_probs=True`). Rows of `seq_len` tokens packed with pairs of
  `sequence_len`-token sequences (`prompt_len` prompt + response), as data/preference.py packs
  them; every token is real, the response tokens are scored.

  share_prompt: each pair's rows hold its prompt once (data/preference.py, prefix sharing), so the
  same pairs take rows of `per_row x (2 sequence_len - prompt_len)` tokens; tokens_per_s still
  counts the pairs' `2 x sequence_len` tokens each (the workload, as TRL counts it), MFU the
  tokens run. list_logits: the batch lists the response tokens (data/preference.py
  `logit_budget`, as the DPO trainer's batches do): the LM head runs on those only."""
  if reference not in ("per_step", "precomputed"):
    raise ValueError(f"dpo_step: reference={reference!r} must be 'per_step' or 'precomputed'")
  per_row = pairs_per_row("dpo_step", seq_len, sequence_len, "sequence_len")
  row_len = per_row * (2 * sequence_len - prompt_len) if share_prompt else seq_len
  pairs = dpo_pairs(cfg, batch * per_row, sequence_len, prompt_len)
  budget = logit_budget_for(pairs, row_len, share_prompt) if list_logits else None
  host, count = pack_comparisons(
      pairs, row_len, batch, per_row, 2, share_prompt=share_prompt, logit_budget=budget
  )
  assert count == batch * per_row
  loss_cfg = base_config().dpo

  def make_add_reference(graphdef, mesh):
    logps = jax.jit(
        lambda params, batch: scoring.comparison_logps(graphdef, params, batch)[0],
        out_shardings=sharding.batch_sharding(mesh),
    )
    return lambda reference, batch: {**batch, "ref_logps": logps(reference, batch)}

  host = {k: v for k, v in host.items() if k != "comparison"}
  if reference == "precomputed":  # any values: the step's cost does not depend on them
    host["ref_logps"] = (
        np.random.RandomState(1).normal(-50.0, 5.0, host["valid"].shape).astype(np.float32)
    )
  record = train_step_bench(
      cfg,
      lambda graphdef: make_dpo_loss_fn(graphdef, loss_cfg),
      host,
      repeats,
      peak_gflops,
      make_add_reference=(make_add_reference if reference == "per_step" else None),
      workload_tokens=count * 2 * sequence_len,
      head_tokens=None if budget is None else batch * budget,
  )
  record.update(
      sequence_len=sequence_len,
      prompt_len=prompt_len,
      pairs=count,
      pairs_per_s=count / record["step_s"],
      reference=reference,
      share_prompt=share_prompt,
      list_logits=list_logits,
  )
  return record


def generate_bench(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int):
  from rlhf_jax import generate

  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, _, psh, params = random_model(cfg, mesh)
  sampler = generate.Sampler(graphdef, cfg, mesh=mesh, param_shardings=psh)
  rs = np.random.RandomState(0)
  prompts = rs.randint(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  mask = np.ones_like(prompts, bool)
  # No EOS can stop a row early (id -1 never sampled), so every call makes exactly new_tokens.
  run = lambda: jax.block_until_ready(
      sampler(
          params,
          prompts,
          mask,
          jax.random.key(0),
          max_new_tokens=new_tokens,
          temperature=1.0,
          eos_id=-1,
          pad_id=0,
      )
  )
  first, seconds = first_and_timed(run, repeats)
  return {
      "batch": batch,
      "prompt_len": prompt_len,
      "new_tokens": new_tokens,
      "seconds": seconds,
      "new_tokens_per_s": batch * new_tokens / seconds,
      "compile_s": max(first - seconds, 0.0),
  }


def decode(
    cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    bandwidth_gbps: float | None,
) -> dict:
  """Small-batch sampling against its weight-streaming limit: each decoding step reads every
  parameter once, so tokens/s per row cannot exceed bandwidth / parameter bytes (the KV cache and
  the prefill of `prompt_len` tokens, included in the time, are small next to the weights)."""
  record = generate_bench(cfg, batch, prompt_len, new_tokens, repeats)
  param_bytes = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
  record.update(param_bytes=param_bytes, steps_per_s=new_tokens / record["seconds"])
  if bandwidth_gbps:
    limit = bandwidth_gbps * 1e9 / param_bytes
    record.update(limit_steps_per_s=limit, bandwidth_fraction=record["steps_per_s"] / limit)
  return record


def ppo_iteration(
    cfg: ModelConfig,
    prompts: int,
    samples: int,
    prompt_len: int,
    new_tokens: int,
    epochs: int,
    repeats: int,
    estimator: str = "gae",
    kl_beta: float = 0.05,
    share_prompt: bool = False,
    tools=None,
    max_turns: int = 2,
    message_tokens: int = 8,
    rollout_devices: int = 0,
    staleness: int = 0,
) -> dict:
  """A whole PPO iteration (algorithms/ppo.make_iteration, as the trainer runs it) on random
  models of the bench shape: policy, frozen reference, one reward model and (estimator "gae") a
  value model. estimator "grpo": GRPO, no value model and `kl_beta` x k3 KL to the reference in
  the loss (`grpo_iteration`). share_prompt: config.ppo.share_prompt (each prompt run once per
  forward pass for its samples). tools: `environments.Tools` for multi-turn rollouts
  (`grpo_multiturn_iteration`) of at most `max_turns` calls and `message_tokens`-token messages.
  rollout_devices k > 0: the last k devices sample, the others train (config.ppo.rollout_devices);
  staleness 1: each iteration's rollout was dispatched before the previous update with the
  weights from before it (config.ppo.staleness), so sampling overlaps the update."""
  from rlhf_jax.algorithms import ppo, ppo_rollout

  devices = jax.devices()
  train_devices = devices[: len(devices) - rollout_devices]
  mesh = sharding.make_mesh((-1, 1, 1), train_devices)
  rollout_mesh = None
  if rollout_devices:
    rollout_mesh = sharding.make_mesh((-1, 1, 1), devices[len(devices) - rollout_devices :])
  value_cfg = dataclasses.replace(cfg, head="scalar")
  policy_gd, policy_abs, policy_psh, policy = random_model(cfg, mesh, seed=0)
  psh, params, abstract = {"policy": policy_psh}, {"policy": policy}, {"policy": policy_abs}
  value_gd = None
  if estimator == "gae":
    value_gd, abstract["value"], psh["value"], params["value"] = random_model(
        value_cfg, mesh, seed=1
    )
  reference = jax.tree.map(jnp.copy, policy)  # the policy's start, as in the trainer
  reward_gd, _, _, reward = random_model(value_cfg, mesh, seed=2)
  reward_params = {"helpful": reward}
  config = base_config()
  p = config.ppo
  p.update(
      prompts_per_iteration=prompts,
      samples_per_prompt=samples,
      max_new_tokens=new_tokens,
      epochs=epochs,
      minibatches=1,
      share_prompt=share_prompt,
      staleness=staleness,
  )
  if tools is not None:
    p.update(max_turns=max_turns, tool_message_tokens=message_tokens)
  p.kl.beta = kl_beta
  optimizer, _ = make_optimizer(config.optim, 1000)
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  holder = [create_train_state(params, optimizer, shardings, seed=0)]
  spec = ppo_rollout.RewardSpec(names=("helpful",), stats={"helpful": {"mean": 0.0, "std": 1.0}})
  # eos_id -1: no EOS, every sample is full length.
  iterate = ppo.make_iteration(
      policy_gd,
      value_gd,
      {"helpful": reward_gd},
      cfg,
      spec,
      optimizer,
      mesh=mesh,
      policy_shardings=psh["policy"],
      shardings=shardings,
      cfg=p,
      eos_id=-1,
      pad_id=0,
      estimator=estimator,
      tools=tools,
      rollout_mesh=rollout_mesh,
  )
  rs = np.random.RandomState(0)
  prompt = rs.randint(3, cfg.vocab_size, (prompts, prompt_len)).astype(np.int32)
  mask, unsafe = np.ones_like(prompt, bool), np.zeros(len(prompt), bool)
  calls, records, turns, ahead = [0], [{"prompt": ""}] * prompts, [], [None]

  def run():
    calls[0] += 1
    sampled = None
    if staleness:  # this rollout came from the weights before the last update; the next one
      sampled = ahead[0] or iterate.sample(  # is dispatched now, before this update runs
          holder[0].params["policy"], prompt, mask, jax.random.key(calls[0])
      )
      behaviour = jax.tree.map(jnp.copy, holder[0].params["policy"])
      ahead[0] = iterate.sample(behaviour, prompt, mask, jax.random.key(calls[0] + 1))
    holder[0], info = iterate(
        holder[0],
        reference,
        reward_params,
        prompt,
        mask,
        unsafe,
        jax.random.key(calls[0]),
        kl_beta,
        records=records,
        sampled=sampled,
    )
    jax.block_until_ready((holder[0].params, info["update"]))
    if info["episodes"] is not None:
      turns.append(np.mean([len(e.calls) for e in info["episodes"]]))

  # The first call compiles sampler, scoring, advantages and update.
  first, seconds = first_and_timed(run, repeats)
  completions = prompts * samples
  return {
      "prompts": prompts,
      "samples_per_prompt": samples,
      "prompt_len": prompt_len,
      "new_tokens": new_tokens,
      "epochs": epochs,
      "minibatches": 1,
      "estimator": estimator,
      "kl_beta": kl_beta,
      "share_prompt": share_prompt,
      "rollout_devices": rollout_devices,
      "staleness": staleness,
      "iteration_s": seconds,
      "first_iteration_s": first,
      "completions_per_s": completions / seconds,
      "new_tokens_per_s": completions * new_tokens / seconds,
      **({"tool_calls_per_sample": float(np.mean(turns))} if turns else {}),
  }


class _BenchFormat:
  """The tool format of a random-weight benchmark: a row "calls" when it samples one of
  `stop_ids` (a share of the vocabulary sized so that a row calls about every
  new_tokens / (max_turns + 1) tokens), and every tool message is `message_tokens` fixed ids."""

  start, end = "<call>", "</call>"

  def __init__(self, stop_ids, message_tokens: int):
    self.stop_id, self.message = list(stop_ids), [3] * message_tokens
    self.overhead = 1
    self.tokenizer = type("NoText", (), {"decode": staticmethod(lambda ids, **_: "")})()

  def message_tokens(self, content: str, limit: int | None = None) -> list[int]:
    return self.message[:limit]


class _BenchEnvironment:

  def step(self, record, messages):
    from rlhf_jax.algorithms.environments import Observation

    return Observation("result")


def grpo_multiturn_iteration(
    cfg: ModelConfig,
    prompts: int,
    samples: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    kl_beta: float = 0.04,
    max_turns: int = 2,
    message_tokens: int = 8,
) -> dict:
  """`grpo_iteration` with multi-turn rollouts (algorithms/environments.py): each sample may call
  a "tool" up to `max_turns` times; a call pauses its row, the host answers every paused row with a
  `message_tokens`-token message and the sampler resumes on the same KV cache. Random weights
  never write a real call, so a row calls when it samples one of a set of token ids (a share of
  the vocabulary of about (max_turns + 1) / new_tokens); `tool_calls_per_sample` reports how many
  it made. Compare completions/s with `grpo_iteration`'s (same shapes, one turn)."""
  from rlhf_jax.algorithms import environments

  share = min(0.5, (max_turns + 1) / max(new_tokens, 1))
  stop_ids = range(4, 4 + max(1, int(share * (cfg.vocab_size - 4))))
  tools = environments.Tools(_BenchEnvironment(), _BenchFormat(stop_ids, message_tokens))
  record = ppo_iteration(
      cfg,
      prompts,
      samples,
      prompt_len,
      new_tokens,
      epochs=1,
      repeats=repeats,
      estimator="grpo",
      kl_beta=kl_beta,
      tools=tools,
      max_turns=max_turns,
      message_tokens=message_tokens,
  )
  return {**record, "max_turns": max_turns, "message_tokens": message_tokens}


def grpo_iteration(
    cfg: ModelConfig,
    prompts: int,
    samples: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    kl_beta: float = 0.04,
    share_prompt: bool = False,
    rollout_devices: int = 0,
    staleness: int = 0,
) -> dict:
  """One GRPO iteration (TRL GRPOTrainer's step with num_iterations=1): sample prompts x samples,
  score (policy, reference, one reward model), group-normalised advantages, one update of the
  policy with `kl_beta` x k3 KL to the reference in the loss. No value model. rollout_devices,
  staleness: sampling on devices of its own, one step off-policy (`ppo_iteration`)."""
  return ppo_iteration(
      cfg,
      prompts,
      samples,
      prompt_len,
      new_tokens,
      epochs=1,
      repeats=repeats,
      estimator="grpo",
      kl_beta=kl_beta,
      share_prompt=share_prompt,
      rollout_devices=rollout_devices,
      staleness=staleness,
  )


# bench -> (the record's headline figure, its unit); the summary table's columns.
FIGURES = {
    "matmul_peak": ("gflops", "GFLOP/s"),
    "hbm_bandwidth": ("gbps", "GB/s"),
    "sft_step": ("tokens_per_s", "tokens/s"),
    "rm_step": ("tokens_per_s", "tokens/s"),
    "dpo_step": ("tokens_per_s", "tokens/s"),
    "generate": ("new_tokens_per_s", "new tokens/s"),
    "decode": ("new_tokens_per_s", "new tokens/s"),
    "ppo_iteration": ("completions_per_s", "completions/s"),
    "grpo_iteration": ("completions_per_s", "completions/s"),
    "grpo_multiturn_iteration": ("completions_per_s", "completions/s"),
    "checkpoint": ("save_gbps", "GB/s saved"),
}


def checkpoint_bench(cfg: ModelConfig, repeats: int, directory: str | None = None) -> dict:
  """Saves a train state of `cfg` (params and AdamW's two moments) synchronously and restores it,
  `repeats` times each, and times the fingerprint that every save writes and every restore checks
  (`train.checkpoint.fingerprint`): its share of a save and of a restore is what integrity costs.
  `directory`: where to write (default: a temporary directory, removed after)."""
  import shutil
  import tempfile

  from rlhf_jax.train import checkpoint

  _, _, _, state = random_train_state(cfg, sharding.make_mesh((-1, 1, 1)))
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  fingerprint_s = timed(lambda: checkpoint.fingerprint(state), repeats, warmup_s=0.5)
  root = directory or tempfile.mkdtemp(prefix="rlhf_jax_bench_ckpt_")
  steps = iter(range(1, 1_000_000))
  try:
    with checkpoint.Checkpointer(root, async_save=False, keep=2) as ckpt:

      def save():
        ckpt.save(next(steps), state, data_state={}, force=True)
        ckpt.wait()

      save_s = timed(save, repeats)
      restore_s = timed(lambda: jax.block_until_ready(ckpt.restore(target)), repeats)
  finally:
    if directory is None:
      shutil.rmtree(root, ignore_errors=True)
  return {
      "state_bytes": int(nbytes),
      "save_s": save_s,
      "restore_s": restore_s,
      "fingerprint_s": fingerprint_s,
      "fingerprint_share_of_save": fingerprint_s / save_s,
      "fingerprint_share_of_restore": fingerprint_s / restore_s,
      "save_gbps": nbytes / save_s / 1e9,
  }


def _setting(r: dict) -> str:
  """What distinguishes a record from the others of its bench, in a few words."""
  parts = []
  if "seq_len" in r:
    parts.append(f"{r['batch']} x {r['seq_len']}")
  elif "prompts" in r:
    parts.append(f"{r['prompts']} x {r['samples_per_prompt']}, {r['new_tokens']} new")
  elif "new_tokens" in r:
    parts.append(f"batch {r['batch']}, {r['new_tokens']} new")
  elif "n" in r:
    parts.append(f"{r['n']}^3")
  if "reference" in r:
    parts.append(f"ref {r['reference']}")
  if "share_prompt" in r:
    parts.append("shared" if r["share_prompt"] else "unshared")
  if r.get("rollout_devices"):
    parts.append(f"{r['rollout_devices']} rollout devices, staleness {r['staleness']}")
  if r.get("bandwidth_fraction") is not None:
    parts.append(f"{r['bandwidth_fraction']:.2f} of limit")
  if "fingerprint_share_of_save" in r:
    parts.append(
        f"{r['state_bytes'] / 1e6:.0f} MB, fingerprint {r['fingerprint_share_of_save']:.1%}"
    )
  return ", ".join(parts)


def summary_table(records: list[dict]) -> str:
  """The records of a run as a text table: bench, setting, headline figure and unit, MFU, peak
  memory (GB; device or host RSS), compile s (or the RL iterations' first iteration s)."""
  header = (
      f"{'bench':<15} {'setting':<34} {'figure':>10} {'unit':<14} {'mfu':>5} "
      f"{'peak GB':>8} {'compile s':>9}"
  )
  lines = [header, "-" * len(header)]
  for r in records:
    key, unit = FIGURES.get(r["bench"], (None, ""))
    figure = f"{r[key]:>10.1f}" if key in r else f"{'':>10}"
    mfu = f"{r['mfu']:>5.2f}" if "mfu" in r else f"{'':>5}"
    memory = r.get("peak_bytes", r.get("peak_rss_bytes"))
    memory = f"{memory / 1e9:>8.2f}" if memory is not None else f"{'':>8}"
    compile_s = r.get("compile_s", r.get("first_iteration_s"))
    compile_s = f"{compile_s:>9.1f}" if compile_s is not None else f"{'':>9}"
    lines.append(
        f"{r['bench']:<15} {_setting(r):<34} {figure} {unit:<14} {mfu} {memory} " f"{compile_s}"
    )
  return "\n".join(lines)


def measured(bench_fn, *args, **kwargs) -> dict:
  """bench_fn(*args, **kwargs)'s record with its peak memory (`peak_memory`) added, and on a host
  backend the resident set when it started (`rss_start_bytes`: the runtime, earlier benchmarks'
  compiled programs) to read the peak against.

  The start is the high-water mark just after the reset, not VmRSS: the kernel keeps its RSS
  counters per CPU and reads them approximately, so a VmRSS read can exceed a later VmHWM by a few
  pages. Nor is the mark itself monotone between reads: the kernel reports max(its stored mark,
  the current RSS) but stores the mark only at some events (unmapping, exit), so a read taken
  while RSS is high can exceed a later one after memory was freed (a clean-clone CI run saw it).
  The window's peak is therefore the larger of the two reads: the process held `start` bytes
  inside it."""
  reset_peak_memory()
  start = _proc_status_bytes("VmHWM")
  record = bench_fn(*args, **kwargs)
  record.update(peak_memory())
  if "peak_rss_bytes" in record and start is not None:
    record["rss_start_bytes"] = start
    record["peak_rss_bytes"] = max(record["peak_rss_bytes"], start)
  return record


llama3_1b_config = PRESETS["llama3_1b"]
tiny_config = functools.partial(
    llama_bench_config,
    vocab_size=128,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    max_seq_len=512,
)
MODELS = {
    "bench": {"config": llama_bench_config, "name": "llama L6 d512 h8 mlp1344 v4096"},
    "llama3_1b": {
        "config": llama3_1b_config,
        "name": "llama3.2-1B shape L16 d2048 h32 kv8 mlp8192 v128256",
    },
    "tiny": {"config": tiny_config, "name": "llama L2 d64 h4 kv2 mlp128 v128"},
}
