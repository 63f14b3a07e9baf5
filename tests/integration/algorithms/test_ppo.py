"""PPO: values and rewards line up with the models, the update sees exactly the rollout's numerics
(ratio 1 at the rollout params), one PPO phase is the plain train step when it has one mini-batch
and is the same on every mesh, prompt files are validated, and the driver runs, logs, exports and
resumes to the same params as an uninterrupted run.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_ppo.py.
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import generate, scoring, sharding
from rlhf_jax.algorithms import ppo, ppo_rollout, rejection_sampling, reward
from rlhf_jax.models import abstract_model, apply
from rlhf_jax.train import checkpoint, create_train_state, make_train_step, metrics, state_shardings
from tests.helpers.ppo import (
    MAX_PROMPT_LEN,
    POLICY_CFG,
    TINY,
    VALUE_CFG,
    driver_config,
    fake_rollout,
    init_params,
    masked_mean,
    ppo_cfg,
    rejection_sampling_config,
)

_SCORE_FNS = {}  # temperature -> jitted score function (one compilation each)


def scored_rollout(models, temperature=1.0, seed=0, rows=8):
  """fake_rollout scored at `models`' params (old_logp, old_values) with random advantages and
  returns: the numpy rollout an update receives."""
  policy_gd, value_gd, params = models
  if temperature not in _SCORE_FNS:
    _SCORE_FNS[temperature] = jax.jit(
        ppo_rollout.make_score_fn(policy_gd, value_gd, {}, temperature=temperature)
    )
  batch = fake_rollout(seed, rows=rows)
  old_logp, _, values, _ = _SCORE_FNS[temperature](
      params["policy"], params["policy"], params["value"], {}, batch
  )
  mask = np.asarray(batch["response_mask"])
  rs = np.random.RandomState(seed + 100)
  rollout = {
      **batch,
      "old_logp": old_logp,
      "old_values": values,
      "advantages": np.where(mask, rs.normal(size=mask.shape), 0.0).astype(np.float32),
      "returns": np.where(mask, rs.normal(size=mask.shape), 0.0).astype(np.float32),
  }
  return jax.device_get(rollout)


# ---------------------------------------------------------------- token values


def test_token_values_are_the_value_models_output_one_position_earlier(models):
  _, value_gd, params = models
  batch = fake_rollout(1)
  values = jax.jit(ppo_rollout.token_values, static_argnums=0)(
      value_gd,
      params["value"],
      batch["tokens"],
      batch["segment_ids"],
      batch["positions"],
      batch["response_mask"],
  )
  raw, _ = jax.jit(apply, static_argnums=0)(
      value_gd, params["value"], batch["tokens"], batch["positions"], batch["segment_ids"]
  )
  values, raw, mask = np.asarray(values), np.asarray(raw), np.asarray(batch["response_mask"])
  assert values.shape == mask.shape and values.dtype == np.float32
  assert not mask[:, 0].any() and mask.sum() > 0
  rows, cols = np.nonzero(mask)
  np.testing.assert_allclose(values[rows, cols], raw[rows, cols - 1], atol=1e-5, rtol=1e-5)
  assert np.all(values[~mask] == 0.0)
  assert np.abs(values[mask]).min() > 0  # real values, not zeros, on the response


def test_value_head_on_the_policy_reads_its_hidden_states_one_position_earlier(models):
  """value_model="policy_head": one forward pass gives the policy's log-probs (as
  scoring.response_logprobs) and values = hidden state at t-1 . score."""
  policy_gd, _, params = models
  batch = fake_rollout(2)
  score = np.random.RandomState(0).normal(size=(TINY["embed_dim"],)).astype(np.float32)
  forward = jax.jit(
      ppo_rollout.policy_forward, static_argnums=(0, 1), static_argnames=("temperature",)
  )
  scaled, logp, values = forward(
      policy_gd, None, params["policy"], {"score": score}, batch, temperature=0.7
  )
  mask = np.asarray(batch["response_mask"])
  model = nnx.merge(policy_gd, params["policy"])
  hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  raw = np.einsum("bte,e->bt", np.asarray(hidden), score)
  rows, cols = np.nonzero(mask)
  np.testing.assert_allclose(
      np.asarray(values)[rows, cols], raw[rows, cols - 1], atol=1e-4, rtol=1e-4
  )
  assert np.all(np.asarray(values)[~mask] == 0.0)
  expected = jax.jit(scoring.response_logprobs, static_argnums=0, static_argnames=("temperature",))(
      policy_gd,
      params["policy"],
      batch["tokens"],
      batch["segment_ids"],
      batch["positions"],
      batch["response_mask"],
      temperature=0.7,
  )
  np.testing.assert_allclose(np.where(mask, logp, 0.0), expected, atol=1e-5, rtol=1e-5)
  assert scaled.shape[1] == mask.shape[1] - 1


@pytest.mark.slow
def test_loss_with_value_head_has_ratio_one_and_value_gradients_reach_the_trunk(models):
  policy_gd, _, params = models
  head = {"score": np.random.RandomState(1).normal(size=(TINY["embed_dim"],)).astype(np.float32)}
  score_fn = jax.jit(ppo_rollout.make_score_fn(policy_gd, None, {}, temperature=1.0))
  batch = fake_rollout(3)
  old_logp, _, values, _ = score_fn(params["policy"], params["policy"], head, {}, batch)
  mask = np.asarray(batch["response_mask"])
  rollout = {
      **batch,
      "old_logp": old_logp,
      "old_values": values,
      "advantages": np.where(mask, 1.0, 0.0).astype(np.float32),
      "returns": np.where(mask, values + 1.0, 0.0).astype(np.float32),
  }
  both = {"policy": params["policy"], "value": head}
  loss_fn = ppo.make_ppo_loss_fn(policy_gd, None, ppo_cfg(vf_coef=1.0))
  (_, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(both, rollout, None)
  assert abs(float(m["approx_kl"])) < 1e-6 and float(m["clip_fraction"]) == 0.0
  assert float(optax.tree.norm(grads["value"])) > 0
  # The value loss alone moves the shared trunk (a separate value model would leave it alone).
  value_only = ppo.make_ppo_loss_fn(policy_gd, None, ppo_cfg(vf_coef=1.0))
  rollout0 = {**rollout, "advantages": np.zeros_like(rollout["advantages"])}
  _, g0 = jax.jit(jax.value_and_grad(value_only, has_aux=True))(both, rollout0, None)
  assert float(optax.tree.norm(g0["policy"]["blocks"])) > 0


# ---------------------------------------------------------------- the loss at the rollout params


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.slow
def test_loss_at_rollout_params_has_ratio_one(models, temperature):
  """Rollout (make_score_fn) and update (make_ppo_loss_fn) compute the same log-probs: at the
  rollout params the ratio is 1, nothing is clipped, and the policy loss is -mean(A)."""
  policy_gd, value_gd, params = models
  rollout = scored_rollout(models, temperature)
  mask = rollout["response_mask"]
  loss_fn = ppo.make_ppo_loss_fn(policy_gd, value_gd, ppo_cfg(temperature=temperature))
  # Under the gradient, as in the update.
  (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rollout, None)
  assert abs(float(m["approx_kl"])) < 1e-6, m["approx_kl"]
  assert float(m["clip_fraction"]) == 0.0
  np.testing.assert_allclose(m["ratio_mean"], 1.0, atol=1e-6)
  np.testing.assert_allclose(
      m["policy_loss"], -masked_mean(rollout["advantages"], mask), atol=1e-6, rtol=1e-6
  )
  assert float(m["value_clip_fraction"]) == 0.0  # values == old values too
  assert float(m["loss_weight"]) == mask.sum()
  np.testing.assert_allclose(
      loss, m["policy_loss"] + 0.1 * m["value_loss"], rtol=1e-6
  )  # vf_coef 0.1
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(optax.tree.norm(grads["policy"])) > 0


# ---------------------------------------------------------------- the update


def setup_update(models, mesh_shape, cfg, lr=0.5):
  """(mesh, shardings, optimizer, state, loss_fn) for models' params on a mesh of mesh_shape."""
  policy_gd, value_gd, params = models
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
  psh, abstract = {}, {}
  for name, cfg_model in (("policy", POLICY_CFG), ("value", VALUE_CFG)):
    _, abstract[name], axes = abstract_model(cfg_model)
    psh[name] = sharding.param_shardings(abstract[name], axes, mesh)
  # SGD: a plain function of the gradients, so comparisons are of the losses and gradients, not of
  # Adam's g / sqrt(v) blowing rounding noise on near-zero gradients up to ~lr.
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr))
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  state = create_train_state(jax.tree.map(jnp.copy, params), optimizer, shardings, seed=0)
  loss_fn = ppo.make_ppo_loss_fn(policy_gd, value_gd, cfg)
  return mesh, shardings, optimizer, state, loss_fn


