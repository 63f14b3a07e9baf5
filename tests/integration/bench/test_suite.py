"""The benchmarks run (tiny model, one repeat) and report consistent figures; speed targets live
in `python -m rlhf_jax.bench`, never in tests.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/bench/test_suite.py.
"""

import jax
import numpy as np
import pytest

from rlhf_jax.bench import suite as bench
from tests.helpers import xla_flags
from tests.helpers.bench import build_tiny


@pytest.fixture(scope="module")
def tiny():
  return build_tiny()


@pytest.mark.slow  # compiles a whole update / benchmark: minutes of the fast set
def test_train_step_and_generate_records(tiny):
  sft = bench.sft_step(tiny, batch=8, seq_len=32, repeats=1, peak_gflops=100.0)
  assert sft["tokens_per_s"] == pytest.approx(8 * 32 / sft["step_s"])
  assert sft["mfu"] == pytest.approx(sft["model_gflops"] / 100.0)
  rm = bench.rm_step(tiny, batch=8, seq_len=64, repeats=1, peak_gflops=None, response_len=16)
  assert rm["pairs_per_s"] == pytest.approx(8 * 2 / rm["step_s"]) and "mfu" not in rm
  gen = bench.generate_bench(tiny, batch=8, prompt_len=8, new_tokens=8, repeats=1)
  assert gen["new_tokens_per_s"] == pytest.approx(64 / gen["seconds"])


def test_checkpoint_record(tiny, tmp_path):
  record = bench.checkpoint_bench(tiny, repeats=2, directory=str(tmp_path))
  # params + AdamW's two moments (float32) and a few scalars
  n_params = sum(
      x.size
      for x in jax.tree.leaves(bench.random_model(tiny, bench.sharding.make_mesh((-1, 1, 1)))[3])
  )
  assert 3 * 4 * n_params <= record["state_bytes"] < 3 * 4 * n_params + 1024
  assert record["save_gbps"] == pytest.approx(record["state_bytes"] / record["save_s"] / 1e9)
  assert (
      0
      < record["fingerprint_share_of_save"]
      == pytest.approx(record["fingerprint_s"] / record["save_s"])
  )
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())[-2:] == [2, 3]


@pytest.mark.slow  # compiles sampler, scoring and update (~40 s)
def test_ppo_iteration_record(tiny):
  record = bench.ppo_iteration(
      tiny, prompts=2, samples=4, prompt_len=8, new_tokens=8, epochs=2, repeats=1
  )
  assert record["completions_per_s"] == pytest.approx(8 / record["iteration_s"])
  assert record["new_tokens_per_s"] == pytest.approx(8 * 8 / record["iteration_s"])
  assert np.isfinite(record["first_iteration_s"]) and record["first_iteration_s"] > 0


@pytest.mark.slow  # compiles the reference pass and the DPO step
def test_dpo_step_record(tiny):
  record = bench.dpo_step(
      tiny, batch=8, seq_len=64, repeats=1, peak_gflops=100.0, sequence_len=32, prompt_len=8
  )
  assert record["pairs"] == 8 and record["reference"] == "per_step"  # one pair per 64-token row
  assert record["tokens_per_s"] == pytest.approx(8 * 64 / record["step_s"])
  assert record["pairs_per_s"] == pytest.approx(8 / record["step_s"])
  # The reference's forward pass is a third of a train step's FLOPs; the LM head runs on the
  # listed response tokens only: 48 of 64 per row (2 x 24 of 2 x 32).
  assert record["list_logits"] and record["head_tokens"] == 8 * 48
  head = 3 * 2 * tiny.embed_dim * tiny.vocab_size
  flops = tiny.flops_per_token(64) * 8 * 64 - head * 8 * 16
  gflops = 4 / 3 * flops / record["step_s"] / 1e9
  assert record["model_gflops"] == pytest.approx(gflops)
  assert record["mfu"] == pytest.approx(gflops / 100.0)
  # Precomputed reference: the step alone, counted as one train step's FLOPs (every position's
  # logits without the list).
  pre = bench.dpo_step(
      tiny,
      batch=8,
      seq_len=64,
      repeats=1,
      peak_gflops=100.0,
      sequence_len=32,
      prompt_len=8,
      reference="precomputed",
      list_logits=False,
  )
  assert pre["reference"] == "precomputed" and pre["pairs"] == 8 and pre["head_tokens"] == 8 * 64
  assert pre["model_gflops"] == pytest.approx(
      tiny.flops_per_token(64) * 8 * 64 / pre["step_s"] / 1e9
  )
  with pytest.raises(ValueError, match="reference='cached' must be"):
    bench.dpo_step(tiny, batch=8, seq_len=64, repeats=1, peak_gflops=None, reference="cached")


@pytest.mark.slow  # compiles sampler, scoring and update (~30 s)
def test_grpo_iteration_record(tiny):
  record = bench.grpo_iteration(
      tiny, prompts=2, samples=4, prompt_len=8, new_tokens=8, repeats=1, kl_beta=0.1
  )
  assert (record["estimator"], record["kl_beta"], record["epochs"]) == ("grpo", 0.1, 1)
  assert record["completions_per_s"] == pytest.approx(8 / record["iteration_s"])


