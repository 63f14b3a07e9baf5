"""`python -m rlhf_jax.bench`: runs the benchmarks of `rlhf_jax.bench.suite` (its docstring lists the
records) and, with `--compare`, the same workloads in HF transformers and TRL
(`rlhf_jax.bench.compare`)."""

from __future__ import annotations

import dataclasses
import json
import platform

import jax
from absl import app, flags

from rlhf_jax.bench import suite

_ONLY = flags.DEFINE_list(
    "only",
    [
        "matmul_peak",
        "sft_step",
        "rm_step",
        "dpo_step",
        "generate",
        "ppo_iteration",
        "grpo_iteration",
        "grpo_multiturn_iteration",
    ],
    "Benchmarks to run.",
)
_MODEL = flags.DEFINE_enum(
    "model",
    "bench",
    ["bench", "llama3_1b", "tiny"],
    "bench: L6 d512 vocab 4096; llama3_1b: Llama-3.2-1B's shape, random "
    "weights; tiny: L2 d64 vocab 128, to smoke-test the code paths.",
)
_COMPARE = flags.DEFINE_bool(
    "compare",
    False,
    "Run generate, dpo_step and grpo_iteration beside HF "
    "generate, TRL DPOTrainer and GRPOTrainer (ignores --only; needs the "
    "`compare` extra).",
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype",
    "float32",
    ["float32", "bfloat16"],
    "Storage dtype of the parameters (bfloat16 for the decode bench).",
)
_REMAT = flags.DEFINE_enum(
    "remat",
    "none",
    ["none", "full", "dots", "dots_no_batch"],
    "Rematerialisation policy of each layer in the train steps.",
)
_MATMUL_N = flags.DEFINE_integer(
    "matmul_n",
    2048,
    "Side of the square matmul that measures the peak "
    "(2048 on CPU; 8192 to reach a GPU's peak).",
)
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "Batch size of the decode bench.")
_SFT_BATCH = flags.DEFINE_integer("sft_batch", 8, "Sequences per SFT step.")
_SFT_SEQ = flags.DEFINE_integer("sft_seq_len", 512, "Tokens per sequence in the SFT step.")
_GEN_BATCHES = flags.DEFINE_list("gen_batch", ["8", "64"], "Batch sizes for generation.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt length for generation.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens per generation.")
_RL_PROMPTS = flags.DEFINE_integer("rl_prompts", 2, "Prompts per PPO iteration.")
_RL_SAMPLES = flags.DEFINE_integer("rl_samples", 4, "Samples per prompt in a PPO iteration.")
_RL_NEW = flags.DEFINE_integer("rl_new_tokens", 64, "New tokens per PPO sample.")
_RL_EPOCHS = flags.DEFINE_integer("rl_epochs", 1, "PPO epochs per iteration (x 1 mini-batch).")
_GRPO_BETA = flags.DEFINE_float(
    "grpo_kl_beta", 0.04, "GRPO's k3 KL coefficient (> 0: a reference)."
)
_COMPARE_ROUNDS = flags.DEFINE_integer(
    "compare_rounds",
    1,
    "--compare: measure each workload on both sides this many times, in "
    "alternating order, and report the median of the rounds' ratios (and their range).",
)
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads",
    0,
    "--compare: torch's intra-op threads " "(0: the cores this process may use, as XLA).",
)
_DPO_SEQUENCE = flags.DEFINE_integer(
    "dpo_sequence_len",
    128,
    "Tokens per DPO sequence (prompt + "
    "response) and per rm_step sequence; pairs of them are packed "
    "into --sft_seq_len rows.",
)
_DPO_SHARE = flags.DEFINE_bool(
    "dpo_share_prompt",
    True,
    "DPO rows hold each pair's prompt once "
    "(config.reward.share_prompt); the default run also times the "
    "per-step-reference step without it.",
)
_DPO_LIST = flags.DEFINE_bool(
    "dpo_list_logits",
    True,
    "DPO batches list their response tokens "
    "(as the trainer's): the LM head runs on those only, not on the "
    "prompts' tokens.",
)
_RL_SHARE = flags.DEFINE_bool(
    "rl_share_prompt",
    True,
    "ppo_iteration / grpo_iteration with "
    "config.ppo.share_prompt (a prompt's samples run with the prompt "
    "once); the default run also times GRPO without it.",
)
_RL_SPLIT = flags.DEFINE_integer(
    "rl_rollout_devices",
    0,
    "grpo_iteration also with this many devices sampling apart from the training devices "
    "(config.ppo.rollout_devices), at staleness 0 and 1; 0 = not run.",
)
_SCAN = flags.DEFINE_bool(
    "scan_layers",
    False,
    "Run the layers with lax.scan (the trainer's "
    "default) instead of unrolled: unrolled train steps were 3-26% faster on "
    "the 6-layer bench model on CPU, at about the same compile time.",
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (after one warm-up).")
_OUT = flags.DEFINE_string("out", "", "Also append the records to this JSONL file.")


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(suite.BENCHES))
  if unknown:
    raise app.UsageError(f"--only: unknown benchmarks {unknown}; choose from {list(suite.BENCHES)}")
  model = suite.MODELS[_MODEL.value]
  cfg = model["config"](dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, remat=_REMAT.value)
  cfg = dataclasses.replace(cfg, scan_layers=_SCAN.value)
  env = {
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "machine": platform.machine(),
      "jax": jax.__version__,
      "model": model["name"],
      "dtype": _DTYPE.value,
      "param_dtype": _PARAM_DTYPE.value,
      "scan_layers": _SCAN.value,
  }
  records = []

  def emit(name, record):
    record = {"bench": name, **record, **env}
    records.append(record)
    print(json.dumps(record), flush=True)

  if _COMPARE.value:
    # The only module that imports torch, transformers and trl.
    from rlhf_jax.bench import compare

    compared = []
    for name, record in compare.compare(
        cfg,
        gen_batches=[int(b) for b in _GEN_BATCHES.value],
        prompt_len=_PROMPT.value,
        new_tokens=_NEW.value,
        dpo_rows=_SFT_BATCH.value,
        dpo_seq_len=_SFT_SEQ.value,
        dpo_sequence_len=_DPO_SEQUENCE.value,
        dpo_share_prompt=_DPO_SHARE.value,
        dpo_list_logits=_DPO_LIST.value,
        rl_share_prompt=_RL_SHARE.value,
        rl_prompts=_RL_PROMPTS.value,
        rl_samples=_RL_SAMPLES.value,
        rl_new_tokens=_RL_NEW.value,
        kl_beta=_GRPO_BETA.value,
        repeats=_REPEATS.value,
        rounds=_COMPARE_ROUNDS.value,
        torch_threads=_TORCH_THREADS.value or None,
    ):
      emit(name, record)
      if name == "compare":
        compared.append(record)
    print(compare.table(compared), flush=True)
  only = () if _COMPARE.value else _ONLY.value
  peak = None
  if "matmul_peak" in only:
    peak = suite.measured(suite.matmul_peak, _DTYPE.value, _REPEATS.value, n=_MATMUL_N.value)
    emit("matmul_peak", peak)
    peak = peak["gflops"]
  if "checkpoint" in only:
    emit("checkpoint", suite.measured(suite.checkpoint_bench, cfg, _REPEATS.value))
  if "sft_step" in only:
    emit(
        "sft_step",
        suite.measured(suite.sft_step, cfg, _SFT_BATCH.value, _SFT_SEQ.value, _REPEATS.value, peak),
    )
  if "rm_step" in only:
    emit(
        "rm_step",
        suite.measured(
            suite.rm_step,
            cfg,
            _SFT_BATCH.value,
            _SFT_SEQ.value,
            _REPEATS.value,
            peak,
            response_len=_DPO_SEQUENCE.value,
        ),
    )
  if "dpo_step" in only:
    runs = [("per_step", _DPO_SHARE.value), ("precomputed", _DPO_SHARE.value)]
    if _DPO_SHARE.value:
      runs.append(("per_step", False))  # what sharing the prompt buys
    for reference, share in runs:
      emit(
          "dpo_step",
          suite.measured(
              suite.dpo_step,
              cfg,
              _SFT_BATCH.value,
              _SFT_SEQ.value,
              _REPEATS.value,
              peak,
              sequence_len=_DPO_SEQUENCE.value,
              prompt_len=_PROMPT.value,
              reference=reference,
              share_prompt=share,
              list_logits=_DPO_LIST.value,
          ),
      )
  if "generate" in only:
    for b in _GEN_BATCHES.value:
      emit(
          "generate",
          suite.measured(
              suite.generate_bench, cfg, int(b), _PROMPT.value, _NEW.value, _REPEATS.value
          ),
      )
  if "ppo_iteration" in only:
    emit(
        "ppo_iteration",
        suite.measured(
            suite.ppo_iteration,
            cfg,
            _RL_PROMPTS.value,
            _RL_SAMPLES.value,
            _PROMPT.value,
            _RL_NEW.value,
            _RL_EPOCHS.value,
            _REPEATS.value,
            share_prompt=_RL_SHARE.value,
        ),
    )
  if "grpo_iteration" in only:
    # With shared prompts, also the unshared iteration: what sharing buys.
    for share in ([True, False] if _RL_SHARE.value else [False]):
      emit(
          "grpo_iteration",
          suite.measured(
              suite.grpo_iteration,
              cfg,
              _RL_PROMPTS.value,
              _RL_SAMPLES.value,
              _PROMPT.value,
              _RL_NEW.value,
              _REPEATS.value,
              kl_beta=_GRPO_BETA.value,
              share_prompt=share,
          ),
      )
  if "grpo_iteration" in only and _RL_SPLIT.value:
    # Rollouts on devices of their own, on-policy and one step off-policy, beside the colocated
    # iteration above (unshared, as these are).
    for staleness in (0, 1):
      emit(
          "grpo_iteration",
          suite.measured(
              suite.grpo_iteration,
              cfg,
              _RL_PROMPTS.value,
              _RL_SAMPLES.value,
              _PROMPT.value,
              _RL_NEW.value,
              _REPEATS.value,
              kl_beta=_GRPO_BETA.value,
              rollout_devices=_RL_SPLIT.value,
              staleness=staleness,
          ),
      )
  if "grpo_multiturn_iteration" in only:
    emit(
        "grpo_multiturn_iteration",
        suite.measured(
            suite.grpo_multiturn_iteration,
            cfg,
            _RL_PROMPTS.value,
            _RL_SAMPLES.value,
            _PROMPT.value,
            _RL_NEW.value,
            _REPEATS.value,
            kl_beta=_GRPO_BETA.value,
        ),
    )
  bandwidth = None
  if "hbm_bandwidth" in only:
    bandwidth = suite.measured(suite.hbm_bandwidth, _REPEATS.value)
    emit("hbm_bandwidth", bandwidth)
    bandwidth = bandwidth["gbps"]
  if "decode" in only:
    emit(
        "decode",
        suite.measured(
            suite.decode,
            cfg,
            _DECODE_BATCH.value,
            _PROMPT.value,
            _NEW.value,
            _REPEATS.value,
            bandwidth,
        ),
    )
  if only:
    print(suite.summary_table([r for r in records if r["bench"] in suite.FIGURES]), flush=True)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  app.run(main)
