"""The decoder against plain references: NumPy forwards, single-row runs, HF's Llama-3 RoPE formula.

Parameters are redrawn in NumPy with O(1) values (norm scales and biases included), so logits are
O(1) and a wrong mask, rotation, bias or head grouping moves them far beyond the 1e-5 tolerances.
Most tests share one jitted forward and the [3, 12] batch shape: XLA:CPU compilation is the cost.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (
    ModelConfig,
    abstract_model,
    apply,
    create_model,
    init_cache,
    positions_from_mask,
    split_model,
    unstack_layers,
)
from rlhf_jax.models.layers import rope_frequencies

# GQA (4 query heads on 2 KV heads) and head_dim 16 != embed_dim / num_heads, untied head.
LLAMA = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=48,
    max_seq_len=32,
    family="llama",
)
GPT2 = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    mlp_dim=48,
    max_seq_len=32,
    family="gpt2",
    tie_embeddings=True,
)
# Qwen2-style qkv biases, tied head, one KV head, and Llama-3 RoPE scaling whose three branches all
# occur at head_dim 8 (wavelengths 6.3, 63, 628, 6283 against the bounds 16 and 64).
LLAMA_QWEN_SCALED = ModelConfig(
    vocab_size=64,
    num_layers=2,
    embed_dim=32,
    num_heads=4,
    num_kv_heads=1,
    mlp_dim=48,
    max_seq_len=32,
    family="llama",
    qkv_bias=True,
    tie_embeddings=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)
FAMILIES = {"llama": LLAMA, "gpt2": GPT2}
B, T = 3, 12
ATOL = 1e-5

# XLA:CPU's LLVM optimisations double compile time here and change no semantics.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
_forward = jax.jit(apply, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


def random_params(cfg, seed=0):
  """(graphdef, params) with every leaf drawn in NumPy: matrices N(0, 1/fan_in), embeddings N(0, 1),
  norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2). Built from `abstract_model`: nothing compiles."""
  graphdef, abstract, _ = abstract_model(cfg)
  fan_in = {
      "q": cfg.embed_dim,
      "k": cfg.embed_dim,
      "v": cfg.embed_dim,
      "gate": cfg.embed_dim,
      "up": cfg.embed_dim,
      "lm_head": cfg.embed_dim,
      "score": cfg.embed_dim,
      "o": cfg.num_heads * cfg.dim_per_head,
      "down": cfg.mlp_dim,
  }
  rs = np.random.RandomState(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rs.randn(*leaf.shape)
    if name == "scale":
      value = 1 + 0.1 * noise
    elif name.endswith("bias"):
      value = 0.1 * noise
    elif name in ("embed", "pos_embed"):
      value = noise
    else:
      value = noise / math.sqrt(fan_in[name])
    return jnp.asarray(value, leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def forward(graphdef, params, tokens, positions=None, segment_ids=None, cache=None):
  """`apply` on NumPy inputs; positions default to 0..T-1 and segment ids to all ones."""
  tokens = np.asarray(tokens, np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  if segment_ids is None:
    segment_ids = np.ones(tokens.shape, np.int32)
  out, cache = _forward(
      graphdef,
      params,
      jnp.asarray(tokens),
      jnp.asarray(positions, jnp.int32),
      jnp.asarray(segment_ids, jnp.int32),
      cache,
  )
  return np.asarray(out), cache


def run_alone(graphdef, params, tokens):
  """Output of one unpadded sequence [n] -> [n, ...]."""
  return forward(graphdef, params, np.asarray(tokens)[None])[0][0]


# --------------------------------------------------------------------------------------------------
# Plain NumPy references (float64), one unpadded sequence [T] at a time.


def np_rope_llama3(
    inv_freq, *, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
):
  """HF `_compute_llama3_parameters`, written from the formula, one frequency at a time."""
  old_ctx = original_max_position_embeddings
  low_freq_wavelen, high_freq_wavelen = old_ctx / low_freq_factor, old_ctx / high_freq_factor
  out = np.empty_like(inv_freq)
  for i, f in enumerate(inv_freq):
    wavelen = 2 * math.pi / f
    if wavelen > low_freq_wavelen:
      out[i] = f / factor
    elif wavelen < high_freq_wavelen:
      out[i] = f
    else:
      smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out[i] = (1 - smooth) * f / factor + smooth * f
  return out


def np_inv_freq(cfg):
  d = cfg.dim_per_head
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  if cfg.rope_scaling is None:
    return inv_freq
  kwargs = {k: v for k, v in cfg.rope_scaling if k != "rope_type"}
  return np_rope_llama3(inv_freq, **kwargs)


def np_attention(q, k, v):
  """q: [T, H, D], k, v: [T, KV, D]; causal; query head i reads KV head i // (H // KV) (HF
  `repeat_kv`)."""
  t, h, d = q.shape
  group = h // k.shape[1]
  out = np.zeros_like(q)
  for i in range(h):
    scores = q[:, i] @ k[:, i // group].T / math.sqrt(d)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    out[:, i] = probs / probs.sum(-1, keepdims=True) @ v[:, i // group]
  return out


def np_llama_hidden(cfg, p, tokens):
  """Final-norm hidden states [T, E]: RMSNorm, RoPE (rotate-half), GQA, SwiGLU, pre-norm blocks."""

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x):  # x: [T, H, D]; pairs (i, i + D/2) rotate by angle position * inv_freq[i]
    angles = np.arange(len(x))[:, None, None] * np_inv_freq(cfg)  # [T, 1, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  x = p["embed"][tokens]
  for layer in range(cfg.num_layers):
    blk = jax.tree.map(lambda a: a[layer], p["blocks"])
    attn, mlp = blk["attn"], blk["mlp"]
    h = rms(x, blk["attn_norm"]["scale"])
    q, k, v = (np.einsum("te,ehd->thd", h, attn[name]) for name in "qkv")
    if cfg.qkv_bias:
      q, k, v = q + attn["q_bias"], k + attn["k_bias"], v + attn["v_bias"]
    x = x + np.einsum("thd,hde->te", np_attention(rope(q), rope(k), v), attn["o"])
    h = rms(x, blk["mlp_norm"]["scale"])
    gate = h @ mlp["gate"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ mlp["up"])) @ mlp["down"]
  return rms(x, p["final_norm"]["scale"])


def np_gpt2_hidden(cfg, p, tokens):
  """Final-norm hidden states [T, E]: learned positions, LayerNorm with bias, GELU-tanh, biases."""

  def layer_norm(x, norm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * norm["scale"] + norm["bias"]

  def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

  x = p["embed"][tokens] + p["pos_embed"][: len(tokens)]
  for layer in range(cfg.num_layers):
    blk = jax.tree.map(lambda a: a[layer], p["blocks"])
    attn, mlp = blk["attn"], blk["mlp"]
    h = layer_norm(x, blk["attn_norm"])
    q, k, v = (np.einsum("te,ehd->thd", h, attn[n]) + attn[n + "_bias"] for n in "qkv")
    x = x + np.einsum("thd,hde->te", np_attention(q, k, v), attn["o"]) + attn["o_bias"]
    h = layer_norm(x, blk["mlp_norm"])
    x = x + gelu_tanh(h @ mlp["up"] + mlp["up_bias"]) @ mlp["down"] + mlp["down_bias"]
  return layer_norm(x, p["final_norm"])


def np_forward(cfg, params, tokens):
  """Logits [T, V] (lm head, tied or not) or scores [T] (scalar head), float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  hidden_fn = np_gpt2_hidden if cfg.family == "gpt2" else np_llama_hidden
  x = hidden_fn(cfg, p, np.asarray(tokens))
  if cfg.head == "scalar":
    return x @ p["score"]
  return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])


