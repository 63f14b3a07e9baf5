"""The real-model experiment files (`experiments/llama3_1b_*.py`, `experiments/qwen25_05b_*.py`):
every hardware preset is a valid 8-device config, and each file runs its pipeline stage on CPU from
the same `get_config(...)`, with sizes overridden, on a tiny random HF checkpoint (built with
transformers) and tiny local data files in the public schemas (UltraChat messages, HH-RLHF)."""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.algorithms import common, dpo, ppo, reward, sft
from rlhf_jax.configs import real as real_configs
from rlhf_jax.data import sources
from rlhf_jax.models import ModelConfig
from rlhf_jax.train import checkpoint, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {
    "llama3_1b_sft": "llama3_1b",
    "llama3_1b_dpo": "llama3_1b",
    "llama3_1b_rm": "llama3_1b",
    "llama3_1b_ppo": "llama3_1b",
    "qwen25_05b_sft": "qwen25_05b",
    "qwen25_05b_dpo": "qwen25_05b",
}


def experiment(name: str, arg: str = ""):
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --- presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("hardware", real_configs.HARDWARE)
def test_every_preset_is_a_valid_8_device_config(name, hardware):
  c = experiment(name, hardware)
  assert math.prod(c.mesh.shape) == 8 and -1 not in c.mesh.shape
  mesh = sharding.make_mesh(c.mesh.shape)  # the 8 fake CPU devices
  if c.algorithm == "ppo":
    p = c.ppo
    rows = p.prompts_per_iteration * p.samples_per_prompt
    assert rows % p.minibatches == 0 and rows // p.minibatches == c.train.batch_size
    sharding.check_batch_size(rows // p.minibatches // p.accum_steps, mesh)
    sharding.check_batch_size(p.prompts_per_iteration, mesh)
    assert c.train.seq_len == p.max_prompt_len + p.max_new_tokens
    assert not p.reward.helpful and not p.reward.gold and p.eval_every == 0
  else:
    common.make_mesh(c)  # batch / accum_steps divides the batch shards
  # The architecture the planner reads is the checkpoint's, and the mesh divides it.
  fields = {k: v for k, v in c.model.to_dict().items() if k in ModelConfig.__dataclass_fields__}
  cfg = ModelConfig(**fields)
  sharding.validate_model_mesh(cfg, mesh)
  assert (cfg.dtype, cfg.param_dtype, c.lora.rank) == ("bfloat16", "float32", 0)
  assert c.hf_model_dir == real_configs.MODELS[FILES[name]]["hf_model_dir"]
  assert not c.init_from and c.data.schema and not c.data.tokenizer
  # The default preset is one of the two.
  assert experiment(name).to_dict() == experiment(name, real_configs.DEFAULT_HARDWARE).to_dict()


def test_architectures_match_the_checkpoints_parameter_counts():
  llama = ModelConfig(**real_configs.MODELS["llama3_1b"]["arch"])
  qwen = ModelConfig(**real_configs.MODELS["qwen25_05b"]["arch"])
  assert llama.num_params() == 1_235_814_400  # Llama-3.2-1B
  assert qwen.num_params() == 494_032_768  # Qwen2.5-0.5B


def test_data_set_names_and_bad_presets():
  c = experiment("llama3_1b_dpo", "tpu_v5e_8,hh")
  assert (c.data.source, c.data.schema, c.data.split, c.data.eval_split) == (
      "Anthropic/hh-rlhf",
      "hh",
      "train",
      "test",
  )
  c = experiment("llama3_1b_ppo", "h100x8")
  assert (c.data.source, c.data.split, c.data.eval_source) == (
      "HuggingFaceH4/ultrafeedback_binarized",
      "train_gen",
      "",
  )
  with pytest.raises(ValueError, match="hardware preset 'v5e'"):
    experiment("llama3_1b_sft", "v5e")
  with pytest.raises(ValueError, match="data set 'ultrachat'"):
    experiment("llama3_1b_dpo", "h100x8,ultrachat")


# --- data sets ----------------------------------------------------------------------------------


def hh_rows(n: int, offset: int = 0) -> list[dict]:
  """HH-RLHF-style dialogues: a shared context, the better and the worse last Assistant turn."""
  rows = []
  for i in range(offset, offset + n):
    context = f"\n\nHuman: what is {i} plus two?"
    if i % 4 == 0:  # multi-turn
      context = f"\n\nHuman: hello\n\nAssistant: hi there{context}"
    rows.append(
        {
            "chosen": f"{context}\n\nAssistant: it is {i + 2}, great",
            "rejected": f"{context}\n\nAssistant: awful, no idea",
        }
    )
  return rows


def chat_rows(n: int, offset: int = 0) -> list[dict]:
  """UltraChat-200k-style rows: prompt, prompt_id and messages (sometimes ending on a user turn)."""
  rows = []
  for i in range(offset, offset + n):
    q = f"what is {i} plus two?"
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": f"it is {i + 2}"}]
    if i % 3 == 0:
      messages += [
          {"role": "user", "content": "and plus one?"},
          {"role": "assistant", "content": f"it is {i + 1}"},
      ]
    if i % 5 == 0:
      messages += [{"role": "user", "content": "thanks"}]  # dropped: nothing to learn from
    rows.append({"prompt": q, "prompt_id": f"id{i}", "messages": messages})
  return rows


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_messages_schema_keeps_the_chat_and_drops_trailing_user_turns(tmp_path):
  path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(6))
  records = sources.convert(path, "sft", schema="messages")
  assert len(records) == 6 and all("prompt" not in r for r in records)
  assert records[0]["prompt_id"] == "id0" and records[0]["messages"][-1] == {
      "role": "assistant",
      "content": "it is 1",
  }
  prompts = sources.convert(path, "prompt", schema="messages")
  assert prompts[1] == {"prompt": [{"role": "user", "content": "what is 1 plus two?"}]}


