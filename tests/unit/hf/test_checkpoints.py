"""HF checkpoints: our model loaded from transformers' safetensors computes what PyTorch computes.

Tiny random-weight models of each supported family are built with transformers, saved as safetensors
and loaded with `rlhf_jax.hf`; transformers-PyTorch is the reference for logits, greedy generation
and reward scores. Exports go back through transformers' own `from_pretrained`.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/hf/test_checkpoints.py.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from rlhf_jax.data.tokenizer import ChatTemplateError
from rlhf_jax.hf import checkpoints as hf
from rlhf_jax.models import ModelConfig, abstract_model
from rlhf_jax.train import checkpoint
from tests.helpers.hf import (
    MODELS,
    _assert_bit_exact,
    _our_logits,
    _padded_batch,
    _save,
    build_hf_dirs,
)


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
  """PyTorch's intra-op threads fight XLA's for the CPU: one thread runs these tiny models ~100x
  faster than two on a busy 2-core machine."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  return build_hf_dirs(tmp_path_factory)


def _torch_outputs(model_dir, tokens, mask, positions, cls=transformers.AutoModelForCausalLM):
  model = cls.from_pretrained(model_dir)  # eval mode: no dropout
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )
  return out.logits.numpy()


# --- parity with PyTorch ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_pytorch_with_right_and_left_padding(hf_dirs, name):
  graphdef, params, cfg = hf.load_hf(hf_dirs[name])
  assert (cfg.family, cfg.qkv_bias) == ("gpt2" if name == "gpt2" else "llama", name == "qwen2")
  assert cfg.tie_embeddings == (name in ("llama_tied", "gpt2"))
  tokens, mask, positions = _padded_batch()
  ours = _our_logits(graphdef, params, tokens, mask, positions)
  ref = _torch_outputs(hf_dirs[name], tokens, mask, positions)
  assert np.abs(ref[mask]).max() > 1.0  # not a degenerate model
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


def test_scalar_head_scores_like_sequence_classification(tmp_path, tokenizer_dirs):
  model_dir = _save(
      tmp_path / "rm", "llama", cls=transformers.AutoModelForSequenceClassification, num_labels=1
  )
  graphdef, params, cfg = hf.load_hf(model_dir, head="scalar")
  assert cfg.head == "scalar" and params["score"].shape == (64,)
  tokens, mask, positions = _padded_batch(seed=1)
  ours = _our_logits(graphdef, params, tokens, mask, positions)  # [B, T]
  last = np.array([np.nonzero(row)[0][-1] for row in mask])
  ours_last = ours[np.arange(len(last)), last]
  ref = _torch_outputs(
      model_dir, tokens, mask, positions, cls=transformers.AutoModelForSequenceClassification
  )
  assert ref.shape == (3, 1)
  np.testing.assert_allclose(ours_last, ref[:, 0], atol=1e-4, rtol=0)

  # Exported with a tokenizer whose pad token is not EOS, transformers scores it the same.
  out = hf.export_hf(
      params, cfg, tmp_path / "export", tokenizer=hf.load_hf_tokenizer(tokenizer_dirs["with_pad"])
  )
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["LlamaForSequenceClassification"]
  assert config["pad_token_id"] == 0 and len(config["id2label"]) == 1
  again = _torch_outputs(
      out, tokens, mask, positions, cls=transformers.AutoModelForSequenceClassification
  )
  np.testing.assert_array_equal(again, ref)
  _assert_bit_exact(hf.load_hf(out, head="scalar")[1], params)