# --------------------------------------------------------------------------------------------------
# The forward equals the NumPy reference.


@pytest.mark.parametrize(
    "cfg",
    [LLAMA, LLAMA_QWEN_SCALED, GPT2, LLAMA.replace(head="scalar"), GPT2.replace(head="scalar")],
    ids=["llama_gqa", "llama_qkv_bias_rope_scaled", "gpt2", "llama_scalar", "gpt2_scalar"],
)
def test_forward_matches_numpy_reference(cfg):
  graphdef, params = random_params(cfg, seed=1)
  tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (B, T))
  out, cache = forward(graphdef, params, tokens)
  assert cache is None and out.dtype == np.float32
  assert out.shape == ((B, T) if cfg.head == "scalar" else (B, T, cfg.vocab_size))
  for row in range(B):
    expected = np_forward(cfg, params, tokens[row])
    assert np.abs(expected).max() > 1.0  # O(1) outputs: ATOL is a tight check
    # float32 logits up to ~12 against a float64 reference: 1e-5 is ~10 ulp at 8, so the rounding
    # of a reordered sum can pass it (1.04e-5 at 8.95 seen); rtol 2e-6 allows ~20 ulp.
    np.testing.assert_allclose(out[row], expected, atol=ATOL, rtol=2e-6)


# --------------------------------------------------------------------------------------------------
# Padding (right or left) and packing do not change a sequence's logits.


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_match_rows_run_alone(family, side):
  graphdef, params = random_params(FAMILIES[family], seed=3)
  lengths = [12, 7, 3]
  # Pad slots hold random non-zero tokens, so any leak from them shows in the logits.
  tokens = np.random.RandomState(4).randint(1, 64, (B, T))  # both families: vocab 64
  mask = np.zeros((B, T), bool)
  for row, n in enumerate(lengths):
    mask[row, :n] = True
  if side == "left":
    mask = mask[:, ::-1]
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  np.testing.assert_array_equal(positions[mask], np.concatenate([np.arange(n) for n in lengths]))
  logits, _ = forward(graphdef, params, tokens, positions, mask.astype(np.int32))
  assert np.isfinite(logits).all()  # pad queries attend to no key and must still be finite
  for row in range(B):
    np.testing.assert_allclose(
        logits[row][mask[row]],
        run_alone(graphdef, params, tokens[row][mask[row]]),
        atol=ATOL,
        rtol=0,
        err_msg=f"row {row}",
    )


