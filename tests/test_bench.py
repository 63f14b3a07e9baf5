"""The benchmarks run (tiny model, one repeat) and report consistent figures; speed targets live
in `python -m rlhf_jax.bench`, never in tests."""

import numpy as np
import pytest

from rlhf_jax import bench
from rlhf_jax.models import llama_bench_config


@pytest.fixture(scope="module")
def tiny():
  return llama_bench_config(vocab_size=128, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                            mlp_dim=128, max_seq_len=256)


@pytest.mark.slow  # compiles a whole update / benchmark: minutes of the fast set
def test_train_step_and_generate_records(tiny):
  sft = bench.sft_step(tiny, batch=8, seq_len=32, repeats=1, peak_gflops=100.0)
  assert sft["tokens_per_s"] == pytest.approx(8 * 32 / sft["step_s"])
  assert sft["mfu"] == pytest.approx(sft["model_gflops"] / 100.0)
  rm = bench.rm_step(tiny, batch=8, seq_len=64, repeats=1, peak_gflops=None, response_len=16)
  assert rm["pairs_per_s"] == pytest.approx(8 * 2 / rm["step_s"]) and "mfu" not in rm
  gen = bench.generate_bench(tiny, batch=8, prompt_len=8, new_tokens=8, repeats=1)
  assert gen["new_tokens_per_s"] == pytest.approx(64 / gen["seconds"])


@pytest.mark.slow  # compiles sampler, scoring and update (~40 s)
def test_ppo_iteration_record(tiny):
  record = bench.ppo_iteration(tiny, prompts=2, samples=4, prompt_len=8, new_tokens=8, epochs=2,
                               repeats=1)
  assert record["completions_per_s"] == pytest.approx(8 / record["iteration_s"])
  assert record["new_tokens_per_s"] == pytest.approx(8 * 8 / record["iteration_s"])
  assert np.isfinite(record["first_iteration_s"]) and record["first_iteration_s"] > 0


@pytest.mark.slow  # two sampler compiles and a timed bandwidth pass (~45 s)
def test_decode_record_against_bandwidth(tiny):
  bf16 = tiny.replace(dtype="bfloat16", param_dtype="bfloat16")
  bandwidth = bench.hbm_bandwidth(repeats=1, mib=8)
  assert bandwidth["gbps"] > 0
  record = bench.decode(bf16, batch=1, prompt_len=4, new_tokens=4, repeats=1, bandwidth_gbps=10.0)
  assert record["param_bytes"] == bf16.num_params() * 2  # bf16 weights, read once per step
  limit = 10.0e9 / record["param_bytes"]
  assert record["limit_steps_per_s"] == pytest.approx(limit)
  assert record["bandwidth_fraction"] == pytest.approx(record["steps_per_s"] / limit)
  assert "bandwidth_fraction" not in bench.decode(bf16, 1, 4, 4, 1, bandwidth_gbps=None)


def test_llama3_1b_shape_and_model_flag():
  cfg = bench.llama3_1b_config()
  assert cfg.num_params() == 1_235_814_400  # Llama-3.2-1B's published count, tied embeddings
  assert bench.MODELS["bench"]["config"]().num_layers == 6
  assert set(bench.BENCHES) >= {"sft_step", "decode", "hbm_bandwidth"}