def run_update(models, mesh_shape, cfg, rollout):
  mesh, shardings, optimizer, state, loss_fn = setup_update(models, mesh_shape, cfg)
  update = ppo.make_ppo_update(loss_fn, optimizer, mesh=mesh, shardings=shardings, cfg=cfg)
  state, out = update(state, sharding.put_batch(rollout, mesh))
  return jax.device_get((state, out))


@pytest.mark.slow  # compiles a whole update / benchmark: minutes of the fast set
def test_one_epoch_of_one_minibatch_is_one_train_step(models):
  cfg = ppo_cfg(epochs=1, minibatches=1)
  rollout = scored_rollout(models)
  state, out = run_update(models, (1, 1, 1), cfg, rollout)

  mesh, shardings, optimizer, ref_state, loss_fn = setup_update(models, (1, 1, 1), cfg)
  step = make_train_step(loss_fn, optimizer, mesh=mesh, state_shardings=shardings)
  ref_state, ref_out = jax.device_get(step(ref_state, sharding.put_batch(rollout, mesh)))

  assert int(state.step) == int(ref_state.step) == 1
  np.testing.assert_array_equal(state.rng, ref_state.rng)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
      state.params,
      ref_state.params,
  )
  for name in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm"):
    np.testing.assert_allclose(out[name], ref_out[name], rtol=1e-5, err_msg=name)
  assert float(out["first_approx_kl"]) < 1e-6 and float(out["first_clip_fraction"]) == 0.0
  moved = max(
      float(np.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(models[2]))
  )
  assert moved > 1e-3  # the step did something