def test_positions_from_mask():
  mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  expected = np.array([[0, 1, 2, 0, 0], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(np.asarray(positions_from_mask(jnp.asarray(mask))), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_documents_match_documents_run_alone(family):
  graphdef, params = random_params(FAMILIES[family], seed=5)
  # Document lengths reuse the shapes of the padding test; each row ends in padding.
  doc_lengths = [[3, 7], [7, 3], [3, 3, 3]]
  tokens = np.random.RandomState(6).randint(1, 64, (B, T))  # both families: vocab 64
  segments = np.zeros((B, T), np.int32)
  positions = np.zeros((B, T), np.int32)
  for row, lengths in enumerate(doc_lengths):
    starts = np.cumsum([0] + lengths)
    for doc, (start, n) in enumerate(zip(starts, lengths)):
      segments[row, start : start + n] = doc + 1
      positions[row, start : start + n] = np.arange(n)
  logits, _ = forward(graphdef, params, tokens, positions, segments)
  for row, lengths in enumerate(doc_lengths):
    for start, n in zip(np.cumsum([0] + lengths), lengths):
      np.testing.assert_allclose(
          logits[row, start : start + n],
          run_alone(graphdef, params, tokens[row, start : start + n]),
          atol=ATOL,
          rtol=0,
          err_msg=f"row {row} doc at {start}",
      )


# --------------------------------------------------------------------------------------------------
# Scan vs unrolled layers and the remat policies: same logits, same gradients.


def _loss_logits_grads(cfg, params, tokens, positions, segments):
  graphdef, _, _ = abstract_model(cfg)

  def loss_fn(params):
    logits, _ = apply(graphdef, params, tokens, positions, segments)
    logp = jax.nn.log_softmax(logits)
    target_logp = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    weights = (segments[:, 1:] > 0).astype(jnp.float32)
    return -(target_logp * weights).sum() / weights.sum(), logits

  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=_COMPILER_OPTIONS)
  (loss, logits), grads = fn(params)
  return jax.device_get((loss, logits, grads))


@pytest.mark.slow  # compiles several train steps: keeps the fast set under 5 minutes
def test_scan_and_remat_do_not_change_logits_or_gradients():
  base = LLAMA.replace(scan_layers=False, remat="none")
  _, params = random_params(base, seed=7)
  tokens = np.random.RandomState(8).randint(1, base.vocab_size, (2, 10))
  segments = np.ones((2, 10), np.int32)
  segments[1, 7:] = 0
  inputs = (
      jnp.asarray(tokens, jnp.int32),
      positions_from_mask(jnp.asarray(segments)),
      jnp.asarray(segments),
  )
  ref_loss, ref_logits, ref_grads = _loss_logits_grads(base, params, *inputs)
  ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  assert all(np.abs(g).max() > 1e-3 for g in ref_flat.values())
  for scan, remat in [(True, "none"), (True, "full"), (True, "dots"), (False, "full")]:
    msg = f"scan_layers={scan} remat={remat}"
    loss, logits, grads = _loss_logits_grads(
        base.replace(scan_layers=scan, remat=remat), params, *inputs
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=msg)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0, err_msg=msg)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads), msg
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      np.testing.assert_allclose(
          g, ref_flat[path], atol=1e-6, rtol=1e-5, err_msg=f"{msg} {jax.tree_util.keystr(path)}"
      )


# --------------------------------------------------------------------------------------------------
# Llama-3 RoPE scaling equals HF's formula.


