"""The real-model experiment files (`experiments/llama3_1b_*.py`, `experiments/qwen25_05b_*.py`):
every hardware preset is a valid 8-device config, and each file runs its pipeline stage on CPU from
the same `get_config(...)`, with sizes overridden, on a tiny random HF checkpoint (built with
transformers) and tiny local data files in the public schemas (UltraChat messages, HH-RLHF).

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/configs/test_real.py.
"""

import math

import pytest

from rlhf_jax import sharding
from rlhf_jax.algorithms import common
from rlhf_jax.configs import real as real_configs
from rlhf_jax.data import sources
from rlhf_jax.models import ModelConfig
from tests.helpers.real import chat_rows, experiment, hh_rows, write_jsonl

FILES = {
    "llama3_1b_sft": "llama3_1b",
    "llama3_1b_dpo": "llama3_1b",
    "llama3_1b_rm": "llama3_1b",
    "llama3_1b_ppo": "llama3_1b",
    "qwen25_05b_sft": "qwen25_05b",
    "qwen25_05b_dpo": "qwen25_05b",
}


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