# --- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_transformers_and_round_trips_bit_exact(hf_dirs, tmp_path, name):
  graphdef, params, cfg = hf.load_hf(hf_dirs[name])
  model_type = "mistral" if name == "mistral" else None  # Llama and Mistral compute alike
  out = hf.export_hf(params, cfg, tmp_path / "export", model_type=model_type)
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary directory left behind
  config = json.loads((out / "config.json").read_text())
  original = json.loads(open(os.path.join(hf_dirs[name], "config.json")).read())
  assert (config["model_type"], config["architectures"]) == (
      original["model_type"],
      original["architectures"],
  )

  # transformers reads the same weights back, so it computes exactly the original's logits...
  tokens, mask, positions = _padded_batch(seed=2)
  ref = _torch_outputs(hf_dirs[name], tokens, mask, positions)
  again = _torch_outputs(out, tokens, mask, positions)
  np.testing.assert_array_equal(again, ref)
  ours = _our_logits(graphdef, params, tokens, mask, positions)
  np.testing.assert_allclose(ours[mask], again[mask], atol=1e-4, rtol=0)
  # ... and its config maps back to ours; load -> export -> load is bit-exact.
  assert hf.config_from_hf(config) == cfg
  _assert_bit_exact(hf.load_hf(out)[1], params)


