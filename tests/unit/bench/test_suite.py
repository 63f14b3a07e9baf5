"""The benchmarks run (tiny model, one repeat) and report consistent figures; speed targets live
in `python -m rlhf_jax.bench`, never in tests.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/bench/test_suite.py.
"""

import numpy as np
import pytest

from rlhf_jax.bench import suite as bench
from tests.helpers.bench import build_tiny


@pytest.fixture(scope="module")
def tiny():
  return build_tiny()


def test_dpo_pairs_share_their_prompt(tiny):
  pairs = bench.dpo_pairs(tiny, 3, sequence_len=16, prompt_len=4)
  for pair in pairs:
    chosen, rejected = pair.sequences
    assert len(chosen) == len(rejected) == 16 and pair.prompt_len == 4
    np.testing.assert_array_equal(chosen[:4], rejected[:4])
  assert [p.index for p in pairs] == [0, 1, 2]


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
  status.write_text("Name:\tpython\nVmHWM:\t  1024 kB\nVmRSS:\t  1000 kB\n")
  monkeypatch.setattr(bench, "_PROC_STATUS", str(status))
  monkeypatch.setattr(bench, "_PROC_CLEAR_REFS", str(clear))

  def bench_fn():  # the benchmark's arrays raise the mark, then are freed
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1010 kB\n")
    return {"x": 1}

  record = bench.measured(bench_fn)
  assert clear.read_text() == "5"  # the kernel's "reset the peak RSS" request
  # The start is the mark when the window opened (VmHWM), the peak the mark when it closed.
  assert record == {"x": 1, "peak_rss_bytes": 2048 * 1024, "rss_start_bytes": 1024 * 1024}

  def freeing_fn():  # the mark read lower at the end than at the start (memory freed meanwhile)
    status.write_text("Name:\tpython\nVmHWM:\t  900 kB\nVmRSS:\t  900 kB\n")
    return {"x": 2}

  status.write_text("Name:\tpython\nVmHWM:\t  1024 kB\nVmRSS:\t  1000 kB\n")
  record = bench.measured(freeing_fn)
  assert record == {"x": 2, "peak_rss_bytes": 1024 * 1024, "rss_start_bytes": 1024 * 1024}
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
