"""HF checkpoints: our model loaded from transformers' safetensors computes what PyTorch computes.

Tiny random-weight models of each supported family are built with transformers, saved as safetensors
and loaded with `rlhf_jax.hf`; transformers-PyTorch is the reference for logits, greedy generation
and reward scores. Exports go back through transformers' own `from_pretrained`.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/hf/test_checkpoints.py.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from rlhf_jax import generate, sharding
from rlhf_jax.hf import checkpoints as hf
from rlhf_jax.models import abstract_model, apply
from tests.helpers.hf import (
    MODELS,
    VOCAB,
    _assert_bit_exact,
    _our_logits,
    _padded_batch,
    build_hf_dirs,
)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  return build_hf_dirs(tmp_path_factory)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_matches_pytorch(hf_dirs, name):
  graphdef, params, _ = hf.load_hf(hf_dirs[name])
  prompts = [[5, 17, 33, 2, 9, 100, 7], [42, 3, 250], [11, 12, 13, 14, 15]]
  tokens, mask = generate.prompt_batch(prompts, pad_id=0)
  ours = generate.generate(
      graphdef,
      params,
      tokens,
      mask,
      jax.random.key(0),
      max_new_tokens=32,
      temperature=0.0,
      eos_id=-1,
      pad_id=0,
  )  # no EOS: all 32 tokens
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name])
  with torch.no_grad():
    ref = model.generate(
        torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        do_sample=False,
        max_new_tokens=32,
        pad_token_id=0,
    ).numpy()[:, tokens.shape[1] :]
  assert ref.shape == (3, 32)
  assert len(np.unique(ref)) > 8  # the rows do not just repeat one token
  np.testing.assert_array_equal(np.asarray(ours.tokens), ref)


# --- sharded loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_sharded_load_reads_only_each_shard_and_matches_unsharded(
    hf_dirs, name, monkeypatch, tmp_path
):
  mesh = sharding.make_mesh((2, 2, 2))
  reads = []
  read_slice = hf._read_slice
  monkeypatch.setattr(
      hf,
      "_read_slice",
      lambda reader, tensor, index: reads.append((tensor, read_slice(reader, tensor, index).size))
      or read_slice(reader, tensor, index),
  )
  graphdef, params, cfg = hf.load_hf(hf_dirs[name], mesh=mesh)
  monkeypatch.undo()

  _, abstract, axes = abstract_model(cfg)
  targets = sharding.param_shardings(abstract, axes, mesh)
  for (path, x), target in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(targets)
  ):
    assert x.sharding == target, jax.tree_util.keystr(path)
  # Each read is one device's shard of one layer: never a whole tensor that is sharded.
  shard_size = {}
  for layout in hf._layouts(cfg, "transformer." if name == "gpt2" else "model."):
    node = params
    for key in layout.path:
      node = node[key]
    shape = node.sharding.shard_shape(node.shape)[1 if layout.stacked else 0 :]
    for tensor in hf._hf_names(layout, cfg.num_layers):
      shard_size[tensor] = int(np.prod(shape))
  assert {t for t, _ in reads} == set(shard_size)
  for tensor, size in reads:
    assert size == shard_size[tensor], tensor
  assert (
      shard_size["model.embed_tokens.weight" if name == "qwen2" else "transformer.wte.weight"]
      == VOCAB * 64 // 4
  )

  _, plain_params, _ = hf.load_hf(hf_dirs[name])
  out = hf.export_hf(params, cfg, tmp_path / "from_sharded")  # gathers the shards
  _assert_bit_exact(hf.load_hf(out)[1], plain_params)

  tokens, mask, positions = _padded_batch(seed=4, batch=8)
  plain = _our_logits(graphdef, plain_params, tokens, mask, positions)
  batch = sharding.put_batch(
      dict(tokens=tokens, positions=positions, segment_ids=mask.astype(np.int32)), mesh
  )

  @jax.jit
  def forward(params, batch):
    with sharding.activation_sharding(mesh):
      return apply(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])[0]

  sharded = np.asarray(forward(params, batch))
  np.testing.assert_allclose(sharded[mask], plain[mask], atol=1e-5, rtol=1e-5)
