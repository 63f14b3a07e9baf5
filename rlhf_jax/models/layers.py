"""Building blocks of the decoder: norms, rotary embeddings, attention, MLPs, one transformer block.

Every parameter is an `nnx.Param` carrying `axes`: its logical axis names (`vocab`, `embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `norm`, `layers`), which `rlhf_jax.sharding` maps to mesh axes.
Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used; norms,
softmax and RoPE are computed in float32.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig

Array = jax.Array
# Large negative instead of -inf: rows whose every key is masked (pad queries) stay finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(rngs: nnx.Rngs, shape, axes, *, std: float | None, dtype) -> nnx.Param:
  """A parameter initialised N(0, std^2) (std None: zeros), tagged with logical `axes`."""
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


def add_lora(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs, names: tuple[str, ...]) -> None:
  """LoRA adapters for the params `names` of `module` that are in `cfg.lora_targets`: for W with
  input axes `in` and output axes `out` (W: [*in, *out]), `{name}_lora_a` [*in, r] ~ N(0, 1/fan_in)
  and `{name}_lora_b` [r, *out] = 0 (so the adapted model starts as the base). The rank axis is
  named `lora` (no sharding rule: replicated); the others keep W's names, so they shard as W.
  A's draws come from the `lora` stream when there is one (`create_model` adds it), so the base
  params of a LoRA model are those of the same seed without LoRA."""
  stream = rngs.lora if "lora" in rngs else rngs.params
  for name in names:
    if not cfg.lora_rank or name not in cfg.lora_targets:
      continue
    w = getattr(module, name)
    axes = w.get_metadata()["axes"]
    n_in = 2 if name == "o" else 1  # o: [heads, head_dim, embed]; the rest: [in, *out]
    fan_in = math.prod(w.shape[:n_in])
    a = jax.random.normal(stream(), (*w.shape[:n_in], cfg.lora_rank), jnp.float32)
    setattr(
        module,
        f"{name}_lora_a",
        nnx.Param((a / math.sqrt(fan_in)).astype(cfg.param_dtype), axes=(*axes[:n_in], "lora")),
    )
    setattr(
        module,
        f"{name}_lora_b",
        nnx.Param(
            jnp.zeros((cfg.lora_rank, *w.shape[n_in:]), cfg.param_dtype),
            axes=("lora", *axes[n_in:]),
        ),
    )


def dense(x: Array, w: Array, n_in: int = 1) -> Array:
  """x [..., *in] contracted with w [*in, *out] -> [..., *out], as one 2-D matmul
  [N, prod(in)] x [prod(in), prod(out)].

  The same product as `jnp.tensordot(x, w, n_in)`, but the backward pass's weight gradient then
  contracts one token axis instead of [B, T]: with two contracting axes XLA:CPU transposed each
  [B*T, out] output gradient before the matmul (the bench SFT step: twelve [4096, 1344] and one
  [4096, 4096] of them; its transposes and copies fell from 927 to 645 ms of op time a step); with
  one axis it is a plain transposed-operand matmul."""
  lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
  chex.assert_equal(x.shape[x.ndim - n_in :], ins)
  y = x.reshape(-1, math.prod(ins)) @ w.reshape(math.prod(ins), -1)
  return y.reshape(*lead, *outs)


def lora_delta(module: nnx.Module, name: str, x: Array, n_in: int = 1) -> Array | None:
  """(alpha / r) * B(A x) for param `name` in the compute dtype: x [..., *in] -> [..., *out];
  None when `name` has no adapter."""
  cfg = module.cfg
  if not cfg.lora_rank or name not in cfg.lora_targets:
    return None
  dt = jnp.dtype(cfg.dtype)
  a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
  xa = dense(x, a.astype(dt), n_in) * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dt)
  return dense(xa, b.astype(dt))


def _plus(y: Array, delta: Array | None) -> Array:
  return y if delta is None else y + delta


def ones_param(shape, axes, dtype) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, dtype), axes=tuple(axes))


class Norm(nnx.Module):
  """RMSNorm (llama) or LayerNorm with bias (gpt2), computed in float32."""

  def __init__(self, cfg: ModelConfig):
    self.kind = "rms" if cfg.family == "llama" else "layer"
    self.eps = cfg.norm_eps
    self.scale = ones_param((cfg.embed_dim,), ("norm",), cfg.param_dtype)
    if self.kind == "layer":
      self.bias = nnx.Param(jnp.zeros((cfg.embed_dim,), cfg.param_dtype), axes=("norm",))

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.kind == "rms":
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
      return (x * self.scale[...].astype(jnp.float32)).astype(dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
        dtype
    )


def rope_frequencies(cfg: ModelConfig) -> jnp.ndarray:
  """Inverse frequencies [head_dim // 2], with Llama-3 style scaling when configured."""
  dim = cfg.dim_per_head
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if cfg.rope_scaling is None:
    return inv_freq
  s = dict(cfg.rope_scaling)
  factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
  old_ctx = s["original_max_position_embeddings"]
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
  wavelen = 2 * math.pi / inv_freq
  low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
  smooth = (old_ctx / wavelen - low) / (high - low)
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(is_mid, mid, scaled)


def rope_angles(cfg: ModelConfig, positions: Array, *, table: bool) -> tuple[Array, Array]:
  """(sin, cos) [B, T, D/2] float32 of the rotary angles at `positions` [B, T] int.

  table=False computes them from the positions. table=True gathers them from a [N, D/2] table, N =
  max(max_seq_len, T), computed once per forward (as Meta's reference Llama precomputes its
  `freqs_cis`): the same values, but XLA:CPU no longer re-evaluates sin and cos inside every layer's
  RoPE fusion, once per head (computed from positions, they fuse into each consumer; an optimisation
  barrier does not survive XLA:CPU's pipeline): the bench SFT step's RoPE fusions took 218 ms of op
  time a step, from the table 63 ms (~8% of its non-matmul op time). Positions must then be below N:
  within a row (packed, padded or shared-prefix rows count positions inside the row) or the model's
  context; past both they read NaN. For the forwards without a KV cache; a decoding step (T = 1) has
  nothing to share and computes them."""
  inv_freq = rope_frequencies(cfg)
  if not table:
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles), jnp.cos(angles)
  n = max(cfg.max_seq_len, positions.shape[1])
  angles = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq  # [N, D/2]
  pick = lambda t: jnp.take(t, positions, axis=0, mode="fill", fill_value=jnp.nan)
  return pick(jnp.sin(angles)), pick(jnp.cos(angles))


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
  """Rotary embedding, HF "rotate_half" layout. x: [B, T, H, D]; rope: (sin, cos) [B, T, D/2]
  from `rope_angles`."""
  sin, cos = rope[0][:, :, None, :], rope[1][:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(
    q_slots: Array, q_segments: Array, k_segments: Array, branch_ids: Array | None = None
) -> Array:
  """Which keys each query may attend to: [B, 1, 1, T, S] bool.

  q_slots: [T] int, the key-slot index of each query (keys live in slots 0..S-1).
  q_segments: [B, T], k_segments: [B, S]: 0 marks padding; a query attends to keys of its own
  segment at slots <= its own (causal). This one rule covers right/left padding, packed documents
  and the KV cache.
  branch_ids: [B, T] int or None (no cache: keys are the queries, S = T). Shared-prefix rows
  (data/preference.py, `share_prompt`): inside one segment, 0 marks the shared prefix (a prompt)
  and b > 0 its b-th continuation (a response); a continuation's queries see the prefix and their
  own continuation only, never a sibling. None: every segment is one branch.
  """
  k_slots = jnp.arange(k_segments.shape[1])
  causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
  same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
  if branch_ids is not None:
    k_branch = branch_ids[:, None, :]
    same &= (k_branch == 0) | (k_branch == branch_ids[:, :, None])
  return (causal[None] & same)[:, None, None]


# Query chunk of the causal attention without a cache (training and scoring forwards).
CAUSAL_CHUNK = 128


def _attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """softmax(q k / sqrt(D), masked) v. q: [B, KV, G, T, D] (query head kv * G + g); k, v:
  [B, KV, S, D]; mask: [B, 1, 1, T, S] bool. Scores and softmax in float32; returns
  [B, KV, G, T, D].

  Each contraction has batch axes [B, KV] first and one axis contracted: the G query heads of a
  KV head are flattened with the queries into [B, KV, G*T, S] scores. Written over separate G and
  T axes (and queries before heads), the backward pass contracted the score gradient over two axes
  and XLA:CPU transposed every score-sized array before its matmul (the same effect as in
  `dense`); now the backward's two transposed-operand matmuls (value and key gradients) take the
  scores as they lie. One layer's chunked attention, forward and backward, 8 x 512 tokens: 174 ->
  119 ms (CPU, median of 16).
  The softmax's normalisation comes after the value contraction (as in flash attention):
  exp(scores - max) goes into the contraction unnormalised and the [B, KV, G*T, D] output is
  divided by the row sums, instead of dividing the S-times-larger probabilities (and, in the
  backward pass, differentiating that division). The same result to float rounding; a train
  step's non-matmul op time fell by ~7% (CPU profile, the bench's SFT step)."""
  b, kv, g, t, d = q.shape
  s = k.shape[2]
  q = q.reshape(b, kv, g * t, d)
  mask = jnp.broadcast_to(mask[:, :, 0, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k).astype(jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask, scores, _MASK_VALUE)
  # A row's max only shifts its exponents (the result does not depend on it): no gradient.
  weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  sums = jnp.sum(weights, axis=-1, keepdims=True)  # [B, KV, G*T, 1], >= 1
  out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(q.dtype), v)
  return (out.astype(jnp.float32) / sums).astype(q.dtype).reshape(b, kv, g, t, d)


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads (GQA); RoPE for llama, none for gpt2."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, h, kv, d = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    pd, std = cfg.param_dtype, cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)
    self.cfg = cfg
    self.q = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), std=std, dtype=pd)
    self.k = param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    self.v = param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    self.o = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), std=out_std, dtype=pd)
    self.use_bias = cfg.qkv_bias or cfg.family == "gpt2"
    if self.use_bias:
      self.q_bias = param(rngs, (h, d), ("heads", "head_dim"), std=None, dtype=pd)
      self.k_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), std=None, dtype=pd)
      self.v_bias = param(rngs, (kv, d), ("kv_heads", "head_dim"), std=None, dtype=pd)
    if cfg.family == "gpt2":
      self.o_bias = param(rngs, (e,), ("norm",), std=None, dtype=pd)
    add_lora(self, cfg, rngs, ("q", "k", "v", "o"))

  def __call__(
      self,
      x: Array,
      rope: tuple[Array, Array] | None,
      mask: Array,
      cache: tuple[Array, Array] | None,
      write_at: Array | None,
  ):
    """x: [B, T, E]; rope: the rotary (sin, cos) [B, T, D/2] of `rope_angles` (llama; None for
    gpt2); mask: [B, 1, 1, T, S] from `attention_mask`.

    cache: None, or (k, v, layer). With `layer` an index, k, v are the caches of ALL layers,
    [L, B, KV, S, D]: this call's keys/values are written into slot `write_at` (scalar int) of
    layer `layer`, then the query attends over all S slots of that layer. The whole stacked cache
    is passed (and returned) so that it can be a loop carry that XLA updates in place; slicing it
    into per-layer scan inputs/outputs would copy the whole cache at every decoding step. Write
    first, then read: reading the carry before writing it makes XLA copy the buffer. With `layer`
    None, k, v are this layer's own cache [B, KV, S, D] (the unrolled decode loop's layout: no
    slice of a stacked cache to materialise at every step).
    Keys/values are laid out [B, KV, S, D] (heads before slots): the score and value contractions
    then need no transpose of the cache, ~5x faster decoding on CPU than [B, S, KV, D].
    Returns (out [B, T, E], (k, v) updated, or None).
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q = _plus(dense(x, self.q[...].astype(dt)), lora_delta(self, "q", x))
    k = _plus(dense(x, self.k[...].astype(dt)), lora_delta(self, "k", x))
    v = _plus(dense(x, self.v[...].astype(dt)), lora_delta(self, "v", x))
    if self.use_bias:
      q, k = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KV, T, D]
    new_cache = None
    if cache is not None:
      k_all, v_all, layer = cache
      if layer is None:
        at = (0, 0, write_at, 0)
        k = k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), at)
        v = v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), at)
      else:
        at = (layer, 0, 0, write_at, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
        k = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False)
      new_cache = (k_all, v_all)
    b, t, h, d = q.shape
    kvh = k.shape[1]
    # [B, KV, G, T, D]: heads before queries, as the keys and values (decoding: T = 1, a bitcast).
    q = jnp.moveaxis(q.reshape(b, t, kvh, h // kvh, d), 1, 3)
    k, v = k.astype(dt), v.astype(dt)
    if cache is None and t > CAUSAL_CHUNK and t % CAUSAL_CHUNK == 0:
      # No cache: keys are the queries' own slots and attention is causal, so query chunk i needs
      # keys [0, (i + 1) C) only; the rest is masked. Chunk by chunk: (n + 1) / 2n of the scores.
      out = jnp.concatenate(
          [
              _attend(
                  q[:, :, :, lo : lo + CAUSAL_CHUNK],
                  k[:, :, : lo + CAUSAL_CHUNK],
                  v[:, :, : lo + CAUSAL_CHUNK],
                  mask[..., lo : lo + CAUSAL_CHUNK, : lo + CAUSAL_CHUNK],
              )
              for lo in range(0, t, CAUSAL_CHUNK)
          ],
          axis=3,
      )
    else:
      out = _attend(q, k, v, mask)
    out = jnp.moveaxis(out, 3, 1)  # [B, T, KV, G, D]
    # The output projection as one [B*T, H*D] x [H*D, E] matmul on the weight's stored layout (and
    # v projected as k, then transposed; both through `dense`): written as einsums into
    # [B, KV, T, D] / out of [B, T, KV, G, D], XLA CPU transposed the o and v weights at every
    # decoding step.
    out = out.reshape(b, t, h, d)
    out = _plus(dense(out, self.o[...].astype(dt), n_in=2), lora_delta(self, "o", out, n_in=2))
    if cfg.family == "gpt2":
      out = out + self.o_bias[...].astype(dt)
    return out, new_cache


class MLP(nnx.Module):
  """SwiGLU (llama) or GELU-tanh with biases (gpt2)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, m, pd, std = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype, cfg.init_std
    out_std = std / math.sqrt(2 * cfg.num_layers)
    self.cfg = cfg
    self.up = param(rngs, (e, m), ("embed", "mlp"), std=std, dtype=pd)
    self.down = param(rngs, (m, e), ("mlp", "embed"), std=out_std, dtype=pd)
    if cfg.family == "llama":
      self.gate = param(rngs, (e, m), ("embed", "mlp"), std=std, dtype=pd)
    else:
      self.up_bias = param(rngs, (m,), ("mlp",), std=None, dtype=pd)
      self.down_bias = param(rngs, (e,), ("norm",), std=None, dtype=pd)
    add_lora(self, cfg, rngs, ("gate", "up", "down"))

  def __call__(self, x: Array) -> Array:
    dt = jnp.dtype(self.cfg.dtype)
    up = _plus(dense(x, self.up[...].astype(dt)), lora_delta(self, "up", x))
    if self.cfg.family == "llama":
      gate = _plus(dense(x, self.gate[...].astype(dt)), lora_delta(self, "gate", x))
      hidden = jax.nn.silu(gate) * up
      hidden = sharding.constrain(hidden, ("batch", "length", "mlp"))
      return _plus(dense(hidden, self.down[...].astype(dt)), lora_delta(self, "down", hidden))
    hidden = jax.nn.gelu(up + self.up_bias[...].astype(dt), approximate=True)
    hidden = sharding.constrain(hidden, ("batch", "length", "mlp"))
    down = _plus(dense(hidden, self.down[...].astype(dt)), lora_delta(self, "down", hidden))
    return down + self.down_bias[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, rope, mask, cache=None, write_at=None):
    h, new_cache = self.attn(self.attn_norm(x), rope, mask, cache, write_at)
    x = sharding.constrain(x + h, ("batch", "length", "act_embed"))
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed")), new_cache
