"""Optimiser, schedule, SFT loss and mixed precision: compared with plain references.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/train/test_train.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sharding
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.models import ModelConfig, abstract_model, create_model, split_model
from rlhf_jax.train import (
    create_train_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)
from rlhf_jax.train.optim import decay_mask
from tests.helpers.train import _optim_cfg


@pytest.mark.slow
def test_weight_decay_skips_norms_biases_embeddings():
  cfg = ModelConfig(
      vocab_size=64,
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      mlp_dim=64,
      family="gpt2",
      tie_embeddings=True,
  )
  _, params = split_model(create_model(cfg, 0))
  mask = decay_mask(params, decay_norms_biases_embeddings=False)
  assert mask["blocks"]["attn"]["q"] and mask["blocks"]["mlp"]["up"]
  assert not mask["blocks"]["attn"]["q_bias"]  # [layers, heads, head_dim] is a bias, not a matrix
  assert not mask["blocks"]["attn_norm"]["scale"] and not mask["blocks"]["mlp"]["up_bias"]
  assert not mask["embed"] and not mask["pos_embed"] and not mask["final_norm"]["scale"]
  everything = decay_mask(params, decay_norms_biases_embeddings=True)
  assert all(jax.tree.leaves(everything))

  # And AdamW really leaves the masked leaves alone when their gradient is zero.
  opt, _ = make_optimizer(
      _optim_cfg(lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip_norm=0.0), 10
  )
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  assert float(jnp.abs(updates["embed"]).max()) == 0.0
  assert float(jnp.abs(updates["blocks"]["mlp"]["up"]).max()) > 0.0


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_params():
  cfg = ModelConfig(
      vocab_size=64,
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      mlp_dim=64,
      dtype="bfloat16",
      param_dtype="float32",
  )
  mesh = sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2])
  graphdef, abstract, axes = abstract_model(cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  _, params = split_model(create_model(cfg, 0))
  opt = optax.adam(1e-2)
  shardings = state_shardings(opt, psh, abstract, mesh)
  state = create_train_state(params, opt, shardings, seed=0)
  step = make_train_step(make_sft_loss_fn(graphdef), opt, mesh=mesh, state_shardings=shardings)
  rs = np.random.RandomState(0)
  batch = dict(
      tokens=rs.randint(1, 64, (4, 16)).astype(np.int32),
      loss_mask=np.ones((4, 16), bool),
      segment_ids=np.ones((4, 16), np.int32),
      positions=np.tile(np.arange(16, dtype=np.int32), (4, 1)),
  )
  losses = []
  for _ in range(5):
    state, metrics = step(state, sharding.put_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.slow
def test_cpu_train_steps_ask_for_the_ynn_dot_fusion_and_match_without_it(monkeypatch):
  """On a one-device CPU mesh the train step is compiled with XLA's YNNPACK fusion on every dot
  and reduction (train_compiler_options); RLHF_JAX_CPU_YNN=0 leaves XLA's default; both compute
  the same step.
  A mesh of several CPU devices never asks (YNNPACK's threads starved the host collectives)."""
  from rlhf_jax.train import train_compiler_options

  assert train_compiler_options(sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2])) is None
  assert train_compiler_options(sharding.make_mesh((2, 2, 2))) is None
  cfg = ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  graphdef, abstract, axes = abstract_model(cfg)
  psh = sharding.param_shardings(abstract, axes, mesh)
  _, params = split_model(create_model(cfg, 0))
  opt = optax.sgd(0.1)  # params move linearly in the gradients (Adam's first step is ~sign(g))
  shardings = state_shardings(opt, psh, abstract, mesh)
  rs = np.random.RandomState(0)
  batch = sharding.put_batch(
      dict(
          tokens=rs.randint(1, 64, (4, 16)).astype(np.int32),
          loss_mask=np.ones((4, 16), bool),
          segment_ids=np.ones((4, 16), np.int32),
          positions=np.tile(np.arange(16, dtype=np.int32), (4, 1)),
      ),
      mesh,
  )
  results, hlo = {}, {}
  for setting in ("1", "0"):
    monkeypatch.setenv("RLHF_JAX_CPU_YNN", setting)
    assert (train_compiler_options(mesh) is None) == (setting == "0")
    step = make_train_step(
        make_sft_loss_fn(graphdef), opt, mesh=mesh, state_shardings=shardings, donate=False
    )
    state = create_train_state(params, opt, shardings, seed=0)
    hlo[setting] = step.lower(state, batch).compile().as_text()
    results[setting] = jax.device_get(step(state, batch))
  assert hlo["1"] != hlo["0"]  # the option reached the compiler
  # Reductions (RMSNorm, softmax, the optimiser's norms) stay in YNNPACK as in XLA's default: the
  # option replaces XLA's set, and a dot-only set sent them to reduce-window loops ~10x slower
  # (a weight's sum of squares, the clip norm's and the metrics', at the bench model's size).
  monkeypatch.setenv("RLHF_JAX_CPU_YNN", "1")
  weight = jax.ShapeDtypeStruct((6, 512, 1344), jnp.float32)
  sum_sq = jax.jit(lambda w: jnp.sum(w * w), compiler_options=train_compiler_options(mesh))
  compiled = sum_sq.lower(weight).compile().as_text()
  assert "ynn_fusion" in compiled and "reduce-window" not in compiled
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results.values()
  )
