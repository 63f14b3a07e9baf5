"""The benchmarks run (tiny model, one repeat) and report consistent figures; speed targets live
in `python -m rlhf_jax.bench`, never in tests."""

import numpy as np
import pytest

from rlhf_jax.bench import suite as bench
from rlhf_jax.models import llama_bench_config


@pytest.fixture(scope="module")
def tiny():
  return llama_bench_config(
      vocab_size=128,
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      max_seq_len=256,
  )


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


def test_dpo_pairs_share_their_prompt(tiny):
  pairs = bench.dpo_pairs(tiny, 3, sequence_len=16, prompt_len=4)
  for pair in pairs:
    chosen, rejected = pair.sequences
    assert len(chosen) == len(rejected) == 16 and pair.prompt_len == 4
    np.testing.assert_array_equal(chosen[:4], rejected[:4])
  assert [p.index for p in pairs] == [0, 1, 2]


@pytest.mark.slow  # compiles sampler, scoring and update (~30 s)
def test_grpo_iteration_record(tiny):
  record = bench.grpo_iteration(
      tiny, prompts=2, samples=4, prompt_len=8, new_tokens=8, repeats=1, kl_beta=0.1
  )
  assert (record["estimator"], record["kl_beta"], record["epochs"]) == ("grpo", 0.1, 1)
  assert record["completions_per_s"] == pytest.approx(8 / record["iteration_s"])


def test_compare_tokenizer_has_one_id_per_word():
  from rlhf_jax.bench import compare as bench_compare  # imports neither torch nor trl

  tok = bench_compare.word_tokenizer(16)
  assert tok("w4 w5 w15 ")["input_ids"] == [4, 5, 15]  # no BOS: n words are n tokens
  assert tok("w4 w5" + " w6</s>")["input_ids"] == [4, 5, 6, tok.eos_token_id]  # TRL's DPO EOS
  assert tok.decode([4, 5, 2, 0, 6], skip_special_tokens=True) == "w4 w5 w6"
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_compare_rounds_alternate_sides_and_report_the_median_ratio():
  """`paired`: each round measures both sides, ours first in even rounds and theirs first in odd
  ones; the ratio is the median of the rounds' own ratios (not of the two sides' medians)."""
  from rlhf_jax.bench import compare as bench_compare  # imports neither torch nor trl

  calls = []
  ours = iter([10.0, 30.0, 20.0])
  theirs = iter([10.0, 10.0, 40.0])

  def side(label, figures):
    def run():
      calls.append(label)
      return {"tokens_per_s": next(figures)}

    return run

  records = list(
      bench_compare.paired(
          "compare_x", "tokens_per_s", 3, ("mine", "trl"), side("mine", ours), side("trl", theirs)
      )
  )
  assert calls == ["mine", "trl", "trl", "mine", "mine", "trl"]
  assert [(name, r["round"]) for name, r in records[:-1]] == [
      ("mine", 0),
      ("trl", 0),
      ("trl", 1),
      ("mine", 1),
      ("mine", 2),
      ("trl", 2),
  ]
  name, result = records[-1]
  assert name == "compare" and result["rounds"] == 3
  assert result["ratios"] == [1.0, 3.0, 0.5]
  # Median of the rounds' ratios: 1.0; the ratio of the medians would be 20 / 10 = 2.0.
  assert result["ratio"] == 1.0 and (result["ours"], result["theirs"]) == (20.0, 10.0)
  table = bench_compare.table([result])
  assert "compare_x" in table and "3: 0.50-3.00" in table
  with pytest.raises(ValueError, match="compare_rounds=0"):
    next(
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
            rounds=0,
        )
    )


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


def test_llama3_1b_shape_and_model_flag():
  cfg = bench.llama3_1b_config()
  assert cfg.num_params() == 1_235_814_400  # Llama-3.2-1B's published count, tied embeddings
  assert bench.MODELS["bench"]["config"]().num_layers == 6
  assert set(bench.BENCHES) >= {"sft_step", "decode", "hbm_bandwidth", "dpo_step", "grpo_iteration"}
  assert bench.MODELS["tiny"]["config"]().num_layers == 2


def test_rm_step_refuses_rows_that_are_not_whole_pairs(tiny):
  with pytest.raises(ValueError, match="seq_len=64 must be a multiple of 2 x response_len=128"):
    bench.rm_step(tiny, batch=2, seq_len=64, repeats=1, peak_gflops=None)


def test_peak_memory_reads_the_host_high_water_mark(monkeypatch, tmp_path):
  status, clear = tmp_path / "status", tmp_path / "clear_refs"
  status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
  monkeypatch.setattr(bench, "_PROC_STATUS", str(status))
  monkeypatch.setattr(bench, "_PROC_CLEAR_REFS", str(clear))
  record = bench.measured(lambda: {"x": 1})
  assert clear.read_text() == "5"  # the kernel's "reset the peak RSS" request
  assert record == {"x": 1, "peak_rss_bytes": 2048 * 1024, "rss_start_bytes": 1024 * 1024}
  status.unlink()  # not Linux: nothing to report, nothing raised
  monkeypatch.setattr(bench, "_PROC_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
  assert bench.measured(lambda: {"x": 1}) == {"x": 1}


def test_summary_table_has_a_row_per_record():
  records = [
      {"bench": "matmul_peak", "gflops": 200.0, "n": 2048},
      {
          "bench": "dpo_step",
          "batch": 8,
          "seq_len": 384,
          "tokens_per_s": 950.5,
          "mfu": 0.51,
          "reference": "per_step",
          "share_prompt": True,
          "compile_s": 6.2,
          "peak_rss_bytes": 3e9,
      },
      {
          "bench": "generate",
          "batch": 64,
          "new_tokens": 128,
          "new_tokens_per_s": 1100.0,
          "compile_s": 2.0,
          "peak_bytes": 5e8,
      },
      {
          "bench": "grpo_iteration",
          "prompts": 2,
          "samples_per_prompt": 4,
          "new_tokens": 64,
          "completions_per_s": 3.5,
          "share_prompt": False,
          "first_iteration_s": 12.0,
      },
  ]
  lines = bench.summary_table(records).splitlines()
  assert len(lines) == 2 + len(records)
  assert lines[1] == "-" * len(lines[0])
  dpo, gen, grpo = lines[3], lines[4], lines[5]
  assert "8 x 384, ref per_step, shared" in dpo and "950.5 tokens/s" in dpo
  assert dpo.split()[-3:] == ["0.51", "3.00", "6.2"]  # mfu, peak GB, compile s
  assert "batch 64, 128 new" in gen and gen.split()[-2:] == ["0.50", "2.0"]
  assert "2 x 4, 64 new, unshared" in grpo and grpo.split()[-1] == "12.0"
  assert "200.0 GFLOP/s" in lines[2]


@pytest.mark.slow  # a whole run of the CLI at the tiny size (~30 s)
def test_cli_writes_records_and_prints_the_table(tmp_path):
  import json
  import os
  import subprocess
  import sys

  out = tmp_path / "bench.jsonl"
  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a benchmark run has
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
