"""HF `config.json` <-> `ModelConfig` for the supported model types (see `rlhf_jax.hf`).

Both the transformers-5 (`rope_parameters`) and the older (`rope_theta`, `rope_scaling`) RoPE
fields are read, and both are written, so either version of transformers reads our exports. A
feature our model does not implement (another RoPE scaling, sliding-window attention, other
activations or biases) is refused with a ValueError naming the field, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Mapping

from rlhf_jax.models import ModelConfig

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
}
_GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation we compute


def _require(hf_config: Mapping, key: str):
  if hf_config.get(key) is None:
    raise ValueError(
        f"HF config.json has no {key!r}, which a {hf_config.get('model_type')} " "config needs"
    )
  return hf_config[key]


def _rope(hf: Mapping) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling or None) from transformers-5 `rope_parameters` or the old fields."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = hf.get("rope_scaling")
  field = "rope_scaling" if legacy else "rope_parameters"
  scaling = dict(legacy) if legacy else params  # transformers 5 also lets rope_scaling win
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise ValueError(
        f"HF config {field} has rope type {kind!r} ({field}={scaling}); only "
        "'llama3' (and unscaled 'default') RoPE is supported"
    )
  out = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor") if k in scaling}
  out["original_max_position_embeddings"] = scaling.get(
      "original_max_position_embeddings", hf.get("max_position_embeddings")
  )
  return theta, {"rope_type": "llama3", **out}


def _check_sliding_window(hf: Mapping, model_type: str, num_layers: int, max_pos: int) -> None:
  """Sliding-window attention is not implemented: refuse any window a sequence could reach."""
  if model_type == "mistral":
    window = hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
    sliding = window is not None
  elif model_type == "qwen2":
    window = hf.get("sliding_window", 4096)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    sliding = (
        bool(hf.get("use_sliding_window"))
        and window is not None
        and "sliding_attention" in layer_types
    )
  else:
    return
  if sliding and window < max_pos:
    raise ValueError(
        f"HF config sliding_window={window} < max_position_embeddings={max_pos}: sliding-window "
        "attention is not supported (only windows no sequence can reach); set sliding_window to "
        "null only if the model was trained without it"
    )


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """ModelConfig (head "lm", float32) from an HF `config.json` dict.

  Raises:
    ValueError: unsupported model_type / architectures, a feature we do not implement (rope type
      other than llama3, sliding window, activation, biases), naming the field and its value.
  """
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"HF model_type {model_type!r} is not supported; supported model types: "
        f"{sorted(ARCHITECTURES)}"
    )
  unknown = [a for a in hf_config.get("architectures") or [] if a not in ARCHITECTURES[model_type]]
  if unknown:
    raise ValueError(
        f"HF architectures {unknown} are not supported for model_type {model_type!r}; "
        f"supported: {list(ARCHITECTURES[model_type])}"
    )
  get = lambda key, default: default if hf_config.get(key) is None else hf_config[key]
  if model_type == "gpt2":
    checks = {
        "activation_function": (get("activation_function", "gelu_new"), _GPT2_GELU),
        "scale_attn_weights": (get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (
            get("scale_attn_by_inverse_layer_idx", False),
            (False,),
        ),
        "add_cross_attention": (get("add_cross_attention", False), (False,)),
    }
  else:
    checks = {
        "hidden_act": (get("hidden_act", "silu"), ("silu",)),
        "mlp_bias": (get("mlp_bias", False), (False,)),
        # Llama's attention_bias also puts a bias on o_proj, which our model does not have.
        "attention_bias": (get("attention_bias", False), (False,)),
    }
  for key, (value, allowed) in checks.items():
    if value not in allowed:
      raise ValueError(f"HF config {key}={value!r} is not supported (supported: {list(allowed)})")

  if model_type == "gpt2":
    embed, heads = _require(hf_config, "n_embd"), _require(hf_config, "n_head")
    return ModelConfig(
        family="gpt2",
        vocab_size=_require(hf_config, "vocab_size"),
        num_layers=_require(hf_config, "n_layer"),
        embed_dim=embed,
        num_heads=heads,
        mlp_dim=get("n_inner", 4 * embed),
        max_seq_len=_require(hf_config, "n_positions"),
        norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(get("tie_word_embeddings", True)),
    )

  embed, heads = _require(hf_config, "hidden_size"), _require(hf_config, "num_attention_heads")
  layers, max_pos = _require(hf_config, "num_hidden_layers"), _require(
      hf_config, "max_position_embeddings"
  )
  _check_sliding_window(hf_config, model_type, layers, max_pos)
  theta, scaling = _rope(hf_config)
  head_dim = get("head_dim", embed // heads)
  return ModelConfig(
      family="llama",
      vocab_size=_require(hf_config, "vocab_size"),
      num_layers=layers,
      embed_dim=embed,
      num_heads=heads,
      num_kv_heads=get("num_key_value_heads", heads),
      head_dim=None if head_dim * heads == embed else head_dim,
      mlp_dim=_require(hf_config, "intermediate_size"),
      max_seq_len=max_pos,
      rope_theta=theta,
      rope_scaling=scaling,
      norm_eps=float(get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
  )


def config_to_hf(cfg: ModelConfig, *, model_type: str | None = None) -> dict[str, Any]:
  """The HF `config.json` dict for `cfg` (token ids and dtype are added by `export_hf`).

  model_type: "llama" | "qwen2" | "mistral" | "gpt2"; None = "gpt2" for family gpt2, "qwen2" for
  a llama with qkv_bias, else "llama" (Mistral without a sliding window computes exactly as Llama).
  """
  if model_type is None:
    model_type = "gpt2" if cfg.family == "gpt2" else "qwen2" if cfg.qkv_bias else "llama"
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
    )
  wanted = ("gpt2" if model_type == "gpt2" else "llama", model_type == "qwen2")
  if (cfg.family, cfg.qkv_bias and cfg.family == "llama") != wanted:
    raise ValueError(
        f"model_type {model_type!r} cannot express family={cfg.family!r} with "
        f"qkv_bias={cfg.qkv_bias} (qwen2 = llama with qkv_bias; llama and mistral "
        "have none)"
    )
  out: dict[str, Any] = {
      "model_type": model_type,
      "architectures": [ARCHITECTURES[model_type][cfg.head == "scalar"]],
      "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_embeddings,
  }
  if cfg.head == "scalar":
    out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if model_type == "gpt2":
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.embed_dim:
      raise ValueError(
          "GPT-2 needs num_kv_heads == num_heads and head_dim == embed_dim // num_heads"
      )
    out.update(
        n_embd=cfg.embed_dim,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.mlp_dim,
        n_positions=cfg.max_seq_len,
        n_ctx=cfg.max_seq_len,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new",
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
    )
    return out
  scaling = None
  if cfg.rope_scaling:  # llama3, the only scaling ModelConfig accepts, under its current key name
    scaling = {**{k: v for k, v in cfg.rope_scaling if k != "type"}, "rope_type": "llama3"}
  out.update(
      hidden_size=cfg.embed_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.dim_per_head,
      intermediate_size=cfg.mlp_dim,
      max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps,
      hidden_act="silu",
      rope_theta=cfg.rope_theta,
      rope_scaling=scaling,
      rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta},
  )
  if model_type == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  else:
    out.update(attention_bias=False, mlp_bias=False)
    if model_type == "mistral":
      out["sliding_window"] = None
  return out
