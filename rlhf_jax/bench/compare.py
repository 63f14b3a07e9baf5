"""Side-by-side benchmarks against PyTorch: `python -m rlhf_jax.bench --compare`.

The same workloads, on the same random weights (exported with `hf.export_hf` and loaded by
transformers), the same shapes, fp32 on this CPU, in the same run:

  generate        ours: `bench.generate_bench`   theirs: HF `model.generate`, sampling at T=1 over
                                                 the whole vocabulary, every row full length
  dpo_step        ours: `bench.dpo_step`         theirs: TRL `DPOTrainer` steps, reference log-probs
                                                 computed in every step (no precompute)
  grpo_iteration  ours: `bench.grpo_iteration`   theirs: TRL `GRPOTrainer` steps (num_iterations
                                                 1, beta > 0: a reference model, the same scalar
                                                 reward model as a `LlamaForSequenceClassification`)

Each side is timed after one warm-up (our compile; PyTorch's first-call allocations): ours by
`bench.timed`, TRL's trainers by a callback around `repeats` optimiser steps (`on_step_begin` to
`on_step_end`: generation, scoring and the update, not the data loader), the median in both.
With `rounds` > 1 (`--compare_rounds`) each workload is measured that many times on both sides in
alternating order, and its ratio is the median of the rounds' own ratios (`paired`).
Tokens are counted the same way on both sides: DPO every token of the chosen and rejected
sequences (prompt + response, no padding), generation and GRPO completions of exactly the requested
length (no EOS can end a row early: ours samples with no EOS id, theirs with `min_new_tokens`).
torch uses as many threads as this process has cores, as XLA's CPU client does (`--torch_threads`
overrides it), with OMP_WAIT_POLICY=PASSIVE unless it is set (on a loaded machine spinning OpenMP
threads made 2 threads 20x slower than 1). TRL's trainers checkpoint activations only when ours
does (`--remat`; TRL's default is on).

Not identical by construction: our DPO rows pack whole pairs (segment-masked attention over the
row: at the defaults 512-token rows, where TRL runs 32 separate 128-token sequences); our GRPO
iteration scores the policy's old log-probs in a forward pass of its own, which TRL skips when
num_iterations = 1 (it uses the detached current ones); HF runs its default attention (sdpa) and
dynamic KV cache.

torch, transformers and trl are imported here only (`pip install -e .[compare]`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from rlhf_jax import sharding
from rlhf_jax.bench import suite as bench
from rlhf_jax.hf import checkpoints as hf
from rlhf_jax.models import ModelConfig

# Special tokens of the word-level tokenizer, ids 0..3; words "w4".."w{V-1}" follow.
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def num_threads() -> int:
  """The cores this process may run on (XLA's CPU client uses all of them)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def word_tokenizer(vocab_size: int):
  """A whitespace word-level tokenizer over `vocab_size` ids (pad 0, BOS 1, EOS 2, unk 3, then
  "w4", "w5", ...) that adds no special tokens: n words encode to exactly n ids, so TRL's datasets
  of text have the token counts of ours."""
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers

  words = list(SPECIALS) + [f"w{i}" for i in range(len(SPECIALS), vocab_size)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
  )


def random_words(rs: np.random.RandomState, count: int, vocab_size: int) -> str:
  return " ".join(f"w{i}" for i in rs.randint(len(SPECIALS), vocab_size, count))


def export_models(cfg: ModelConfig, tokenizer, workdir: Path) -> tuple[Path, Path]:
  """(policy dir, reward dir): the random models the `bench` records use (seeds 0 and 2, see
  `bench.ppo_iteration`) as HF checkpoints."""
  mesh = sharding.make_mesh((-1, 1, 1))
  policy = bench.random_model(cfg, mesh, seed=0)[3]
  reward_cfg = dataclasses.replace(cfg, head="scalar")
  reward = bench.random_model(reward_cfg, mesh, seed=2)[3]
  return (
      hf.export_hf(policy, cfg, workdir / "policy", tokenizer=tokenizer, dtype="float32"),
      hf.export_hf(reward, reward_cfg, workdir / "reward", tokenizer=tokenizer, dtype="float32"),
  )


def hf_generate(
    policy_dir: Path, batch: int, prompt_len: int, new_tokens: int, repeats: int
) -> dict:
  """HF `generate` (KV cache, multinomial sampling at T=1, no top-k / top-p), every row exactly
  `new_tokens` long; median of `repeats` calls after one warm-up."""
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
  vocab = model.config.vocab_size
  prompts = torch.from_numpy(
      np.random.RandomState(0).randint(len(SPECIALS), vocab, (batch, prompt_len))
  )
  mask = torch.ones_like(prompts)

  def run():
    with torch.inference_mode():
      out = model.generate(
          input_ids=prompts,
          attention_mask=mask,
          do_sample=True,
          temperature=1.0,
          top_k=0,
          top_p=1.0,
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          pad_token_id=0,
      )
    assert out.shape == (batch, prompt_len + new_tokens), out.shape

  seconds = bench.timed(run, repeats)
  return {
      "batch": batch,
      "prompt_len": prompt_len,
      "new_tokens": new_tokens,
      "seconds": seconds,
      "new_tokens_per_s": batch * new_tokens / seconds,
  }


def _step_timer():
  """A TrainerCallback recording each optimiser step's wall time in `.times`."""
  import transformers

  class StepTimer(transformers.TrainerCallback):

    def __init__(self):
      self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
      self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.times.append(time.perf_counter() - self.start)

  return StepTimer()


def _trainer_args(output_dir: str, batch: int, steps: int, remat: bool) -> dict:
  """TrainingArguments shared by the TRL trainers: CPU, fp32, no logging, saving or evaluation;
  gradient checkpointing only where ours rematerialises (`remat`; TRL's default is on)."""
  return dict(
      output_dir=output_dir,
      per_device_train_batch_size=batch,
      max_steps=steps,
      gradient_accumulation_steps=1,
      learning_rate=1e-6,
      lr_scheduler_type="constant",
      use_cpu=True,
      bf16=False,
      fp16=False,
      report_to="none",
      save_strategy="no",
      eval_strategy="no",
      logging_strategy="no",
      disable_tqdm=True,
      dataloader_num_workers=0,
      seed=0,
      gradient_checkpointing=remat,
  )


def trl_dpo_step(
    policy_dir: Path,
    tokenizer,
    pairs: int,
    sequence_len: int,
    prompt_len: int,
    repeats: int,
    workdir: Path,
    remat: bool = False,
) -> dict:
  """TRL `DPOTrainer` (sigmoid, beta 0.1, reference log-probs computed in every step): `pairs`
  pairs of `sequence_len`-token sequences (`prompt_len` prompt + response ending in EOS) a step;
  median step time of `repeats` steps after one warm-up step."""
  import datasets
  import torch
  import transformers
  import trl

  model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
  rs = np.random.RandomState(0)
  vocab, response = model.config.vocab_size, sequence_len - prompt_len - 1  # + EOS, TRL adds it
  rows = [
      {
          "prompt": random_words(rs, prompt_len, vocab),
          "chosen": " " + random_words(rs, response, vocab),
          "rejected": " " + random_words(rs, response, vocab),
      }
      for _ in range(pairs * (1 + repeats))
  ]
  timer = _step_timer()
  args = trl.DPOConfig(
      **_trainer_args(str(workdir / "trl_dpo"), pairs, 1 + repeats, remat),
      beta=0.1,
      loss_type=["sigmoid"],
      precompute_ref_log_probs=False,
      max_length=sequence_len,
  )
  trainer = trl.DPOTrainer(
      model=model,
      args=args,
      train_dataset=datasets.Dataset.from_list(rows),
      processing_class=tokenizer,
      callbacks=[timer],
  )
  data = trainer.train_dataset
  lengths = {
      2 * len(p) + len(c) + len(r)
      for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
  }
  if lengths != {2 * sequence_len}:  # the tokenizer must give both sides the same shapes
    raise AssertionError(f"TRL's pairs have {sorted(lengths)} tokens, expected {2 * sequence_len}")
  trainer.train()
  seconds = float(np.median(timer.times[1:]))
  tokens = pairs * 2 * sequence_len
  return {
      "pairs": pairs,
      "sequence_len": sequence_len,
      "prompt_len": prompt_len,
      "step_s": seconds,
      "first_step_s": timer.times[0],
      "tokens_per_s": tokens / seconds,
      "pairs_per_s": pairs / seconds,
      "reference": "per_step",
  }


def trl_grpo_step(
    policy_dir: Path,
    reward_dir: Path,
    tokenizer,
    prompts: int,
    samples: int,
    prompt_len: int,
    new_tokens: int,
    kl_beta: float,
    repeats: int,
    workdir: Path,
    remat: bool = False,
) -> dict:
  """TRL `GRPOTrainer`: `prompts` x `samples` completions of `new_tokens` a step, one update each
  (num_iterations 1), k3 KL to a reference with coefficient `kl_beta`, one reward model; median
  step time of `repeats` steps after one warm-up step."""
  import datasets
  import torch
  import transformers
  import trl

  model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
  reward = transformers.AutoModelForSequenceClassification.from_pretrained(
      reward_dir, dtype=torch.float32
  )
  rs = np.random.RandomState(0)
  # A trailing space: TRL scores prompt + decoded completion as one text.
  rows = [
      {"prompt": random_words(rs, prompt_len, model.config.vocab_size) + " "}
      for _ in range(prompts * (1 + repeats))
  ]
  timer = _step_timer()
  args = trl.GRPOConfig(
      **_trainer_args(str(workdir / "trl_grpo"), prompts * samples, 1 + repeats, remat),
      num_generations=samples,
      max_completion_length=new_tokens,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      beta=kl_beta,
      num_iterations=1,
      shuffle_dataset=False,
      generation_kwargs={"min_new_tokens": new_tokens},
      log_completions=False,
  )
  trainer = trl.GRPOTrainer(
      model=model,
      reward_funcs=reward,
      args=args,
      train_dataset=datasets.Dataset.from_list(rows),
      processing_class=tokenizer,
      reward_processing_classes=tokenizer,
      callbacks=[timer],
  )
  assert trainer.ref_model is not None, "beta > 0 must give GRPOTrainer a reference model"
  trainer.train()
  seconds = float(np.median(timer.times[1:]))
  completions = prompts * samples
  return {
      "prompts": prompts,
      "samples_per_prompt": samples,
      "prompt_len": prompt_len,
      "new_tokens": new_tokens,
      "kl_beta": kl_beta,
      "iteration_s": seconds,
      "first_iteration_s": timer.times[0],
      "completions_per_s": completions / seconds,
      "new_tokens_per_s": completions * new_tokens / seconds,
  }


def paired(
    name: str, unit: str, rounds: int, labels: tuple[str, str], run_ours, run_theirs
) -> Iterator[tuple[str, dict]]:
  """Measures one workload on both sides `rounds` times, alternating the order (ours first in
  even rounds, theirs first in odd ones: a load that drifts during the run then weighs on both
  sides alike), and yields each measurement (labels[0] / labels[1], with its "round") as it is
  made, then one "compare" record: {"name", "unit", "ours", "theirs" (median figures), "ratio"
  (the median of the rounds' ours / theirs), "ratios" (each round's), "rounds"}. The ratio of a
  round compares two measurements minutes apart, not the two sides' separate medians."""
  figures = {0: [], 1: []}
  runs = (run_ours, run_theirs)
  for r in range(rounds):
    for side in ((0, 1) if r % 2 == 0 else (1, 0)):
      record = {**runs[side](), "round": r}
      figures[side].append(record[unit])
      yield labels[side], record
  ratios = [a / b for a, b in zip(figures[0], figures[1])]
  yield "compare", {
      "name": name,
      "unit": unit,
      "ours": float(np.median(figures[0])),
      "theirs": float(np.median(figures[1])),
      "ratio": float(np.median(ratios)),
      "ratios": ratios,
      "rounds": rounds,
  }


def compare(
    cfg: ModelConfig,
    *,
    gen_batches: list[int],
    prompt_len: int,
    new_tokens: int,
    dpo_rows: int,
    dpo_seq_len: int,
    dpo_sequence_len: int,
    rl_prompts: int,
    dpo_share_prompt: bool = False,
    dpo_list_logits: bool = True,
    rl_share_prompt: bool = False,
    rl_samples: int,
    rl_new_tokens: int,
    kl_beta: float,
    repeats: int,
    rounds: int = 1,
    torch_threads: int | None = None,
    workdir: str | None = None,
) -> Iterator[tuple[str, dict]]:
  """Yields (bench name, record) as each is measured: ours ("generate", "dpo_step",
  "grpo_iteration"), theirs ("hf_generate", "trl_dpo_step", "trl_grpo_step"), each `rounds` times
  in alternating order (`paired`), and one "compare" record per workload {"name", "unit", "ours",
  "theirs", "ratio" = the median of the rounds' ours / theirs, "ratios", "rounds"}. DPO:
  `dpo_rows` rows of `dpo_seq_len` tokens packed with pairs of `dpo_sequence_len`-token sequences
  (prompt `prompt_len`; with `dpo_share_prompt` each pair's prompt once), TRL the same pairs
  unpacked, one batch. rl_share_prompt: our GRPO iteration with config.ppo.share_prompt.
  torch_threads: torch's intra-op threads (None: `num_threads()`)."""
  if rounds < 1:
    raise ValueError(f"--compare_rounds={rounds}: each workload needs at least one round")
  # Read once, when torch loads OpenMP: spinning threads stall every op on an oversubscribed
  # machine (HF generate 20x slower on a 2-core VM under load); passive waits do not.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch
  import transformers
  import trl

  if cfg.family != "llama" or cfg.dtype != "float32" or cfg.param_dtype != "float32":
    raise ValueError(
        "--compare runs the Llama-family models in float32 (--dtype=float32 "
        "--param_dtype=float32)"
    )
  import datasets

  datasets.disable_progress_bars()
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(torch_threads or num_threads())
  torch.manual_seed(0)
  versions = {
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "trl": trl.__version__,
      "torch_threads": torch.get_num_threads(),
      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
  }
  tokenizer = word_tokenizer(cfg.vocab_size)
  remat = cfg.remat != "none"
  pairs = dpo_rows * bench.pairs_per_row(
      "dpo_step", dpo_seq_len, dpo_sequence_len, "sequence_len"
  )  # as bench.dpo_step packs them
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    tmp = Path(tmp)
    policy_dir, reward_dir = export_models(cfg, tokenizer, tmp)
    for batch in gen_batches:
      yield from paired(
          f"compare_generate_b{batch}",
          "new_tokens_per_s",
          rounds,
          ("generate", "hf_generate"),
          lambda: bench.generate_bench(cfg, batch, prompt_len, new_tokens, repeats),
          lambda: {**hf_generate(policy_dir, batch, prompt_len, new_tokens, repeats), **versions},
      )
    yield from paired(
        "compare_dpo_step",
        "tokens_per_s",
        rounds,
        ("dpo_step", "trl_dpo_step"),
        lambda: bench.dpo_step(
            cfg,
            dpo_rows,
            dpo_seq_len,
            repeats,
            None,
            sequence_len=dpo_sequence_len,
            prompt_len=prompt_len,
            share_prompt=dpo_share_prompt,
            list_logits=dpo_list_logits,
        ),
        lambda: {
            **trl_dpo_step(
                policy_dir, tokenizer, pairs, dpo_sequence_len, prompt_len, repeats, tmp, remat
            ),
            **versions,
        },
    )
    yield from paired(
        "compare_grpo_iteration",
        "completions_per_s",
        rounds,
        ("grpo_iteration", "trl_grpo_step"),
        lambda: bench.grpo_iteration(
            cfg,
            rl_prompts,
            rl_samples,
            prompt_len,
            rl_new_tokens,
            repeats,
            kl_beta=kl_beta,
            share_prompt=rl_share_prompt,
        ),
        lambda: {
            **trl_grpo_step(
                policy_dir,
                reward_dir,
                tokenizer,
                rl_prompts,
                rl_samples,
                prompt_len,
                rl_new_tokens,
                kl_beta,
                repeats,
                tmp,
                remat,
            ),
            **versions,
        },
    )


def table(rows: list[dict]) -> str:
  """The "compare" records as a text table: name, unit, ours, theirs (median figures), the median
  ratio ours / theirs, and the range of the rounds' ratios."""
  lines = [f"{'workload':<24} {'unit':<18} {'ours':>10} {'theirs':>10} {'ratio':>7}  rounds"]
  for r in rows:
    ratios = r.get("ratios", [r["ratio"]])
    spread = f"{len(ratios)}: {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "1"
    lines.append(
        f"{r['name']:<24} {r['unit']:<18} {r['ours']:>10.1f} {r['theirs']:>10.1f} "
        f"{r['ratio']:>7.2f}  {spread}"
    )
  return "\n".join(lines)