def test_preference_schema_gives_pairs_and_distinct_prompts(tmp_path):
  path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(4) + hh_rows(2))  # 2 prompts twice
  pairs = sources.convert(path, "pairwise", schema="hh")
  assert len(pairs) == 6 and pairs[1]["chosen"] == "it is 3, great"
  assert pairs[0]["prompt"] == [
      {"role": "user", "content": "hello"},
      {"role": "assistant", "content": "hi there"},
      {"role": "user", "content": "what is 0 plus two?"},
  ]
  prompts = sources.convert(path, "prompt", schema="hh")
  assert [p["prompt"] for p in prompts] == [p["prompt"] for p in pairs[:4]]
  with pytest.raises(ValueError, match="holds pairwise records, but config.data.kind='ranking'"):
    sources.convert(path, "ranking", schema="hh")
  with pytest.raises(ValueError, match="schema='messages' does not apply"):
    sources.convert(path, "pairwise", schema="messages")


def test_hub_names_go_through_load_dataset_and_are_converted_once(tmp_path, monkeypatch):
  import datasets

  calls = []

  def fake_load_dataset(name, split):  # no network in tests: the hub's answer, made up
    calls.append((name, split))
    return datasets.Dataset.from_list(hh_rows(5))

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  out = str(tmp_path / "data" / "train.jsonl")
  assert (
      sources.resolve_source("Anthropic/hh-rlhf", "pairwise", out, schema="hh", split="train")
      == out
  )
  assert calls == [("Anthropic/hh-rlhf", "train")]
  assert len(open(out).readlines()) == 5
  sources.resolve_source("Anthropic/hh-rlhf", "pairwise", out, schema="hh", split="train")
  assert len(calls) == 1  # reused
  sources.resolve_source("Anthropic/hh-rlhf", "pairwise", out, schema="hh", split="test")
  assert calls[-1] == ("Anthropic/hh-rlhf", "test")
  # Our own local records need nothing; a missing local path is not taken for a hub name.
  assert sources.resolve_source("toy", "sft", out) == "toy"
  local = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "a", "completion": "b"}])
  assert sources.resolve_source(local, "sft", out) == local
  # ... it is passed through (the driver's reader reports it after the config checks), and with a
  # schema to convert from it is an error naming it.
  missing = str(tmp_path / "missing.jsonl")
  assert sources.resolve_source(missing, "sft", out) == missing
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    sources.resolve_source(missing, "pairwise", out, schema="hh")


def test_missing_hf_model_dir_is_named(tmp_path):
  c = experiment("llama3_1b_sft", "h100x8")
  c.hf_model_dir = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match="config.hf_model_dir=.*no config.json.*hf download"):
    common.resolve_inputs(c, str(tmp_path / "run"))


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
