"""Model configuration: one dataclass covers the Llama family and the GPT-2 family.

The config is plain data (hashable, JSON-serialisable via `to_dict`), so it can sit in the static part of
a jitted function and be written next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FAMILIES = ("llama", "gpt2")
HEADS = ("lm", "scalar")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_SCALING_TYPES = ("llama3",)
# LoRA targets: the projections an adapter can wrap, by their param names in layers.py.
LORA_ATTN_TARGETS = ("q", "k", "v", "o")
LORA_MLP_TARGETS = {"llama": ("gate", "up", "down"), "gpt2": ("up", "down")}
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer.

  family: "llama" (RMSNorm, RoPE, SwiGLU, GQA; Qwen2 = llama + qkv_bias; Mistral = llama) or
    "gpt2" (learned positions, LayerNorm, GELU, biases everywhere, tied embeddings).
  head: "lm" (logits over the vocabulary) or "scalar" (one score per position: reward/value models).
  rope_scaling: None or a dict like HF's `{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}`; stored as a sorted tuple of
    items so the config stays hashable.
  dtype: compute dtype ("float32" or "bfloat16"); param_dtype: storage dtype of the parameters.
  remat: rematerialisation policy of each layer ("none", "full", "dots", "dots_no_batch").
  lora_rank: > 0 adds LoRA adapters (models/lora.py) of this rank to each projection named in
    `lora_targets` (q, k, v, o; gate (llama only), up, down), scaled by lora_alpha / lora_rank;
    0 = no adapters (and the LoRA fields are left out of `to_dict`, so a plain model's metadata
    is what it was before LoRA existed).
  scan_layers: run the layers with `lax.scan` (fast compile, one layer's code) instead of unrolled.
    The parameter layout is the same either way (layers stacked on a leading axis), so a checkpoint
    does not depend on this choice.
  """

  vocab_size: int = 4096
  num_layers: int = 2
  embed_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: = num_heads (no grouping)
  head_dim: int | None = None  # None: embed_dim // num_heads
  mlp_dim: int = 344
  max_seq_len: int = 2048
  family: str = "llama"
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  head: str = "lm"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True
  init_std: float = 0.02
  scalar_head_init_std: float = 1e-3
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.lora_targets, str):
      object.__setattr__(self, "lora_targets", (self.lora_targets,))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives a list
    errors = []
    sizes = dict(
        vocab_size=self.vocab_size,
        num_layers=self.num_layers,
        embed_dim=self.embed_dim,
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        max_seq_len=self.max_seq_len,
        num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim,
    )
    bad = [f"{k}={v}" for k, v in sizes.items() if v is not None and v < 1]
    if bad:
      raise ValueError(f"Invalid model config: sizes must be positive, got {', '.join(bad)}")
    if self.family not in FAMILIES:
      errors.append(f"family={self.family!r} must be one of {FAMILIES}")
    if self.head not in HEADS:
      errors.append(f"head={self.head!r} must be one of {HEADS}")
    if self.remat not in REMAT_POLICIES:
      errors.append(f"remat={self.remat!r} must be one of {REMAT_POLICIES}")
    if self.num_heads % self.kv_heads:
      errors.append(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}"
      )
    if self.head_dim is None and self.embed_dim % self.num_heads:
      errors.append(
          f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
          "set head_dim explicitly"
      )
    if self.family == "llama" and self.dim_per_head % 2:
      errors.append(f"head_dim={self.dim_per_head} must be even for RoPE")
    if self.rope_scaling is not None:
      kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type"))
      if kind not in ROPE_SCALING_TYPES:
        errors.append(
            f"rope_scaling type {kind!r} is not supported (supported: {ROPE_SCALING_TYPES})"
        )
      else:
        scaling = dict(self.rope_scaling)
        missing = {"factor", "original_max_position_embeddings"} - set(scaling)
        if missing:
          errors.append(f"rope_scaling is missing {sorted(missing)}")
        if scaling.get("high_freq_factor", 4.0) <= scaling.get("low_freq_factor", 1.0):
          errors.append("rope_scaling needs high_freq_factor > low_freq_factor")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        errors.append(f"{name}={getattr(self, name)!r} must be float32, bfloat16 or float16")
    errors += self._lora_errors()
    if errors:
      raise ValueError("Invalid model config: " + "; ".join(errors))

  def _lora_errors(self) -> list[str]:
    if self.lora_rank == 0:
      return []
    if self.lora_rank < 0:
      return [f"lora_rank={self.lora_rank} must be > 0 (or 0: no LoRA)"]
    allowed = LORA_ATTN_TARGETS + LORA_MLP_TARGETS.get(self.family, ())
    errors = []
    bad = [t for t in self.lora_targets if t not in allowed]
    if bad or not self.lora_targets or len(set(self.lora_targets)) < len(self.lora_targets):
      errors.append(
          f"lora_targets={self.lora_targets!r}: {bad or 'empty or repeated'}; choose "
          f"distinct names from {allowed} ({self.family})"
      )
    if not self.lora_alpha > 0:
      errors.append(f"lora_alpha={self.lora_alpha} must be > 0")
    smallest = {t: min(self.lora_dims(t)) for t in self.lora_targets if t in allowed}
    too_big = {t: d for t, d in smallest.items() if d < self.lora_rank}
    if too_big:
      errors.append(
          f"lora_rank={self.lora_rank} exceeds the smaller dimension of {too_big}; "
          "lower lora_rank"
      )
    return errors

  def lora_dims(self, target: str) -> tuple[int, int]:
    """(input size, output size) of projection `target` as a matrix."""
    e, m = self.embed_dim, self.mlp_dim
    q, kv = self.num_heads * self.dim_per_head, self.kv_heads * self.dim_per_head
    return {
        "q": (e, q),
        "k": (e, kv),
        "v": (e, kv),
        "o": (q, e),
        "gate": (e, m),
        "up": (e, m),
        "down": (m, e),
    }[target]

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if self.rope_scaling is not None:
      d["rope_scaling"] = dict(self.rope_scaling)
    if not self.lora_rank:
      for name in LORA_FIELDS:
        del d[name]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown model config fields {unknown}; valid fields: {sorted(known)}")
    return cls(**dict(d))

  def num_params(self) -> int:
    """Parameter count (embeddings included)."""
    e, h, kv, d, m, l = (
        self.embed_dim,
        self.num_heads,
        self.kv_heads,
        self.dim_per_head,
        self.mlp_dim,
        self.num_layers,
    )
    attn = e * h * d + 2 * e * kv * d + h * d * e
    if self.family == "llama":
      mlp, norms = 3 * e * m, 2 * e
      attn += (h + 2 * kv) * d if self.qkv_bias else 0
    else:
      mlp, norms = 2 * e * m + m + e, 4 * e
      attn += (h + 2 * kv) * d + e
    total = l * (attn + mlp + norms) + self.vocab_size * e + (2 * e if self.family == "gpt2" else e)
    if self.family == "gpt2":
      total += self.max_seq_len * e
    if self.head == "scalar":
      total += e
    elif not self.tie_embeddings:
      total += e * self.vocab_size
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention only."""
    e, h, kv, d, m, l = (
        self.embed_dim,
        self.num_heads,
        self.kv_heads,
        self.dim_per_head,
        self.mlp_dim,
        self.num_layers,
    )
    n_mlp = 3 if self.family == "llama" else 2
    per_layer = 2 * (e * h * d + 2 * e * kv * d + h * d * e + n_mlp * e * m)
    per_layer += 2 * 2 * h * d * seq_len / 2  # causal attention scores + weighted sum, half masked
    return 3.0 * l * per_layer + self.head_flops_per_token()

  def head_flops_per_token(self) -> float:
    """The head's share of `flops_per_token`: training FLOPs of the vocabulary projection (or
    the scalar head) at one position."""
    return 3.0 * 2 * self.embed_dim * (self.vocab_size if self.head == "lm" else 1)


def llama_bench_config(**overrides) -> ModelConfig:
  """The benchmark model: Llama-style, 6 layers, d512, 8 heads, MLP 1344, vocab 4096."""
  base = dict(
      vocab_size=4096,
      num_layers=6,
      embed_dim=512,
      num_heads=8,
      num_kv_heads=8,
      mlp_dim=1344,
      max_seq_len=2048,
      family="llama",
  )
  base.update(overrides)
  return ModelConfig(**base)


def llama3_config(size: str, **overrides) -> ModelConfig:
  """Llama 3's architectures with random weights (for benchmarks and memory plans): "1b" (Llama
  3.2 1B: 1.24B parameters, tied embeddings), "8b" (Llama 3.1 8B: 8.03B), "70b" (Llama 3.1 70B)."""
  shapes = {
      "1b": dict(num_layers=16, embed_dim=2048, num_heads=32, mlp_dim=8192, tie_embeddings=True),
      "8b": dict(num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=14336),
      "70b": dict(num_layers=80, embed_dim=8192, num_heads=64, mlp_dim=28672),
  }
  if size not in shapes:
    raise ValueError(f"llama3 size {size!r}: choose one of {sorted(shapes)}")
  base = dict(
      vocab_size=128256,
      num_kv_heads=8,
      max_seq_len=8192,
      family="llama",
      rope_theta=500000.0,
      **shapes[size],
  )
  base.update(overrides)
  return ModelConfig(**base)


# Named architectures (random weights), for `python -m rlhf_jax.bench --model` and `rlhf_jax.tools.plan`.
PRESETS = {
    "bench": llama_bench_config,
    "llama3_1b": lambda **kw: llama3_config("1b", **kw),
    "llama3_8b": lambda **kw: llama3_config("8b", **kw),
    "llama3_70b": lambda **kw: llama3_config("70b", **kw),
}
