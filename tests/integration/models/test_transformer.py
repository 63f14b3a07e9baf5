"""The decoder against plain references: NumPy forwards, single-row runs, HF's Llama-3 RoPE formula.

Parameters are redrawn in NumPy with O(1) values (norm scales and biases included), so logits are
O(1) and a wrong mask, rotation, bias or head grouping moves them far beyond the 1e-5 tolerances.
Most tests share one jitted forward and the [3, 12] batch shape: XLA:CPU compilation is the cost.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/models/test_transformer.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (
    abstract_model,
    apply,
    init_cache,
    positions_from_mask,
    unstack_layers,
)
from tests.helpers.transformer import (
    _COMPILER_OPTIONS,
    ATOL,
    LLAMA,
    B,
    T,
    random_params,
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