def test_llama3_rope_frequencies_match_hf_formula():
  scaling = {
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
  }
  cfg = ModelConfig(
      vocab_size=64,
      embed_dim=512,
      num_heads=8,
      head_dim=64,
      rope_theta=500000.0,
      rope_scaling=scaling,
  )
  base = 1.0 / 500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
  expected = np_rope_llama3(base, **{k: v for k, v in scaling.items() if k != "rope_type"})
  # All three branches occur: kept, divided by the factor, interpolated.
  assert np.any(expected == base) and np.any(np.isclose(expected, base / 8, rtol=1e-12, atol=0))
  assert np.any((expected < base * (1 - 1e-6)) & (expected > base / 8 * (1 + 1e-6)))
  got = np.asarray(rope_frequencies(cfg))
  assert got.shape == (32,) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)
  np.testing.assert_allclose(
      np.asarray(rope_frequencies(cfg.replace(rope_scaling=None))), base, rtol=1e-5, atol=0
  )
  # HF's older key name "type" is accepted too.
  legacy = cfg.replace(
      rope_scaling={**{k: v for k, v in scaling.items() if k != "rope_type"}, "type": "llama3"}
  )
  np.testing.assert_allclose(np.asarray(rope_frequencies(legacy)), expected, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------------
# Parameter inventory: counts, qkv biases, initialisation.

COUNT_CONFIGS = {
    "llama_untied": LLAMA,
    "llama_tied": LLAMA.replace(tie_embeddings=True),
    "llama_mha_default_head_dim": LLAMA.replace(num_kv_heads=None, head_dim=None),
    "llama_qkv_bias": LLAMA.replace(qkv_bias=True),
    "llama_qwen_scaled": LLAMA_QWEN_SCALED,
    "llama_scalar": LLAMA.replace(head="scalar"),
    "gpt2_tied": GPT2,
    "gpt2_untied": GPT2.replace(tie_embeddings=False),
    "gpt2_scalar_3_layers": GPT2.replace(head="scalar", num_layers=3),
}


@pytest.mark.parametrize("name", list(COUNT_CONFIGS))
def test_num_params_counts_every_leaf(name):
  cfg = COUNT_CONFIGS[name]
  _, abstract, _ = abstract_model(cfg)
  assert cfg.num_params() == sum(leaf.size for leaf in jax.tree.leaves(abstract))


def test_qkv_bias_adds_q_k_v_biases_only():
  _, plain, _ = abstract_model(LLAMA)
  _, biased, _ = abstract_model(LLAMA.replace(qkv_bias=True))
  assert set(plain["blocks"]["attn"]) == {"q", "k", "v", "o"}
  attn = biased["blocks"]["attn"]
  assert set(attn) == {"q", "k", "v", "o", "q_bias", "k_bias", "v_bias"}  # no o_bias in Qwen2
  assert attn["q_bias"].shape == (2, 4, 16)
  assert attn["k_bias"].shape == attn["v_bias"].shape == (2, 2, 16)
  # Everything outside attention is unchanged.
  rest = lambda p: {k: v for k, v in p.items() if k != "blocks"}  # noqa: E731
  shapes = lambda p: jax.tree.map(lambda a: a.shape, p)  # noqa: E731
  assert shapes(rest(plain)) == shapes(rest(biased))


def test_create_model_initialisation():
  cfg = GPT2.replace(num_layers=4, init_std=0.05)
  make = jax.jit(
      lambda key: split_model(create_model(cfg, key))[1], compiler_options=_COMPILER_OPTIONS
  )
  params = jax.device_get(make(jax.random.key(0)))
  again = jax.device_get(make(jax.random.key(0)))
  other = jax.device_get(make(jax.random.key(1)))
  _, abstract, _ = abstract_model(cfg)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract
  )
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    np.testing.assert_array_equal(leaf, dict(jax.tree_util.tree_leaves_with_path(again))[path])
    if path[-1].key == "scale":
      np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
    elif path[-1].key.endswith("bias"):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    else:
      assert not np.array_equal(leaf, dict(jax.tree_util.tree_leaves_with_path(other))[path]), name
      # Layers are initialised independently, not copies of one another.
      if path[0].key == "blocks":
        assert not np.array_equal(leaf[0], leaf[1]), name
  # Residual-output projections are scaled down by sqrt(2 * num_layers); the rest use init_std.
  assert abs(params["embed"].std() - 0.05) < 0.005
  assert abs(params["blocks"]["attn"]["q"].std() - 0.05) < 0.005
  assert abs(params["blocks"]["mlp"]["down"].std() - 0.05 / math.sqrt(8)) < 0.002


