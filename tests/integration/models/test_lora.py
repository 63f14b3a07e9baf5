"""LoRA: B = 0 is the base model bit for bit; training moves only the adapters, which alone have
optimiser state; merged params compute what the adapters compute and export to HF (checked against
transformers-PyTorch); the reference is the base; a sharded forward equals a single-device one; SFT
and DPO run end to end with LoRA from a base export.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/models/test_lora.py.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding
from rlhf_jax.algorithms import common, dpo, ppo, sft
from rlhf_jax.configs.base import base_config
from rlhf_jax.hf import checkpoints as hf
from rlhf_jax.losses.sft import make_sft_loss_fn
from rlhf_jax.models import ModelConfig, abstract_model, apply, create_model, lora, split_model
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.ppo import driver_config
from tests.helpers.preference import TINY, export_lm, learnable_pairs, write_jsonl

ALL_LLAMA = ("q", "k", "v", "o", "gate", "up", "down")
LLAMA = ModelConfig(**TINY)
GPT2 = ModelConfig(**{**TINY, "family": "gpt2", "num_kv_heads": None, "tie_embeddings": True})


def _batch(cfg, seed=0, batch=4, length=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (batch, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, batch)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)  # right padding
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0) * mask
  return tokens * mask, positions.astype(np.int32), mask


def _logits(graphdef, params, cfg, seed=0):
  tokens, positions, segments = _batch(cfg, seed)
  out, _ = jax.jit(apply, static_argnums=0)(graphdef, params, tokens, positions, segments)
  return np.asarray(out)


def _randomize_b(params, seed=1, std=0.05):
  """Adapters as after training: B != 0."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [
      std * jax.random.normal(k, x.shape, x.dtype) if str(p[-1].key).endswith("_lora_b") else x
      for (p, x), k in zip(leaves, keys)
  ]
  return jax.tree.unflatten(treedef, out)


def _adapter_leaves(params) -> dict:
  return {
      jax.tree_util.keystr(p): x
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
      if lora.is_adapter(p)
  }


@pytest.mark.slow
@pytest.mark.parametrize(
    "base, targets",
    [(LLAMA, ALL_LLAMA), (LLAMA, ("q", "v")), (GPT2, ("q", "k", "v", "o", "up", "down"))],
)
def test_zero_b_and_the_reference_are_the_base_model_bit_for_bit(base, targets):
  cfg = base.replace(lora_rank=4, lora_targets=targets)
  base_gd, base_params = split_model(create_model(base, 0))
  graphdef, params = split_model(create_model(cfg, 0))
  adapters = _adapter_leaves(params)
  assert len(adapters) == 2 * len(targets)
  for name, x in adapters.items():  # stacked per layer: [L, *in, r] and [L, r, *out]
    assert x.shape[0] == cfg.num_layers and cfg.lora_rank in x.shape[1:], name
    if name.endswith("_lora_b']"):
      assert not np.any(np.asarray(x)), name
  # The adapters draw from their own stream: the base params are the same seed's.
  jax.tree.map(np.testing.assert_array_equal, base_params, lora.strip_adapters(params))
  expected = _logits(base_gd, base_params, base)
  np.testing.assert_array_equal(_logits(graphdef, params, cfg), expected)
  # After training (B != 0) the model differs; its reference (adapters off) is the base again,
  # built from the same base arrays.
  trained = _randomize_b(params)
  assert np.abs(_logits(graphdef, trained, cfg) - expected).max() > 1e-3
  reference = lora.reference_params(trained)
  assert reference["blocks"]["attn"]["q"] is trained["blocks"]["attn"]["q"]  # no copy
  np.testing.assert_array_equal(_logits(graphdef, reference, cfg), expected)


@pytest.mark.parametrize("base, targets", [(LLAMA, ALL_LLAMA), (GPT2, ("q", "o", "up", "down"))])
def test_merged_params_compute_the_adapter_forward(base, targets):
  cfg = base.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
  graphdef, params = split_model(create_model(cfg, 0))
  params = _randomize_b(params)
  merged, merged_cfg = lora.merge_lora(params, cfg)
  assert merged_cfg == base and merged_cfg.to_dict() == base.to_dict()  # no LoRA keys left
  assert jax.tree.structure(merged) == jax.tree.structure(split_model(create_model(base, 0))[1])
  np.testing.assert_allclose(
      _logits(abstract_model(base)[0], merged, base),
      _logits(graphdef, params, cfg),
      atol=2e-5,
      rtol=0,
  )
  assert lora.merge_lora(merged, base) == (merged, base)  # no LoRA: unchanged