@pytest.mark.slow  # compiles the sampler on 4 devices, scoring and update on the other 4
@pytest.mark.parametrize("staleness", [0, 1])
def test_grpo_iteration_with_rollouts_on_their_own_devices(tiny, staleness):
  record = bench.grpo_iteration(
      tiny,
      prompts=2,
      samples=4,
      prompt_len=8,
      new_tokens=8,
      repeats=2,
      rollout_devices=4,
      staleness=staleness,
  )
  assert (record["rollout_devices"], record["staleness"]) == (4, staleness)
  assert record["completions_per_s"] == pytest.approx(8 / record["iteration_s"])
  assert "4 rollout devices, staleness" in bench._setting(record)


@pytest.mark.slow  # compiles the turn sampler's start and resume, scoring and update
def test_grpo_multiturn_iteration_record(tiny):
  record = bench.grpo_multiturn_iteration(
      tiny, prompts=2, samples=4, prompt_len=8, new_tokens=16, repeats=1, max_turns=2
  )
  assert (record["estimator"], record["max_turns"], record["message_tokens"]) == ("grpo", 2, 8)
  assert 0 < record["tool_calls_per_sample"] <= 2  # rows did pause, answer and resume
  assert record["completions_per_s"] == pytest.approx(8 / record["iteration_s"])


@pytest.mark.slow  # exports, compiles ours and runs HF generate, TRL DPO and GRPO trainers
def test_compare_with_hf_and_trl(tmp_path):
  pytest.importorskip("trl", reason="bench --compare needs trl: pip install -e .[compare]")
  from rlhf_jax.bench import compare as bench_compare

  records = list(
      bench_compare.compare(
          bench.tiny_config(),
          gen_batches=[8],
          prompt_len=8,
          new_tokens=8,
          dpo_rows=8,
          dpo_seq_len=64,
          dpo_sequence_len=32,
          rl_prompts=2,
          rl_samples=4,
          rl_new_tokens=8,
          kl_beta=0.04,
          repeats=1,
          torch_threads=1,
          workdir=str(tmp_path),
          dpo_share_prompt=True,
          rl_share_prompt=True,
      )
  )
  assert [name for name, _ in records] == [
      "generate",
      "hf_generate",
      "compare",
      "dpo_step",
      "trl_dpo_step",
      "compare",
      "grpo_iteration",
      "trl_grpo_step",
      "compare",
  ]
  by_name = dict(records)
  assert by_name["trl_dpo_step"]["pairs"] == by_name["dpo_step"]["pairs"] == 8
  # Shared prompts on our side: rows of 2 x 32 - 8 tokens hold the same pairs; tokens/s counts
  # the pairs' tokens (as TRL's), model FLOPs the tokens run.
  dpo = by_name["dpo_step"]
  assert dpo["share_prompt"] and by_name["grpo_iteration"]["share_prompt"]
  assert dpo["row_tokens"] == 8 * 56 and dpo["tokens_per_s"] == pytest.approx(
      8 * 64 / dpo["step_s"]
  )
  # Both sides count every token of the 8 pairs of 2 x 32-token sequences.
  assert by_name["trl_dpo_step"]["tokens_per_s"] == pytest.approx(
      8 * 2 * 32 / by_name["trl_dpo_step"]["step_s"]
  )
  assert by_name["trl_grpo_step"]["completions_per_s"] == pytest.approx(
      8 / by_name["trl_grpo_step"]["iteration_s"]
  )
  assert by_name["hf_generate"]["torch_threads"] == 1 and by_name["hf_generate"]["trl"]
  compared = [record for name, record in records if name == "compare"]
  assert [r["name"] for r in compared] == [
      "compare_generate_b8",
      "compare_dpo_step",
      "compare_grpo_iteration",
  ]
  for r in compared:
    assert r["theirs"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["theirs"])
  assert "compare_dpo_step" in bench_compare.table(compared)
  assert not list(tmp_path.iterdir())  # the exports are removed


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


@pytest.mark.slow  # a whole run of the CLI at the tiny size (~30 s)
def test_cli_writes_records_and_prints_the_table(tmp_path):
  import json
  import os
  import subprocess
  import sys

  out = tmp_path / "bench.jsonl"
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}  # one CPU device, as a benchmark run has
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "rlhf_jax.bench",
          "--model=tiny",
          "--only=matmul_peak,rm_step,generate",
          "--matmul_n=256",
          "--gen_batch=2",
          "--new_tokens=4",
          "--prompt_len=4",
          "--sft_batch=2",
          "--sft_seq_len=64",
          "--dpo_sequence_len=32",
          "--repeats=1",
          f"--out={out}",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["bench"] for r in records] == ["matmul_peak", "rm_step", "generate"]
  rm, gen = records[1], records[2]
  assert rm["response_len"] == 32 and rm["pairs_per_s"] > 0 and 0 < rm["mfu"]
  assert gen["compile_s"] >= 0 and gen["new_tokens_per_s"] > 0
  if sys.platform == "linux":
    assert all(r["peak_rss_bytes"] >= r["rss_start_bytes"] > 0 for r in records)
  table = proc.stdout.splitlines()[-5:]
  assert table[0].split()[:3] == ["bench", "setting", "figure"]
  assert [line.split()[0] for line in table[2:]] == ["matmul_peak", "rm_step", "generate"]