# --------------------------------------------------------------------------------------------------
# Causality: the output at t does not depend on tokens after t (LM and scalar heads).


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_outputs_do_not_depend_on_later_tokens(family, head):
  cfg = FAMILIES[family].replace(head=head)
  graphdef, params = random_params(cfg, seed=9)
  rs = np.random.RandomState(10)
  tokens = np.tile(rs.randint(0, cfg.vocab_size, T), (B, 1))
  cuts = [T, 7, 2]  # row r is changed at every position >= cuts[r]
  for row, cut in enumerate(cuts):
    shift = rs.randint(1, cfg.vocab_size, T - cut)  # never 0: every later token really changes
    tokens[row, cut:] = (tokens[row, cut:] + shift) % cfg.vocab_size
  out, _ = forward(graphdef, params, tokens)
  assert out.shape == ((B, T) if head == "scalar" else (B, T, cfg.vocab_size))
  for row, cut in enumerate(cuts[1:], start=1):
    np.testing.assert_allclose(out[row, :cut], out[0, :cut], atol=1e-6, rtol=0)
    assert np.abs(out[row, cut:] - out[0, cut:]).max() > 1e-3  # and later outputs do change


# --------------------------------------------------------------------------------------------------
# bf16 compute with fp32 parameters.


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_compute_with_fp32_params(family):
  cfg32 = FAMILIES[family]
  graphdef16, abstract16, _ = abstract_model(cfg32.replace(dtype="bfloat16", param_dtype="float32"))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract16))
  graphdef32, params = random_params(cfg32, seed=11)
  tokens = np.random.RandomState(12).randint(0, cfg32.vocab_size, (B, T))
  ref, _ = forward(graphdef32, params, tokens)
  inputs = (
      jnp.asarray(tokens, jnp.int32),
      jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)),
      jnp.ones((B, T), jnp.int32),
  )

  def loss_fn(params):
    logits, _ = apply(graphdef16, params, *inputs)
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=_COMPILER_OPTIONS)
  (_, logits), grads = jax.device_get(fn(params))
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  scale = np.abs(ref).max()
  assert scale > 1.0
  err = np.abs(logits - ref).max()
  assert 0 < err < 5e-2 * scale, err  # close, and bf16 really was used
  assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_param_dtype_sets_storage_dtype():
  _, abstract, _ = abstract_model(LLAMA.replace(dtype="bfloat16", param_dtype="bfloat16"))
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(abstract))


# --------------------------------------------------------------------------------------------------
# Invalid configs are rejected with a message that names the field.


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_heads=4, num_kv_heads=3), r"num_heads=4 must be a multiple of num_kv_heads=3"),
        (dict(family="mamba"), r"family='mamba' must be one of \('llama', 'gpt2'\)"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn'"),
        (dict(head_dim=9), r"head_dim=9 must be even for RoPE"),
        (dict(embed_dim=36, num_heads=4), r"head_dim=9 must be even for RoPE"),
        (dict(embed_dim=30), r"embed_dim=30 is not divisible by num_heads=4; set head_dim"),
        (dict(head="value"), r"head='value' must be one of"),
        (dict(remat="some"), r"remat='some' must be one of"),
        (dict(dtype="float64"), r"dtype='float64' must be float32, bfloat16 or float16"),
    ],
    ids=[
        "kv_heads",
        "family",
        "rope_type",
        "odd_head_dim",
        "odd_derived_head_dim",
        "indivisible",
        "head",
        "remat",
        "dtype",
    ],
)
def test_invalid_configs_raise_value_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**dict(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=48), **overrides})


def test_incomplete_rope_scaling_raises_value_error():
  with pytest.raises(ValueError, match="factor"):
    ModelConfig(
        vocab_size=64,
        embed_dim=32,
        num_heads=4,
        mlp_dim=48,
        rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 8192},
    )


@pytest.mark.parametrize(
    "overrides",
    [dict(num_kv_heads=0), dict(num_kv_heads=-2), dict(num_heads=0)],
    ids=["kv0", "kv_negative", "heads0"],
)
def test_non_positive_head_counts_raise_value_error(overrides):
  with pytest.raises(ValueError, match="heads"):
    ModelConfig(**{**dict(vocab_size=64, embed_dim=32, num_heads=4, mlp_dim=48), **overrides})


def test_odd_head_dim_is_fine_without_rope():
  assert GPT2.replace(embed_dim=36, num_heads=4).dim_per_head == 9


def test_config_round_trips_through_dict():
  cfg = LLAMA_QWEN_SCALED
  assert isinstance(cfg.rope_scaling, tuple) and hash(cfg) == hash(cfg.replace())
  assert cfg.to_dict()["rope_scaling"]["factor"] == 4.0
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match=r"Unknown model config fields \['n_layer'\]"):
    ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 2})


# --------------------------------------------------------------------------------------------------
# Logical axes.