def test_merged_hf_export_loads_back_and_matches_pytorch(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = LLAMA.replace(lora_rank=4, lora_targets=ALL_LLAMA)
  graphdef, params = split_model(create_model(cfg, 0))
  params = _randomize_b(params)
  expected = _logits(graphdef, params, cfg)
  out = hf.export_hf(params, cfg, tmp_path / "hf")  # merges the adapters itself
  loaded_gd, loaded, loaded_cfg = hf.load_hf(out)
  assert loaded_cfg.lora_rank == 0
  np.testing.assert_allclose(_logits(loaded_gd, loaded, loaded_cfg), expected, atol=2e-5, rtol=0)
  tokens, positions, mask = _batch(cfg)
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  with torch.no_grad():
    ref = model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    ).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(ref[real], expected[real], atol=1e-4, rtol=0)


def _lora_config(tmp_path, rank=4, targets=("q", "v", "down")):
  config = base_config()
  config.init_from = str(tmp_path / "lm")
  config.mesh.shape = (2, 2, 2)
  config.optim.update(lr=1e-2, warmup_steps=0)
  config.train.update(steps=3, batch_size=8, seq_len=32)
  config.lora.update(rank=rank, targets=targets)
  return config


@pytest.mark.slow
def test_training_moves_only_the_adapters_which_alone_have_optimiser_state(tmp_path):
  base_params = export_lm(tmp_path / "lm")
  config = _lora_config(tmp_path)
  mesh = common.make_mesh(config)
  model_cfg = common.model_config(config)
  assert (model_cfg.lora_rank, model_cfg.lora_targets) == (4, ("q", "v", "down"))
  setup = common.setup_training(config, mesh, model_cfg, make_sft_loss_fn)
  start = jax.device_get(setup.state.params)
  jax.tree.map(np.testing.assert_array_equal, base_params, lora.strip_adapters(start))

  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  adapters = _adapter_leaves(start)
  moments = [x for x in jax.tree.leaves(setup.state.opt_state) if x.ndim > 0]
  # AdamW's mu and nu for each adapter leaf, nothing for the base: no moment has a base shape.
  assert len(moments) == 2 * len(adapters)
  assert sorted(x.shape for x in moments) == sorted(2 * [x.shape for x in adapters.values()])
  assert nbytes(moments) == 2 * nbytes(adapters) < 0.1 * nbytes(base_params)

  tokens, positions, segments = _batch(model_cfg, batch=8, length=32)
  batch = sharding.put_batch(
      {"tokens": tokens, "positions": positions, "segment_ids": segments, "loss_mask": segments},
      mesh,
  )
  state = setup.state
  losses = []
  for _ in range(3):
    state, step_metrics = setup.step(state, batch)
    losses.append(float(step_metrics["loss"]))
  assert losses[-1] < losses[0], losses
  end = jax.device_get(state.params)
  # The base is bit-identical; every adapter moved (B from zero, A by the gradient through B).
  jax.tree.map(np.testing.assert_array_equal, lora.strip_adapters(start), lora.strip_adapters(end))
  for name, x in _adapter_leaves(end).items():
    assert not np.array_equal(x, adapters[name]), name


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_lora_forward_equals_single_device(mesh_shape):
  cfg = LLAMA.replace(lora_rank=4, lora_targets=ALL_LLAMA)
  graphdef, abstract, axes = abstract_model(cfg)
  params = _randomize_b(split_model(create_model(cfg, 0))[1])
  expected = _logits(graphdef, params, cfg)
  mesh = sharding.make_mesh(mesh_shape)
  psh = sharding.param_shardings(abstract, axes, mesh)
  # The adapters shard as their weight: A [L, embed, r] over fsdp, B [L, r, heads, d] over tensor.
  assert psh["blocks"]["attn"]["q_lora_a"].spec == P(None, "fsdp", None)
  assert psh["blocks"]["attn"]["q_lora_b"].spec == P(None, None, "tensor", None)
  tokens, positions, segments = _batch(cfg)

  def forward(params, tokens, positions, segments):
    with sharding.activation_sharding(mesh):
      return apply(graphdef, params, tokens, positions, segments)[0]

  out = jax.jit(forward)(
      jax.device_put(params, psh),
      *sharding.put_batch({"t": tokens, "p": positions, "s": segments}, mesh).values(),
  )
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_sft_then_dpo_with_lora_from_a_base_export(tmp_path, words_tokenizer_dir):
  """SFT with LoRA from a base export -> a merged (plain) export -> DPO with LoRA on it (both
  reference modes, the same loss) -> a merged export whose model is plain."""
  base = export_lm(tmp_path / "lm", words_tokenizer_dir)
  config = _lora_config(tmp_path)
  config.model.vocab_size = 0
  config.train.update(
      steps=6,
      batch_size=8,
      seq_len=64,
      eval_every=6,
      eval_batches=1,
      checkpoint_every=6,
      async_checkpoint=False,
  )
  config.data.update(source="toy", toy_num_records=200, tokenizer=str(words_tokenizer_dir))
  config.sample.num_examples = 0
  result = sft.train(config, str(tmp_path / "sft"))
  assert result["step"] == 6 and np.isfinite(result["eval/loss"])
  sft_params, meta = checkpoint.load_params(tmp_path / "sft" / "export")
  assert "lora_rank" not in meta["model"]  # merged: a plain model
  assert jax.tree.structure(sft_params) == jax.tree.structure(base)
  changed = lambda a, b: not np.array_equal(a, b)
  assert changed(
      sft_params["blocks"]["attn"]["q"], base["blocks"]["attn"]["q"]
  )  # adapters merged in
  np.testing.assert_array_equal(sft_params["blocks"]["attn"]["k"], base["blocks"]["attn"]["k"])
  np.testing.assert_array_equal(sft_params["embed"], base["embed"])

  source = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(32))
  results, exports = {}, {}
  for mode in ("precompute", "per_batch"):
    c = _lora_config(tmp_path)
    c.algorithm = "dpo"
    c.init_from = str(tmp_path / "sft" / "export")
    c.model.vocab_size = 0
    c.train.update(
        steps=4,
        batch_size=8,
        seq_len=128,
        log_every=1,
        eval_every=4,
        eval_batches=1,
        checkpoint_every=4,
        async_checkpoint=False,
    )
    c.data.update(
        kind="pairwise",
        source=source,
        tokenizer=str(words_tokenizer_dir),
        eval_fraction=0.25,
        packing=True,
    )
    c.reward.comparisons_per_row = 3
    c.dpo.reference = mode
    c.dpo.sigmoid.beta = 0.5
    c.lora.merge_on_export = mode == "precompute"
    results[mode] = dpo.train(c, str(tmp_path / mode))
    logged = metrics.read_jsonl(tmp_path / mode / "metrics.jsonl")
    first = next(r for r in logged if "train/loss" in r)
    # The reference is the starting model (the base, adapters off): DPO starts at ln 2.
    np.testing.assert_allclose(first["train/loss"], np.log(2), atol=1e-5)
    exports[mode] = checkpoint.load_params(tmp_path / mode / "export")
  assert "lora_rank" not in exports["precompute"][1]["model"]
  assert exports["per_batch"][1]["model"]["lora_rank"] == 4  # merge_on_export=False: adapters kept
  np.testing.assert_allclose(
      results["precompute"]["eval/loss"], results["per_batch"]["eval/loss"], rtol=1e-4
  )
  merged, _ = lora.merge_lora(
      exports["per_batch"][0], ModelConfig.from_dict(exports["per_batch"][1]["model"])
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
      exports["precompute"][0],
      merged,
  )
  # An unmerged export loads as a policy (with its adapters) for sampling and evaluation.
  policy = common.load_policy(str(tmp_path / "per_batch" / "export"), sharding.make_mesh((8, 1, 1)))
  assert "q_lora_a" in policy.params["blocks"]["attn"]


@pytest.mark.slow
def test_ppo_with_lora_trains_adapters_and_a_value_head_against_the_base(
    tmp_path, exports, tokenizer_dir
):
  """PPO (value head on the policy, gold reward): the reference is the base under the adapters
  (KL 0 at the first iteration), the base stays as exported, the adapters and the head train."""
  config = driver_config(exports, tokenizer_dir, iterations=2)
  config.ppo.update(
      value_model="policy_head", value_init_from="", prompts_per_iteration=4, samples_per_prompt=2
  )
  config.ppo.reward.update(helpful="", gold=True)
  config.lora.update(rank=4, targets=("q", "v", "up"), merge_on_export=False)
  workdir = tmp_path / "ppo"
  assert ppo.train(config, str(workdir))["iterations"] == 2
  rows = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "ppo/kl" in r]
  assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)
  assert rows[0]["ppo/first_approx_kl"] < 1e-4
  params, meta = checkpoint.load_params(workdir / "export")
  base, _ = checkpoint.load_params(exports["lm"])
  assert meta["model"]["lora_rank"] == 4
  jax.tree.map(np.testing.assert_array_equal, base, lora.strip_adapters(params))
  assert np.any(params["blocks"]["attn"]["q_lora_b"])