def test_export_shards_above_max_shard_bytes_and_casts_dtype(hf_dirs, tmp_path):
  _, params, cfg = hf.load_hf(hf_dirs["gpt2"])
  out = hf.export_hf(params, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (out / "model.safetensors").exists()
  assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(
      v.nbytes for f in files for v in load_file(str(out / f)).values()
  )
  _assert_bit_exact(hf.load_hf(out)[1], params)
  tokens, mask, positions = _padded_batch(seed=3)
  np.testing.assert_array_equal(
      _torch_outputs(out, tokens, mask, positions),
      _torch_outputs(hf_dirs["gpt2"], tokens, mask, positions),
  )

  half = hf.export_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
  _, bf16_params, _ = hf.load_hf(half, param_dtype="bfloat16")  # bf16 on disk, read as bf16
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  _assert_bit_exact(bf16_params, expected)


def test_export_is_atomic_and_refuses_to_overwrite(hf_dirs, tmp_path, monkeypatch):
  _, params, cfg = hf.load_hf(hf_dirs["llama"])
  out = hf.export_hf(params, cfg, tmp_path / "export")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf.export_hf(params, cfg, out)

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(hf, "save_file", fail)
  with pytest.raises(OSError, match="disk full"):
    hf.export_hf(params, cfg, tmp_path / "new")
  with pytest.raises(OSError, match="disk full"):
    hf.export_hf(params, cfg, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["export"]  # nothing half-written, the old one intact
  monkeypatch.undo()
  _assert_bit_exact(hf.load_hf(out)[1], params)


# --- configs and errors -------------------------------------------------------------------------

LLAMA31_8B = {  # Meta-Llama-3.1-8B's config.json (transformers 4 format)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_config_from_hf_maps_a_real_llama_config_in_both_formats():
  cfg = hf.config_from_hf(LLAMA31_8B)
  assert (
      cfg.vocab_size,
      cfg.num_layers,
      cfg.embed_dim,
      cfg.num_heads,
      cfg.kv_heads,
      cfg.dim_per_head,
      cfg.mlp_dim,
      cfg.max_seq_len,
  ) == (128256, 32, 4096, 32, 8, 128, 14336, 131072)
  assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.qkv_bias) == (
      500000.0,
      1e-5,
      False,
      False,
  )
  assert dict(cfg.rope_scaling) == LLAMA31_8B["rope_scaling"]
  # transformers 5 reads our config.json (and so does 4: the old fields are written too) ...
  exported = hf.config_to_hf(cfg)
  v5 = transformers.AutoConfig.for_model(**copy.deepcopy(exported))  # it edits its arguments
  assert v5.rope_parameters == {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
  assert exported["rope_scaling"] == LLAMA31_8B["rope_scaling"] and exported["rope_theta"] == 5e5
  # ... and we read transformers 5's format (rope_parameters).
  assert hf.config_from_hf(v5.to_dict()) == cfg
  assert cfg.num_params() == 8_030_261_248  # the published size of Llama-3.1-8B


@pytest.mark.parametrize(
    "hf_config, match",
    [
        (
            {"model_type": "gemma"},
            r"model_type 'gemma' is not supported.*'gpt2', 'llama', 'mistral'",
        ),
        (
            {**LLAMA31_8B, "architectures": ["LlamaForTokenClassification"]},
            r"architectures \['LlamaForTokenClassification'\].*LlamaForCausalLM",
        ),
        (
            {**LLAMA31_8B, "rope_scaling": {"type": "linear", "factor": 2.0}},
            r"rope_scaling has rope type 'linear'",
        ),
        (
            {
                **LLAMA31_8B,
                "rope_scaling": None,
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0},
            },
            r"rope_parameters has rope type 'yarn'",
        ),
        (
            {
                **LLAMA31_8B,
                "model_type": "mistral",
                "architectures": ["MistralForCausalLM"],
                "sliding_window": 4096,
            },
            r"sliding_window=4096 < max_position_embeddings=131072",
        ),
        (
            {**LLAMA31_8B, "model_type": "mistral", "architectures": ["MistralForCausalLM"]},
            r"sliding_window=4096",
        ),  # absent = MistralConfig's default window
        (
            {
                **LLAMA31_8B,
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 4096,
                "max_window_layers": 4,
            },
            r"sliding_window=4096",
        ),
        ({**LLAMA31_8B, "attention_bias": True}, r"attention_bias=True"),
        ({**LLAMA31_8B, "hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ({**LLAMA31_8B, "hidden_size": None}, r"no 'hidden_size'"),
    ],
)
def test_unsupported_configs_raise_value_errors_naming_the_field(hf_config, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(hf_config)


def test_sliding_windows_no_sequence_reaches_are_accepted():
  mistral = {**LLAMA31_8B, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
  assert hf.config_from_hf({**mistral, "sliding_window": None}).family == "llama"
  assert hf.config_from_hf({**mistral, "sliding_window": 131072}).family == "llama"
  qwen = {
      **LLAMA31_8B,
      "model_type": "qwen2",
      "architectures": ["Qwen2ForCausalLM"],
      "sliding_window": 4096,
      "use_sliding_window": False,
  }
  assert hf.config_from_hf(qwen).qkv_bias


def _rewrite_weights(model_dir, edit) -> None:
  file = os.path.join(model_dir, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_bad_checkpoints_raise_value_errors_naming_the_tensor(tmp_path):
  q = "model.layers.1.self_attn.q_proj.weight"
  missing = _save(tmp_path / "missing", "llama")
  _rewrite_weights(missing, lambda t: t.pop(q))
  with pytest.raises(
      ValueError, match=rf"missing tensor\(s\) \['{q}'\]; expected shape \[64, 64\]"
  ):
    hf.load_hf(missing)

  shape = _save(tmp_path / "shape", "llama")
  _rewrite_weights(shape, lambda t: t.update({q: t[q][:32]}))
  with pytest.raises(ValueError, match=rf"'{q}' has shape \[32, 64\], expected \[64, 64\]"):
    hf.load_hf(shape)

  extra = _save(tmp_path / "extra", "llama")
  _rewrite_weights(
      extra, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
  )
  with pytest.raises(
      ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.o_proj"
  ):
    hf.load_hf(extra)

  # Buffers that are not parameters are ignored.
  buffers = _save(tmp_path / "buffers", "llama")
  _rewrite_weights(
      buffers,
      lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}),
  )
  hf.load_hf(buffers)

  pickle_only = tmp_path / "pickle"
  pickle_only.mkdir()
  (pickle_only / "config.json").write_text(json.dumps({**LLAMA31_8B}))
  (pickle_only / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(
      ValueError, match=r"only PyTorch pickle weights \(pytorch_model.bin\).*" r"safetensors"
  ):
    hf.load_hf(pickle_only)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_hf(tmp_path / "nowhere")


def test_original_gpt2_names_and_buffers_load(hf_dirs, tmp_path):
  """The Hub's own gpt2 checkpoint has no "transformer." prefix and stores causal-mask buffers."""
  model_dir = tmp_path / "gpt2"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(open(os.path.join(hf_dirs["gpt2"], "config.json")).read())
  tensors = {
      k.removeprefix("transformer."): v
      for k, v in load_file(os.path.join(hf_dirs["gpt2"], "model.safetensors")).items()
  }
  for i in range(2):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
  _assert_bit_exact(hf.load_hf(model_dir)[1], hf.load_hf(hf_dirs["gpt2"])[1])


def test_head_must_match_the_checkpoint(hf_dirs, tmp_path):
  with pytest.raises(ValueError, match="holds a LlamaForCausalLM: load it with head='lm'"):
    hf.load_hf(hf_dirs["llama"], head="scalar")
  two = _save(
      tmp_path / "two", "llama", cls=transformers.AutoModelForSequenceClassification, num_labels=2
  )
  with pytest.raises(ValueError, match="num_labels=2"):
    hf.load_hf(two, head="scalar")
  with pytest.raises(ValueError, match="load it with head='scalar'"):
    hf.load_hf(two)


# --- tokenizers and our own exports -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  """Word-level tokenizers: "no_pad" has only EOS (as Llama and GPT-2 ship), "with_pad" has a pad
  token (id 0) and a chat template whose markers are tokens."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  markers = ["<|system|>", "<|user|>", "<|assistant|>"]
  words = ["<pad>", "<s>", "</s>"] + markers + [f"w{i}" for i in range(40)]
  out = {}
  for name in ("no_pad", "with_pad"):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(bos_token="<s>", eos_token="</s>")
    if name == "with_pad":
      specials.update(pad_token="<pad>", additional_special_tokens=markers)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    if name == "with_pad":
      fast.chat_template = (
          "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
          "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
      )
    out[name] = tmp_path_factory.mktemp(name)
    fast.save_pretrained(str(out[name]))
  return out


def test_load_hf_tokenizer_ensures_a_pad_token_and_checks_the_chat_template(
    tokenizer_dirs, tmp_path
):
  no_pad = hf.load_hf_tokenizer(tokenizer_dirs["no_pad"])
  assert no_pad.pad_token == no_pad.eos_token == "</s>" and no_pad.pad_token_id == 2
  with_pad = hf.load_hf_tokenizer(tokenizer_dirs["with_pad"])
  assert with_pad.pad_token_id == 0 and with_pad.eos_token_id == 2

  # A chat template that writes a marker the tokenizer would split is refused.
  config_file = tokenizer_dirs["with_pad"] / "tokenizer_config.json"
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in os.listdir(tokenizer_dirs["with_pad"]):
    (bad / f).write_bytes((tokenizer_dirs["with_pad"] / f).read_bytes())
  (bad / "chat_template.jinja").write_text("<|tool|> {{ messages[0]['content'] }}")
  assert config_file.exists()
  with pytest.raises(ChatTemplateError, match=r"<\|tool\|>"):
    hf.load_hf_tokenizer(bad)


def test_export_scalar_head_refuses_pad_equal_to_eos(tmp_path, tokenizer_dirs):
  cfg = ModelConfig(
      vocab_size=64, num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, head="scalar"
  )
  _, abstract, _ = abstract_model(cfg)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  with pytest.raises(ValueError, match="pad_token_id = eos_token_id = 2"):
    hf.export_hf(
        params, cfg, tmp_path / "rm", tokenizer=hf.load_hf_tokenizer(tokenizer_dirs["no_pad"])
    )
  with pytest.raises(ValueError, match="needs pad_token_id"):
    hf.export_hf(params, cfg, tmp_path / "rm")
  assert not os.listdir(tmp_path)


def test_import_hf_writes_a_params_export_for_init_from(hf_dirs, tmp_path, tokenizer_dirs):
  model_dir = tmp_path / "llama"
  model_dir.mkdir()
  for src in (hf_dirs["llama"], tokenizer_dirs["no_pad"]):
    for f in os.listdir(src):
      (model_dir / f).write_bytes(open(os.path.join(src, f), "rb").read())
  export = hf.import_hf(model_dir, tmp_path / "export")
  _, params, cfg = hf.load_hf(model_dir)
  saved, metadata = checkpoint.load_params(export)
  assert metadata["model"] == cfg.to_dict()
  _assert_bit_exact(saved, jax.device_get(params))
  tokenizer = hf.load_hf_tokenizer(metadata["tokenizer"])
  assert tokenizer.pad_token == "</s>"