@pytest.mark.parametrize(
    "name", ["llama_untied", "llama_qkv_bias", "llama_scalar", "gpt2_tied", "gpt2_untied"]
)
def test_logical_axes_name_every_dimension(name):
  cfg = COUNT_CONFIGS[name]
  _, abstract, axes = abstract_model(cfg)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(abstract)
  specs = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_spec))
  sizes = {
      "vocab": cfg.vocab_size,
      "embed": cfg.embed_dim,
      "mlp": cfg.mlp_dim,
      "heads": cfg.num_heads,
      "kv_heads": cfg.kv_heads,
      "head_dim": cfg.dim_per_head,
      "layers": cfg.num_layers,
      "positions": cfg.max_seq_len,
      "norm": cfg.embed_dim,
  }
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    spec, where = specs[path], jax.tree_util.keystr(path)
    assert is_spec(spec) and len(spec) == leaf.ndim, (where, spec, leaf.shape)
    assert len(set(spec)) == len(spec), (where, spec)  # one name twice cannot be sharded
    # Stacked layer params, and only those, lead with 'layers'; it appears nowhere else.
    assert (spec[0] == "layers") == (path[0].key == "blocks"), (where, spec)
    assert "layers" not in spec[1:], (where, spec)
    for axis, size in zip(spec, leaf.shape):
      assert sizes[axis] == size, (where, spec, leaf.shape)  # also rejects unknown names


# --------------------------------------------------------------------------------------------------
# KV cache: prefill then one-token decode steps equal the full forward.


_forward_layers = jax.jit(apply, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


@pytest.mark.parametrize(
    "family,per_layer", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)]
)
def test_kv_cache_decode_matches_full_forward(family, per_layer):
  """per_layer: the decode loop's layout (per-layer weights from `unstack_layers`, unrolled, and a
  per-layer cache) against the full forward of the stacked, scanned model."""
  cfg = FAMILIES[family]
  graphdef, params = random_params(cfg, seed=13)
  if per_layer:
    layers = unstack_layers(params)
    forward = lambda g, p, tok, pos, seg, cache: jax.tree.map(
        np.asarray,
        _forward_layers(
            g, p, jnp.asarray(tok, jnp.int32), jnp.asarray(pos), jnp.asarray(seg), cache, layers
        ),
    )
  else:
    forward = globals()["forward"]
  prompt_t = 9
  tokens = np.random.RandomState(14).randint(1, cfg.vocab_size, (B, T))
  mask = np.ones((B, T), bool)
  for row, n in enumerate([9, 5, 1]):  # left-padded prompts, as for generation
    mask[row, : prompt_t - n] = False
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  segments = mask.astype(np.int32)
  full, _ = globals()["forward"](graphdef, params, tokens, positions, segments)

  # Spare empty slots must stay masked.
  cache = init_cache(cfg, batch=B, max_len=T + 4, per_layer=per_layer)
  prefill, cache = forward(
      graphdef, params, tokens[:, :prompt_t], positions[:, :prompt_t], segments[:, :prompt_t], cache
  )
  steps = [prefill]
  for t in range(prompt_t, T):
    logits, cache = forward(
        graphdef,
        params,
        tokens[:, t : t + 1],
        positions[:, t : t + 1],
        segments[:, t : t + 1],
        cache,
    )
    steps.append(logits)
  assert int(cache.end) == T
  np.testing.assert_array_equal(np.asarray(cache.segment_ids)[:, :T], segments)
  np.testing.assert_allclose(np.concatenate(steps, axis=1)[mask], full[mask], atol=ATOL, rtol=0)
  if per_layer:
    assert isinstance(cache.k, tuple) and len(cache.k) == cfg.num_layers
    assert cache.k[0].shape == (B, cfg.kv_heads, T + 4, cfg.dim_per_head)


def test_per_layer_cache_and_layers_go_together():
  cfg = LLAMA
  graphdef, params = random_params(cfg, seed=1)
  tokens, ones = jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)
  positions = jnp.arange(2)[None]
  layers = unstack_layers(params)
  assert len(layers) == cfg.num_layers
  np.testing.assert_array_equal(layers[1]["mlp"]["up"], params["blocks"]["mlp"]["up"][1])
  with pytest.raises(ValueError, match="per-layer KV cache goes with per-layer params"):
    apply(graphdef, params, tokens, positions, ones, init_cache(cfg, 1, 4, per_layer=True))
  with pytest.raises(ValueError, match="per-layer KV cache goes with per-layer params"):
    apply(graphdef, params, tokens, positions, ones, init_cache(cfg, 1, 4), layers)
  with pytest.raises(ValueError, match="layers has 1 entries, the model 2 layers"):
    apply(graphdef, params, tokens, positions, ones, None, layers[:1])
  # Without a cache, per-layer params give the scanned model's logits.
  np.testing.assert_allclose(
      apply(graphdef, params, tokens, positions, ones, None, layers)[0],
      apply(graphdef, params, tokens, positions, ones)[0],
      atol=ATOL,
  )