@pytest.mark.slow  # compiles a whole update / benchmark: minutes of the fast set
def test_sharded_update_equals_unsharded(models):
  """A whole PPO phase (2 epochs x 2 shuffled mini-batches) on a (data 2, fsdp 2, tensor 2) mesh
  == on one device. (Short rows: at the driver's ~100 tokens XLA:CPU deadlocks on this mesh.)"""
  cfg = ppo_cfg(epochs=2, minibatches=2)
  rollout = scored_rollout(models)
  ref_state, ref_out = run_update(models, (1, 1, 1), cfg, rollout)
  state, out = run_update(models, (2, 2, 2), cfg, rollout)
  assert int(state.step) == int(ref_state.step) == 4  # epochs x mini-batches optimiser steps
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
      state.params,
      ref_state.params,
  )
  assert all(np.ndim(v) == 0 for v in out.values())
  assert float(out["first_approx_kl"]) < 1e-6 and float(out["first_clip_fraction"]) == 0.0
  assert float(out["approx_kl"]) > 1e-6  # later mini-batches see a policy that moved
  assert set(out) == set(ref_out)
  for name in out:
    np.testing.assert_allclose(out[name], ref_out[name], atol=1e-5, rtol=1e-4, err_msg=name)


@pytest.mark.slow
def test_driver_logs_exports_and_resumes_to_the_same_params(
    tmp_path, exports, tokenizer_dir, compilation_cache, tasks
):
  workdir = tmp_path / "full"
  result = ppo.train(driver_config(exports, tokenizer_dir), str(workdir))
  assert result["iterations"] == 3
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    for name in (
        "reward",
        "kl",
        "gold_combined",
        "gold_helpfulness",
        "gold_safety",
        "loss",
        "score_helpful",
        "length",
        "entropy",
        "beta",
    ):
      assert row.get(f"ppo/{name}") is not None and np.isfinite(row[f"ppo/{name}"]), (name, row)
    assert row["ppo/first_approx_kl"] < 1e-4, row  # rollout and update numerics agree
    assert row["ppo/first_clip_fraction"] == 0.0, row
    assert 1 <= row["ppo/length"] <= 8
    # One reward model: the reward is its score whitened by its statistics on the start policy's
    # samples (config.ppo.reward.normalize="policy"), not by the export's (mean 0.2, std 1.5).
    stats = json.loads((workdir / "reward_stats.json").read_text())["helpful"]
    assert row["ppo/reward"] == pytest.approx(
        (row["ppo/score_helpful"] - stats["mean"]) / stats["std"], abs=1e-5
    )
  assert stats["n"] == len(tasks) and (stats["mean"], stats["std"]) != (0.2, 1.5)
  assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at iteration 1
  assert rows[2]["ppo/kl"] != rows[0]["ppo/kl"]  # ... and it moved
  params, meta = checkpoint.load_params(workdir / "export")
  assert meta["model"]["head"] == "lm" and meta["step"] == 3 * 2 * 2
  assert "lm_head" in params and "score" not in params

  # Preempted after 2 iterations, then rerun: the same final policy.
  resumed = tmp_path / "resumed"
  config = driver_config(exports, tokenizer_dir)
  config.train.stop_after_steps = 2
  assert ppo.train(config, str(resumed))["iterations"] == 2
  assert not (resumed / "export").exists()
  config.train.stop_after_steps = 0
  assert ppo.train(config, str(resumed))["iterations"] == 3
  resumed_params, resumed_meta = checkpoint.load_params(resumed / "export")
  assert resumed_meta["step"] == meta["step"]
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), resumed_params, params
  )
  resumed_rows = metrics.read_jsonl(resumed / "metrics.jsonl")
  assert [r["step"] for r in resumed_rows] == [1, 2, 3]
  for got, expected in zip(resumed_rows, rows):
    for name in ("ppo/reward", "ppo/kl", "ppo/loss", "ppo/gold_combined"):
      np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "value_model, samples", [("separate", 1), ("policy_head", 1), ("separate", 4)]
)
def test_ppo_iterations_raise_a_simple_reward(models, value_model, samples):
  """The sign check of the whole loop: with reward = the fraction of response tokens from the
  lower half of the vocabulary (0.5 for the random policy), a few PPO iterations (sample, score,
  GAE, clipped updates, KL to the frozen start) must raise it clearly; also with 4 samples of
  each of 8 prompts and the leave-one-out baseline (the same 32 responses per iteration)."""
  policy_gd, value_gd, params = models
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  cfg = ppo_cfg(
      prompts_per_iteration=32 // samples,
      samples_per_prompt=samples,
      max_new_tokens=8,
      epochs=2,
      minibatches=1,
      vf_coef=0.5,
      reward_baseline="rloo" if samples > 1 else "none",
  )
  cfg.kl.beta = 0.01
  psh, abstract = {}, {}
  _, abstract["policy"], axes = abstract_model(POLICY_CFG)
  psh["policy"] = sharding.param_shardings(abstract["policy"], axes, mesh)
  start = {"policy": params["policy"]}
  if value_model == "separate":
    _, abstract["value"], axes = abstract_model(VALUE_CFG)
    psh["value"] = sharding.param_shardings(abstract["value"], axes, mesh)
    # The head re-initialised at ~0, as config.ppo.value_head="fresh" does: with the fixture's
    # O(1) random value head the advantages are noise and 20 iterations learn nothing.
    start["value"] = {**params["value"], "score": np.zeros(TINY["embed_dim"], np.float32)}
    graphdef = value_gd
  else:
    abstract["value"] = {"score": jax.ShapeDtypeStruct((TINY["embed_dim"],), jnp.float32)}
    psh["value"] = sharding.param_shardings(
        abstract["value"], {"score": jax.sharding.PartitionSpec("embed")}, mesh
    )
    start["value"], graphdef = {"score": np.zeros(TINY["embed_dim"], np.float32)}, None
  optimizer = optax.adam(3e-3)
  shardings = state_shardings(optimizer, psh, abstract, mesh)
  state = create_train_state(jax.tree.map(jnp.copy, start), optimizer, shardings, seed=0)
  iterate = ppo.make_iteration(
      policy_gd,
      graphdef,
      {},
      POLICY_CFG,
      None,
      optimizer,
      mesh=mesh,
      policy_shardings=psh["policy"],
      shardings=shardings,
      cfg=cfg,
      eos_id=-1,
      pad_id=0,
  )
  low = TINY["vocab_size"] // 2
  text_reward = lambda out: np.asarray((np.asarray(out.tokens) < low).mean(axis=1), np.float32)
  prompts = np.random.RandomState(0).randint(3, low, (32 // samples, 4)).astype(np.int32)
  mask, unsafe = np.ones_like(prompts, bool), np.zeros(len(prompts), bool)
  rewards = []
  for i in range(20):
    state, info = iterate(
        state,
        params["policy"],
        {},
        prompts,
        mask,
        unsafe,
        jax.random.key(i),
        0.01,
        text_reward=text_reward,
    )
    rewards.append(float(np.mean(info["reward"])))
    if i == 0:  # each prompt sampled `samples` times, its rows contiguous, each its own sample
      assert info["out"].tokens.shape[0] == 32
      if samples > 1:
        assert len({tuple(t) for t in np.asarray(info["out"].tokens)[:samples]}) > 1
  assert np.mean(rewards[:2]) < 0.65, rewards
  # +0.2 is ~10 standard errors of a 3-iteration mean of 32 x 8 tokens: a loop that does not
  # learn stays at ~0.5 (the runs reach +0.23 to +0.4, depending on the sampler's stream).
  assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.2, rewards


@pytest.mark.slow
def test_frozen_models_in_bfloat16_score_close_to_float32(exports, models):
  """config.ppo.frozen_dtype="bfloat16": reward models and the reference are held and run in
  bf16; their scores / log-probs stay within bf16 rounding of the fp32 ones."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  fp32 = reward.load_reward_model(exports["helpful"], mesh)
  bf16 = reward.load_reward_model(exports["helpful"], mesh, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype("bfloat16")}
  batch = fake_rollout(4)
  args = (batch["tokens"], batch["segment_ids"], batch["positions"])
  score = jax.jit(scoring.last_token_scores, static_argnums=0)
  a, b = np.asarray(score(fp32.graphdef, fp32.params, *args)), np.asarray(
      score(bf16.graphdef, bf16.params, *args)
  )
  assert b.dtype == np.float32
  np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max() + 1e-3)
  policy_gd, _, params = models
  ref_gd = abstract_model(
      dataclasses.replace(POLICY_CFG, dtype="bfloat16", param_dtype="bfloat16")
  )[0]
  logp = jax.jit(scoring.response_logprobs, static_argnums=0)
  full = np.asarray(logp(policy_gd, params["policy"], *args, batch["response_mask"]))
  half = np.asarray(
      logp(ref_gd, reward.cast_params(params["policy"], "bfloat16"), *args, batch["response_mask"])
  )
  mask = np.asarray(batch["response_mask"])
  assert np.abs(half - full)[mask].mean() < 0.05 and np.all(half[~mask] == 0.0)


@pytest.mark.slow
def test_driver_with_helpful_and_safety_models_llama2(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  config = driver_config(exports, tokenizer_dir, iterations=1)
  config.ppo.reward.update(safety=exports["safety"], combine="llama2")
  config.ppo.frozen_dtype = "bfloat16"  # reward models and reference in bf16
  config.ppo.reward.normalize = "export"  # whitened by the exports' statistics, as before
  workdir = tmp_path / "llama2"
  assert ppo.train(config, str(workdir))["iterations"] == 1
  assert not (workdir / "reward_stats.json").exists()
  (row,) = metrics.read_jsonl(workdir / "metrics.jsonl")
  for name in ("score_helpful", "score_safety", "reward", "kl", "gold_combined"):
    assert row.get(f"ppo/{name}") is not None and np.isfinite(row[f"ppo/{name}"]), (name, row)
  assert row["ppo/score_helpful"] != row["ppo/score_safety"]  # two different models
  assert checkpoint.read_export_metadata(workdir / "export")["model"]["head"] == "lm"


@pytest.mark.slow
def test_driver_with_value_head_on_the_policy_and_the_gold_reward(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  config = driver_config(exports, tokenizer_dir, iterations=2)
  config.ppo.update(value_model="policy_head", value_init_from="")
  config.ppo.reward.update(helpful="", gold=True)  # the toy world's gold reward, no reward model
  # 2 samples of each of 4 prompts, rewards relative to the other sample (8 rows, as before).
  config.ppo.update(prompts_per_iteration=4, samples_per_prompt=2, reward_baseline="rloo")
  config.ppo.update(eval_every=2, eval_prompts=8)  # held-out gold + KL at iterations 0 and 2
  config.data.eval_source = exports["prompts"]
  workdir = tmp_path / "head"
  assert ppo.train(config, str(workdir))["iterations"] == 2
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  evals = [r for r in rows if "eval/kl" in r]
  rows = [r for r in rows if "ppo/reward" in r]
  assert [r["step"] for r in evals] == [0, 2]
  assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is the reference
  for row in evals:
    assert 0.0 <= row["eval/combined"] <= 1.0 and row["eval/length"] >= 1
  for row in rows:
    assert row["ppo/reward"] == pytest.approx(
        row["ppo/gold_combined"], abs=1e-6
    )  # gold is the reward
    assert row["ppo/first_approx_kl"] < 1e-4 and np.isfinite(row["ppo/value_loss"])
    assert not any(k.startswith("ppo/score_") for k in row)
  params, meta = checkpoint.load_params(workdir / "export")
  assert "score" not in params and meta["model"]["head"] == "lm"  # the export is the policy alone
  # Resume: the checkpoint holds the value head beside the policy.
  config.ppo.iterations = 3
  assert ppo.train(config, str(workdir))["iterations"] == 3
  steps = [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "eval/kl" in r]
  assert steps == [0, 2, 3]  # no second evaluation at 0 on resume; the last iteration is evaluated

  for update, match in [
      (dict(reward_baseline="rloo"), "samples_per_prompt >= 2"),
      (dict(reward_baseline="mean", samples_per_prompt=2), "reward_baseline='mean'"),
      (dict(samples_per_prompt=2, minibatches=3), "not a positive multiple"),
  ]:
    bad = driver_config(exports, tokenizer_dir, iterations=1)
    bad.ppo.update(**update)
    with pytest.raises(ValueError, match=match):
      ppo.train(bad, str(tmp_path / "bad"))
  config.ppo.value_model = "shared"
  with pytest.raises(ValueError, match="value_model='shared'"):
    ppo.train(config, str(tmp_path / "bad"))
  config.ppo.update(value_model="separate", value_head="random")
  with pytest.raises(ValueError, match="value_head='random'"):
    ppo.train(config, str(tmp_path / "bad"))
  gold_on_plain = driver_config(exports, tokenizer_dir, iterations=1)
  gold_on_plain.ppo.reward.gold = True
  plain = tmp_path / "plain.jsonl"
  plain.write_text(json.dumps({"prompt": "Hello there"}) + "\n")
  gold_on_plain.data.source = str(plain)
  with pytest.raises(ValueError, match="toy-world task records"):
    ppo.train(gold_on_plain, str(tmp_path / "plain"))


@pytest.mark.slow
def test_rejection_sampling_keeps_the_best_of_k_across_rounds(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  workdir = tmp_path / "rs"
  result = rejection_sampling.train(rejection_sampling_config(exports, tokenizer_dir), str(workdir))
  assert result["rounds"] == 2
  rounds = json.loads((workdir / "rounds.json").read_text())
  assert [r["round"] for r in rounds] == [1, 2]
  for row in rounds:
    # The kept response is the reward model's argmax over K samples, so never worse than sample 0.
    assert row["best_reward"] >= row["sample_reward"] - 1e-6
    assert np.isfinite(row["best_gold"]) and np.isfinite(row["sample_gold"])
  round1 = [
      json.loads(line) for line in (workdir / "round_1" / "kept.jsonl").read_text().splitlines()
  ]
  round2 = [
      json.loads(line) for line in (workdir / "round_2" / "kept.jsonl").read_text().splitlines()
  ]
  best1 = {r["prompt"]: r["reward"] for r in round1}
  for record in round2:  # the same prompts every round; a prompt never keeps a worse response
    if record["prompt"] in best1:
      assert record["reward"] >= best1[record["prompt"]] - 1e-6
  assert rounds[1]["from_earlier_rounds"] == sum(r["round"] == 1 for r in round2)
  # Round 2 fine-tuned round 1's policy; the final export is round 2's.
  round2_config = json.loads((workdir / "round_2" / "config.json").read_text())
  assert round2_config["init_from"] == str(workdir / "round_1" / "export")
  final, _ = checkpoint.load_params(workdir / "export")
  last, _ = checkpoint.load_params(workdir / "round_2" / "export")
  jax.tree.map(np.testing.assert_array_equal, final, last)
  # A rerun skips both finished rounds.
  assert (
      rejection_sampling.train(rejection_sampling_config(exports, tokenizer_dir), str(workdir))[
          "rounds"
      ]
      == 2
  )


@pytest.mark.slow
def test_best_of_k_scores_each_prompt_once_and_equals_the_plain_rows(tokenizer, tasks):
  """best_of_k samples K per prompt with one prefill and scores them with the prompt held once
  per row (share): each sample's reward-model score equals the plain row's (the same samples,
  drawn again here, scored without sharing)."""
  policy_gd, policy = init_params(POLICY_CFG, 0)
  rm_gd, rm_params = init_params(VALUE_CFG, 1)
  sampler = generate.Sampler(policy_gd, POLICY_CFG)
  rm = types.SimpleNamespace(graphdef=rm_gd, params=rm_params)
  k, prompts, rng = 3, tasks[:2], jax.random.key(5)
  out = rejection_sampling.best_of_k(
      policy,
      sampler,
      {"helpful": rm},
      None,
      tokenizer,
      prompts,
      k=k,
      temperature=1.0,
      max_new_tokens=8,
      max_prompt_len=MAX_PROMPT_LEN,
      batch_prompts=2,
      rng=rng,
  )
  tokens, mask = ppo_rollout.encode_prompts(
      tokenizer, [r for r in prompts for _ in range(k)], MAX_PROMPT_LEN
  )
  gen = sampler(
      policy,
      tokens,
      mask,
      jax.random.fold_in(rng, 0),
      max_new_tokens=8,
      temperature=1.0,
      eos_id=tokenizer.eos_token_id,
      pad_id=tokenizer.pad_token_id,
  )
  assert ppo_rollout.decode_responses(tokenizer, gen) == [t for o in out for t in o["texts"]]
  assert len(set(out[0]["texts"])) > 1  # K different samples
  seq, segment_ids, positions, _ = generate.full_sequence(tokens, mask, gen)
  plain = jax.jit(scoring.last_token_scores, static_argnums=0)(
      rm_gd, rm_params, seq, segment_ids, positions
  )
  np.testing.assert_allclose(
      np.concatenate([o["scores"]["helpful"] for o in out]), np.asarray(plain), atol=1e-4, rtol=1e-4
  )


@pytest.mark.slow
def test_rejection_sampling_stopped_in_each_round_ends_identically(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  """Stopped mid-SFT in round 1 and again in round 2, rerun each time: the kept (replay) sets,
  the round summary and the final policy equal an uninterrupted run's."""
  config = rejection_sampling_config(exports, tokenizer_dir)
  config.train.update(steps=4, checkpoint_every=1)
  straight4 = tmp_path / "straight4"
  rejection_sampling.train(config, str(straight4))
  resumed = tmp_path / "resumed"
  config.train.stop_after_steps = 3  # round 1: 3 of 4 steps; round 1 done + round 2: 2 of 4; ...
  outcomes = [rejection_sampling.train(config, str(resumed)) for _ in range(3)]
  assert [o.get("stopped_in_round") for o in outcomes] == [1, 2, None]
  for name in ("round_1/kept.jsonl", "round_2/kept.jsonl", "rounds.json"):
    assert (resumed / name).read_text() == (straight4 / name).read_text(), name
  got, _ = checkpoint.load_params(resumed / "export")
  expected, _ = checkpoint.load_params(straight4 / "export")
  jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.slow
def test_rejection_sampling_with_fresh_prompts_each_round(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  config = rejection_sampling_config(exports, tokenizer_dir)
  config.rejection_sampling.update(fresh_prompts=True, prompts_per_round=4)
  workdir = tmp_path / "fresh"
  assert rejection_sampling.train(config, str(workdir))["rounds"] == 2
  prompts = [r["prompt"] for r in ppo.load_prompts(exports["prompts"])]
  for r, expected in ((1, prompts[:4]), (2, prompts[4:8])):  # the next unseen prompts each round
    kept = [
        json.loads(line)
        for line in (workdir / f"round_{r}" / "kept.jsonl").read_text().splitlines()
    ]
    assert [k["prompt"] for k in kept] == [p for p in expected if p in {k["prompt"] for k in kept}]
    assert all(k["round"] == r for k in kept) and len(kept) >= 3
