"""The decoder against plain references: NumPy forwards, single-row runs, HF's Llama-3 RoPE formula.

Parameters are redrawn in NumPy with O(1) values (norm scales and biases included), so logits are
O(1) and a wrong mask, rotation, bias or head grouping moves them far beyond the 1e-5 tolerances.
Most tests share one jitted forward and the [3, 12] batch shape: XLA:CPU compilation is the cost.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/models/test_transformer.py.
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
from tests.helpers.transformer import (
    _COMPILER_OPTIONS,
    ATOL,
    LLAMA,
    B,
    T,
    forward,
    random_params,
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