def test_chunked_causal_attention_matches_unchunked(monkeypatch):
  """Without a cache, rows longer than `CAUSAL_CHUNK` attend chunk by chunk (query chunk i over
  keys [0, (i + 1) C)). Packed segments crossing chunk borders and right padding must give the
  full computation's logits and gradients."""
  from rlhf_jax.models import layers as layers_module

  cfg = LLAMA
  graphdef, params = random_params(cfg, seed=21)
  rs = np.random.RandomState(22)
  t = 4 * 16
  tokens = jnp.asarray(rs.randint(1, cfg.vocab_size, (2, t)), jnp.int32)
  # Row 0: segments of 10, 30 (crossing two chunk borders), 20, then 4 pad; row 1: one segment.
  seg0 = np.concatenate([np.full(10, 1), np.full(30, 2), np.full(20, 3), np.zeros(4)])
  segments = jnp.asarray(np.stack([seg0, np.ones(t)]), jnp.int32)
  positions = jnp.asarray(
      np.stack(
          [np.concatenate([np.arange(10), np.arange(30), np.arange(20), np.zeros(4)]), np.arange(t)]
      ),
      jnp.int32,
  )

  def loss(p):
    logits, _ = apply(graphdef, p, tokens, positions, segments)
    return jnp.sum(jnp.where(segments[..., None] > 0, logits, 0.0) ** 2), logits

  results = {}
  for chunk in (16, 10**6):  # 4 chunks; one (the plain computation)
    monkeypatch.setattr(layers_module, "CAUSAL_CHUNK", chunk)
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    results[chunk] = (np.asarray(logits), grads)
  real = np.asarray(segments) > 0
  np.testing.assert_allclose(results[16][0][real], results[10**6][0][real], atol=ATOL, rtol=0)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
      results[16][1],
      results[10**6][1],
  )


def _entry_as_train_steps_compile(monkeypatch, fn, *args) -> str:
  """The ENTRY computation of `fn(*args)` compiled with the options the CPU train steps use on a
  one-device mesh (`train_compiler_options`, with its YNNPACK fusions switched on)."""
  from rlhf_jax import sharding
  from rlhf_jax.train import train_compiler_options

  monkeypatch.setenv("RLHF_JAX_CPU_YNN", "1")
  options = train_compiler_options(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  text = jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()
  return text[text.index("ENTRY") :]


def test_attention_normalising_after_the_value_contraction_matches_softmax(monkeypatch):
  """`layers._attend` divides the value contraction by the row sums of exp(scores - max) instead
  of contracting softmax probabilities, over [B, KV, G*T, S] scores: values and gradients (q, k, v)
  must equal the plain softmax formula's, with large scores (the max shift matters: exp(scores)
  alone overflows), GQA groups, and a query row with every key masked (uniform weights, as softmax
  gives). Its compiled backward transposes no score-sized array (written over [B, KV, G, T, S],
  as the plain formula is, XLA:CPU transposes three)."""
  import re

  from rlhf_jax.models.layers import _MASK_VALUE, _attend

  rs = np.random.RandomState(31)
  b, t, kv, g, d, s = 2, 5, 2, 3, 8, 7
  q = jnp.asarray(rs.normal(size=(b, t, kv, g, d)) * 20.0, jnp.float32)  # scores up to ~1e3
  k = jnp.asarray(rs.normal(size=(b, kv, s, d)), jnp.float32)
  v = jnp.asarray(rs.normal(size=(b, kv, s, d)), jnp.float32)
  mask = rs.rand(b, 1, 1, t, s) < 0.6
  mask[..., 0] = True
  mask[1, ..., 2, :] = False  # row 1, query 2: nothing to attend to
  mask = jnp.asarray(mask)
  cot = jnp.asarray(rs.normal(size=(b, t, kv, g, d)), jnp.float32)

  def plain(q, k, v):
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k) / math.sqrt(d)
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASK_VALUE), axis=-1)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v)

  # _attend takes and returns [B, KV, G, T, D]
  ours = lambda q, k, v: jnp.moveaxis(_attend(jnp.moveaxis(q, 1, 3), k, v, mask), 3, 1)
  out = np.asarray(ours(q, k, v))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, plain(q, k, v), atol=1e-5, rtol=1e-5)
  uniform = jnp.broadcast_to(v[1].mean(axis=1)[:, None, :], (kv, g, d))
  np.testing.assert_allclose(out[1, 2], uniform, atol=1e-6)
  grads = [
      jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
      for f in (ours, plain)
  ]
  for got, want in zip(*grads):
    assert np.abs(np.asarray(want)).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

  def score_sized_transposes(f):
    grad = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))
    entry = _entry_as_train_steps_compile(monkeypatch, grad, q, k, v)
    arrays = re.findall(r"%(\S+) = f32\[([\d,]+)\]\S* (\w+)\(", entry)
    return sum(
        math.prod(map(int, shape.split(","))) == b * kv * g * t * s
        and any(w in name or w == op for w in ("transpose", "copy"))
        for name, shape, op in arrays
    )

  assert score_sized_transposes(ours) == 0
  assert score_sized_transposes(plain) > 0


