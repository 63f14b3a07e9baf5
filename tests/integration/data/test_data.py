"""Data layer: record validation, HF datasets loading, SFT masking, padding vs packing, loader resume,
toy instruction generator.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/data/test_data.py.
"""

import numpy as np
import pytest

from rlhf_jax.data import (
    pack_examples,
    tokenize_sft,
)
from rlhf_jax.toyworld import generate_sft_records
from tests.helpers.data import build_tokenizer, build_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return build_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return build_tokenizer(tokenizer_dir)


@pytest.mark.slow
def test_target_lists_give_the_same_sft_loss_and_gradients(tokenizer):
  """Batches that list their target tokens (`logit_budget`): the LM head on those slots only,
  the same loss, metrics and gradients as every slot's logits; on one device and sharded."""
  import jax

  from rlhf_jax import sharding
  from rlhf_jax.data.sft import logit_budget_for
  from rlhf_jax.losses.sft import make_sft_loss_fn
  from rlhf_jax.models import ModelConfig, create_model, split_model

  examples, _ = tokenize_sft(generate_sft_records(40, seed=3), tokenizer, max_len=64)
  budget = logit_budget_for(examples, 128)
  assert budget < 128  # the prompts leave tokens out
  plain, count = pack_examples(examples, seq_len=128, rows=8)
  listed, count_l = pack_examples(examples, seq_len=128, rows=8, logit_budget=budget)
  assert count == count_l and listed["logit_index"].shape == (8, budget)
  assert listed["logit_mask"].sum() == plain["loss_mask"].sum()
  np.testing.assert_array_equal(listed["tokens"], plain["tokens"])
  cfg = ModelConfig(
      vocab_size=len(tokenizer),
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      max_seq_len=128,
  )
  graphdef, params = split_model(create_model(cfg, 0))
  loss_fn = make_sft_loss_fn(graphdef)
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None), has_aux=True))
  (loss, metrics), grads = grad(params, plain)
  mesh = sharding.make_mesh((2, 2, 2))

  @jax.jit
  def sharded(p, b):
    with sharding.activation_sharding(mesh):
      return jax.value_and_grad(lambda p, b: loss_fn(p, b, None), has_aux=True)(p, b)

  for run, batch in ((grad, listed), (sharded, sharding.put_batch(listed, mesh))):
    (loss_l, metrics_l), grads_l = run(params, batch)
    np.testing.assert_allclose(loss_l, loss, rtol=1e-5)
    for k in ("token_accuracy", "loss_weight"):
      np.testing.assert_allclose(metrics_l[k], metrics[k], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3), grads_l, grads
    )
  with pytest.raises(ValueError, match=r"row 0 needs \d+ target log-probs > logit_budget=2"):
    pack_examples(examples, seq_len=128, rows=8, logit_budget=2)
