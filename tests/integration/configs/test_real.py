"""The real-model experiment files (`experiments/llama3_1b_*.py`, `experiments/qwen25_05b_*.py`):
every hardware preset is a valid 8-device config, and each file runs its pipeline stage on CPU from
the same `get_config(...)`, with sizes overridden, on a tiny random HF checkpoint (built with
transformers) and tiny local data files in the public schemas (UltraChat messages, HH-RLHF).

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/configs/test_real.py.
"""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.algorithms import common, dpo, ppo, reward, sft
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.real import chat_rows, experiment, hh_rows, write_jsonl

# --- end to end on a tiny random checkpoint ----------------------------------------------------


def save_tiny_hf(out_dir, model_type: str, texts: list[str]) -> str:
  """A random 2-layer HF checkpoint of `model_type` (safetensors) with a BPE tokenizer trained on
  `texts` (pad / bos / eos ids 0 / 1 / 2 and a chat template) next to it."""
  import torch
  import transformers

  from rlhf_jax.data import train_tokenizer

  tokenizer = train_tokenizer(texts, 384, out_dir)
  config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
  # vocab_size above the tokenizer's (as real checkpoints pad it): Qwen2's tokenizer class adds one.
  config = config_cls(
      vocab_size=512,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
  )
  assert len(tokenizer) <= config.vocab_size
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
  finally:
    torch.set_num_threads(threads)
  return str(out_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Tiny HF checkpoints (Llama, Qwen2) and data files in the public schemas."""
  root = tmp_path_factory.mktemp("real")
  files = {
      "chat": write_jsonl(root / "chat.jsonl", chat_rows(24)),
      "chat_eval": write_jsonl(root / "chat_eval.jsonl", chat_rows(8, offset=100)),
      "hh": write_jsonl(root / "hh.jsonl", hh_rows(24)),
      "hh_eval": write_jsonl(root / "hh_eval.jsonl", hh_rows(8, offset=100)),
  }
  texts = [json.dumps(r) for r in chat_rows(24) + hh_rows(24)] * 3
  files["llama"] = save_tiny_hf(root / "llama", "llama", texts)
  files["qwen2"] = save_tiny_hf(root / "qwen2", "qwen2", texts)
  return files


def shrink(c, model_dir: str, source: str, eval_source: str, *, mesh=(2, 2, 2), accum_steps=2):
  """The experiment's config at test size: the same fields, smaller numbers, local files.
  mesh None: the preset's."""
  c.hf_model_dir = model_dir
  if mesh is not None:
    c.mesh.shape = mesh
  c.train.update(
      steps=2,
      batch_size=8,
      seq_len=128,
      accum_steps=accum_steps,
      log_every=1,
      eval_every=2,
      eval_batches=1,
      checkpoint_every=2,
  )
  c.optim.update(warmup_steps=1)
  c.data.update(source=source, eval_source=eval_source, split="", eval_split="")
  return c


def finite_eval(workdir) -> dict:
  rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/loss" in r]
  assert rows and np.isfinite(rows[-1]["eval/loss"]), rows
  return rows[-1]


@pytest.mark.slow
def test_llama_sft_then_dpo_rm_and_ppo_from_the_experiment_files(world, tmp_path):
  # SFT from the HF checkpoint (imported into WORKDIR/hf_import) on UltraChat-style chats.
  c = shrink(
      experiment("llama3_1b_sft", "tpu_v5e_8"), world["llama"], world["chat"], world["chat_eval"]
  )
  result = sft.train(c, str(tmp_path / "sft"))
  assert result["step"] == 2 and np.isfinite(result["eval/loss"])
  saved = json.loads((tmp_path / "sft" / "config.json").read_text())
  assert (saved["data"]["schema"], saved["data"]["split"]) == ("", "")  # as the driver read it
  assert saved["init_from"] == str(tmp_path / "sft" / "hf_import")
  assert saved["data"]["tokenizer"] == str(tmp_path / "sft" / "hf_import" / "tokenizer")
  assert saved["data"]["source"] == str(tmp_path / "sft" / "data" / "train.jsonl")
  _, meta = checkpoint.load_params(tmp_path / "sft" / "export")
  assert meta["model"]["num_layers"] == 2 and meta["model"]["remat"] == "full"
  sft_export = str(tmp_path / "sft" / "export")

  # DPO from the SFT export on HH-RLHF-style dialogues.
  c = shrink(
      experiment("llama3_1b_dpo", "h100x8,hh"), world["llama"], world["hh"], world["hh_eval"]
  )
  c.init_from = sft_export
  result = dpo.train(c, str(tmp_path / "dpo"))
  assert result["step"] == 2 and np.isfinite(result["eval/loss"])
  assert not (tmp_path / "dpo" / "hf_import").exists()  # init_from given: nothing imported
  assert (tmp_path / "dpo" / "export").is_dir()

  # The reward model, from the SFT export.
  c = shrink(
      experiment("llama3_1b_rm", "tpu_v5e_8,hh"), world["llama"], world["hh"], world["hh_eval"]
  )
  c.init_from = sft_export
  result = reward.train(c, str(tmp_path / "rm"))
  assert result["step"] == 2 and np.isfinite(result["reward_std"])
  finite_eval(tmp_path / "rm")

  # PPO on HH's prompts: without a reward model it stops, naming the field.
  def ppo_config():
    c = experiment("llama3_1b_ppo", "tpu_v5e_8,hh")
    c.update(hf_model_dir=world["llama"], init_from=sft_export)
    c.mesh.shape = (2, 2, 2)
    c.data.update(source=world["hh"], split="")
    c.ppo.update(
        iterations=1,
        prompts_per_iteration=8,
        minibatches=1,
        epochs=1,
        max_prompt_len=48,
        max_new_tokens=8,
    )
    return c

  with pytest.raises(ValueError, match="config.ppo.reward.helpful is empty"):
    ppo.train(ppo_config(), str(tmp_path / "ppo_no_rm"))
  c = ppo_config()
  c.ppo.reward.helpful = str(tmp_path / "rm" / "export")
  result = ppo.train(c, str(tmp_path / "ppo"))
  assert (c.data.source, c.data.schema) == (str(tmp_path / "ppo" / "data" / "train.jsonl"), "")
  assert result["iterations"] == 1
  rows = [r for r in metrics.read_jsonl(tmp_path / "ppo" / "metrics.jsonl") if "ppo/reward" in r]
  assert rows and np.isfinite(rows[0]["ppo/reward"]) and np.isfinite(rows[0]["ppo/kl"])
  prompts = [json.loads(line) for line in open(tmp_path / "ppo" / "data" / "train.jsonl")]
  assert len(prompts) == 24 and all(isinstance(p["prompt"], list) for p in prompts)
  params, meta = checkpoint.load_params(tmp_path / "ppo" / "export")
  assert meta["model"]["head"] == "lm"
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_qwen_sft_and_dpo_straight_from_the_checkpoint(world, tmp_path):
  # The presets' meshes: h100x8 is data parallel (8, 1, 1), tpu_v5e_8 FSDP (1, 8, 1).
  c = shrink(
      experiment("qwen25_05b_sft", "h100x8"),
      world["qwen2"],
      world["chat"],
      world["chat_eval"],
      mesh=None,
      accum_steps=1,
  )
  result = sft.train(c, str(tmp_path / "sft"))
  assert result["step"] == 2 and np.isfinite(result["eval/loss"])
  _, meta = checkpoint.load_params(tmp_path / "sft" / "export")
  assert meta["model"]["qkv_bias"] is True

  # DPO with init_from empty: policy and reference are the HF checkpoint itself.
  c = shrink(
      experiment("qwen25_05b_dpo", "tpu_v5e_8,hh"),
      world["qwen2"],
      world["hh"],
      world["hh_eval"],
      mesh=None,
      accum_steps=1,
  )
  result = dpo.train(c, str(tmp_path / "dpo"))
  assert result["step"] == 2 and np.isfinite(result["eval/loss"])
  assert (tmp_path / "dpo" / "hf_import").is_dir() and (tmp_path / "dpo" / "export").is_dir()
  # A rerun of the finished command neither imports nor converts again.
  stamp = (tmp_path / "dpo" / "hf_import").stat().st_mtime_ns
  again = shrink(
      experiment("qwen25_05b_dpo", "tpu_v5e_8,hh"),
      world["qwen2"],
      world["hh"],
      world["hh_eval"],
      mesh=None,
      accum_steps=1,
  )
  common.resolve_inputs(again, str(tmp_path / "dpo"))
  assert again.init_from == str(tmp_path / "dpo" / "hf_import")
  assert (tmp_path / "dpo" / "hf_import").stat().st_mtime_ns == stamp