def test_rope_angles_from_the_table_equal_computed_ones_and_sin_runs_once(monkeypatch):
  """Without a cache the rotary sin/cos are gathered from a table computed once per forward: the
  same values as computed from the positions, positions up to max(max_seq_len, T) - 1 (past both:
  NaN), and the compiled forward evaluates sine in one fusion, not once per layer (XLA:CPU fuses
  sin computed from positions into every layer's RoPE, as the forced-off run shows)."""
  import re

  from rlhf_jax.models import transformer as transformer_module
  from rlhf_jax.models.layers import rope_angles

  cfg = LLAMA  # max_seq_len 32
  positions = jnp.asarray([[0, 5, 31, 47], [3, 2, 1, 0]], jnp.int32)
  wide = jnp.zeros((2, 48), jnp.int32).at[:, :4].set(positions)  # T = 48 > max_seq_len
  for got, want in zip(rope_angles(cfg, wide, table=True), rope_angles(cfg, wide, table=False)):
    np.testing.assert_array_equal(got, want)
  past = rope_angles(cfg, positions.at[0, 3].set(32), table=True)[0]  # T = 4: N = max_seq_len
  assert np.isnan(np.asarray(past[0, 3])).all() and np.isfinite(np.asarray(past[0, :3])).all()

  graphdef, params = random_params(cfg.replace(scan_layers=False), seed=3)  # layers unrolled
  tokens = jnp.zeros((B, T), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))

  def sine_fusions():  # a fresh function each time: traced again, after the monkeypatch too
    forward = jax.jit(lambda *args: apply(graphdef, *args))
    hlo = forward.lower(params, tokens, pos, pos + 1).compile()
    bodies = re.findall(r"\n%[\w.-]+ [^\n]*\{\n(.*?)\n\}", hlo.as_text(), re.S)
    return sum(" sine(" in body for body in bodies)

  assert sine_fusions() == 1
  computed = lambda cfg, positions, table: rope_angles(cfg, positions, table=False)
  monkeypatch.setattr(transformer_module, "rope_angles", computed)
  assert sine_fusions() >= cfg.num_layers


def test_dense_equals_tensordot_and_weight_gradients_transpose_no_output_gradient(monkeypatch):
  """`dense` is x [..., *in] contracted with w [*in, *out]; in a compiled backward pass its weight
  gradients contract the [B*T, in] input and the [B*T, out] output gradient as they lie, where the
  same product written with [B, T] contracting axes made XLA:CPU transpose each output gradient
  into [out, B*T] first (the bench SFT step: ~280 ms of its transposes and copies)."""
  import re

  from rlhf_jax.models import layers as layers_module
  from rlhf_jax.models import transformer as transformer_module
  from rlhf_jax.models.layers import dense

  rng = np.random.RandomState(0)
  x = rng.randn(2, 3, 4, 5).astype(np.float32)
  for w in (rng.randn(5, 6).astype(np.float32), rng.randn(4, 5, 6, 2).astype(np.float32)):
    n_in = w.ndim - 1 if w.ndim == 2 else 2
    np.testing.assert_allclose(dense(x, w, n_in), np.tensordot(x, w, n_in), rtol=1e-5, atol=1e-5)
  with pytest.raises(AssertionError):
    dense(x, rng.randn(4, 6).astype(np.float32))

  cfg = LLAMA.replace(scan_layers=False)
  graphdef, params = random_params(cfg, seed=4)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (B, T)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  loss = lambda p: jnp.mean(apply(graphdef, p, tokens, pos, jnp.ones((B, T), jnp.int32))[0] ** 2)
  transposed = re.compile(rf"= f32\[({cfg.mlp_dim}|{cfg.vocab_size}),{B * T}\]")

  def transposed_gradients():  # a fresh function each time: traced again after the monkeypatch
    entry = _entry_as_train_steps_compile(monkeypatch, jax.grad(loss), params)
    return len(transposed.findall(entry))

  assert transposed_gradients() == 0
  tensordot = lambda x, w, n_in=1: jnp.tensordot(x, w, n_in)
  monkeypatch.setattr(layers_module, "dense", tensordot)
  monkeypatch.setattr(transformer_module, "dense", tensordot)
  assert transposed_gradients() > 0
