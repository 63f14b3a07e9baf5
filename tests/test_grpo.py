"""GRPO and RLOO: the PPO driver without a critic. Group advantages against a NumPy loop, GRPO's
k3 KL term in the loss, the loop raises a simple reward, and the driver runs, exports the policy
alone and resumes; its config errors come before any model loads."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import generate, sharding
from rlhf_jax.algorithms import ppo, ppo_rollout
from rlhf_jax.models import abstract_model
from rlhf_jax.train import checkpoint, create_train_state, metrics, state_shardings
from tests.test_ppo import (
    POLICY_CFG,
    TINY,
    driver_config,
    exports,  # noqa: F401
    fake_rollout,
    masked_mean,
    models,
    ppo_cfg,
    tasks,
    tokenizer_dir,
)


def group_inputs(seed=0, prompts=3, k=4, cols=10):
  rs = np.random.RandomState(seed)
  rows = prompts * k
  mask = np.zeros((rows, cols), bool)
  for b in range(rows):  # responses at different offsets and lengths (padding at both ends)
    start = rs.randint(0, 4)
    mask[b, start : start + rs.randint(1, cols - start)] = True
  old = rs.normal(size=(rows, cols)).astype(np.float32)
  ref = (old + 0.3 * rs.normal(size=(rows, cols))).astype(np.float32)
  reward = rs.normal(size=rows).astype(np.float32)
  found = rs.rand(rows) > 0.3
  return old, ref, reward, mask, found


@pytest.mark.parametrize("estimator, scale", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_a_numpy_loop(estimator, scale):
  old, ref, reward, mask, found = group_inputs()
  cfg = ppo_cfg(
      samples_per_prompt=4,
      missing_eos_penalty=-0.5,
      score_clip=1.5,
      kl_kind="k1",
      scale_rewards=scale,
  )
  beta = 0.2
  out = jax.jit(lambda *a: ppo_rollout.group_advantages_fn(*a, cfg=cfg, estimator=estimator))(
      old, ref, reward, mask, found, jnp.float32(beta)
  )
  seq_kl = np.array([np.sum((old[b] - ref[b])[mask[b]]) for b in range(len(reward))])
  score = np.clip(reward.astype(np.float64), -1.5, 1.5) + np.where(found, 0.0, -0.5)
  expected = np.zeros(len(reward))
  for p in range(3):
    idx = list(range(4 * p, 4 * p + 4))
    if estimator == "grpo":
      s = score[idx]
      expected[idx] = (s - s.mean()) / (
          (s.std(ddof=1) if scale else 1.0) + (1e-6 if scale else 0.0)
      )
    else:
      s = score[idx] - beta * seq_kl[idx]
      expected[idx] = [s[i] - np.mean(np.delete(s, i)) for i in range(4)]
  np.testing.assert_allclose(out["sequence_kl"], seq_kl, atol=1e-5)
  adv = np.asarray(out["advantages"])
  np.testing.assert_allclose(adv, np.where(mask, expected[:, None], 0.0), atol=1e-5)
  assert not np.any(out["returns"])
  with pytest.raises(ValueError, match="estimator='gae'"):
    ppo_rollout.group_advantages_fn(old, ref, reward, mask, found, beta, cfg, estimator="gae")


@pytest.mark.slow
def test_grpo_loss_adds_beta_times_the_k3_kl_to_the_reference_and_has_no_critic(models):
  """At the rollout's own params the ratio is 1, so the loss is -mean(A) + beta * mean(k3) over the
  response tokens, with k3 = exp(ref - logp) - (ref - logp) - 1 from a different reference."""
  policy_gd, _, params = models
  batch = fake_rollout(seed=3)
  cfg = ppo_cfg(samples_per_prompt=4)
  cfg.kl.beta = 0.5
  score = jax.jit(ppo_rollout.make_score_fn(policy_gd, None, {}, temperature=1.0))
  _, other = jax.jit(
      lambda k: (
          None,
          jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k, x.shape), params["policy"]),
      )
  )(jax.random.key(1))
  old_logp, ref_logp, values, _ = score(params["policy"], other, None, {}, batch)
  assert not np.any(values)  # no critic: values are 0
  mask = np.asarray(batch["response_mask"])
  adv = np.where(mask, np.random.RandomState(0).normal(size=mask.shape), 0.0).astype(np.float32)
  rollout = {**batch, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": adv}
  loss_fn = ppo.make_ppo_loss_fn(policy_gd, None, cfg, estimator="grpo")
  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      {"policy": params["policy"]}, rollout, None
  )
  d = np.asarray(ref_logp, np.float64) - np.asarray(old_logp, np.float64)
  k3 = masked_mean(np.exp(d) - d - 1.0, mask)
  assert k3 > 1e-3  # the reference really differs
  np.testing.assert_allclose(out["kl_loss"], k3, rtol=1e-4)
  np.testing.assert_allclose(loss, -masked_mean(adv, mask) + 0.5 * k3, rtol=1e-4, atol=1e-6)
  assert "value_loss" not in out and set(grads) == {"policy"}
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  rloo_fn = ppo.make_ppo_loss_fn(policy_gd, None, cfg, estimator="rloo")  # KL not in the loss
  rloo_loss, rloo_out = jax.jit(rloo_fn)({"policy": params["policy"]}, rollout, None)
  np.testing.assert_allclose(rloo_loss, -masked_mean(adv, mask), rtol=1e-4, atol=1e-6)
  assert "kl_loss" not in rloo_out


def critic_free_loop(models, cfg, optimizer, estimator):
  """(iterate, fresh_state, shardings, mesh): `ppo.make_iteration` without a critic on one device
  for the tiny policy; fresh_state() is a new train state from the fixture's params."""
  policy_gd, _, params = models
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, abstract, axes = abstract_model(POLICY_CFG)
  psh = {"policy": sharding.param_shardings(abstract, axes, mesh)}
  shardings = state_shardings(optimizer, psh, {"policy": abstract}, mesh)
  fresh_state = lambda: create_train_state(
      {"policy": jax.tree.map(jnp.copy, params["policy"])}, optimizer, shardings, seed=0
  )
  iterate = ppo.make_iteration(
      policy_gd,
      None,
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
      estimator=estimator,
  )
  return iterate, fresh_state, shardings, mesh


@pytest.mark.slow  # compiles the sampler and two updates
def test_grpo_single_update_skips_the_policy_pass_and_updates_as_with_it(models):
  """epochs = mini-batches = 1: `make_iteration` scores without a policy forward pass (the loss
  holds the differentiated policy's own log-probs constant: ratio exactly 1) and its update equals
  one on a rollout whose old log-probs come from that pass."""
  policy_gd, _, params = models
  cfg = ppo_cfg(
      prompts_per_iteration=2, samples_per_prompt=4, max_new_tokens=6, epochs=1, minibatches=1
  )
  cfg.kl.beta = 0.1
  # Plain SGD: the params move linearly in the gradients. (Adam's first step, g / (|g| + eps), is
  # ill-conditioned where |g| ~ eps: two summation orders of the same gradient -- XLA's YNNPACK
  # dots in two different programs -- land ~1e-5 apart there.)
  optimizer = optax.sgd(1.0)
  iterate, fresh, shardings, mesh = critic_free_loop(models, cfg, optimizer, "grpo")
  reference = jax.tree.map(lambda x: x * 1.01, params["policy"])  # differs: a non-zero KL
  prompts = np.random.RandomState(0).randint(3, 40, (2, 5)).astype(np.int32)
  mask, unsafe = np.ones_like(prompts, bool), np.zeros(2, bool)
  reward = lambda out: np.asarray(np.asarray(out.tokens).mean(axis=1), np.float32)
  state, info = iterate(
      fresh(), reference, {}, prompts, mask, unsafe, jax.random.key(3), 0.1, text_reward=reward
  )
  assert float(info["update"]["first_approx_kl"]) == 0.0  # no separate old log-probs
  assert float(np.max(info["sequence_kl"])) > 0  # the logged KL, from the sampler's log-probs

  # The same rollout with the policy's scoring pass, through the plain update.
  rep = lambda x: np.repeat(x, 4, axis=0)
  tokens, segment_ids, positions, response_mask = generate.full_sequence(
      rep(prompts), rep(mask), info["out"]
  )
  batch = {
      "tokens": tokens,
      "segment_ids": segment_ids,
      "positions": positions,
      "response_mask": response_mask,
  }
  score = jax.jit(ppo_rollout.make_score_fn(policy_gd, None, {}, temperature=cfg.temperature))
  old_logp, ref_logp, _, _ = score(params["policy"], reference, None, {}, batch)
  adv = ppo_rollout.group_advantages_fn(
      old_logp,
      ref_logp,
      info["reward"],
      response_mask,
      info["eos_found"],
      0.1,
      cfg,
      estimator="grpo",
  )
  # Two programs (the decode loop's log-probs and the scoring pass's) sum 6 per-token differences
  # of log-probs ~ -5, each exact to ~1 fp32 ulp (5e-7): 1.4e-6 apart on this VM's CPU, so atol
  # is 6 ulps of a log-prob, not 1e-6.
  np.testing.assert_allclose(info["sequence_kl"], adv["sequence_kl"], rtol=1e-4, atol=3e-6)
  update = ppo.make_ppo_update(
      ppo.make_ppo_loss_fn(policy_gd, None, cfg, estimator="grpo"),
      optimizer,
      mesh=mesh,
      shardings=shardings,
      cfg=cfg,
  )
  expected, _ = update(
      fresh(),
      {**batch, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": adv["advantages"]},
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
      state.params,
      expected.params,
  )
  moved = jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      state.params["policy"],
      params["policy"],
  )
  assert max(jax.tree.leaves(moved)) > 1e-3  # the update did something


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_methods_raise_a_simple_reward(models, estimator):
  """The sign check of the critic-free loop (as PPO's in test_ppo): reward = the fraction of
  response tokens from the lower half of the vocabulary (0.5 for the random policy); 8 prompts x
  4 samples per iteration."""
  _, _, params = models
  cfg = ppo_cfg(
      prompts_per_iteration=8, samples_per_prompt=4, max_new_tokens=8, epochs=2, minibatches=1
  )
  cfg.kl.beta = 0.01
  iterate, fresh_state, _, _ = critic_free_loop(models, cfg, optax.adam(3e-3), estimator)
  state = fresh_state()
  low = TINY["vocab_size"] // 2
  text_reward = lambda out: np.asarray((np.asarray(out.tokens) < low).mean(axis=1), np.float32)
  prompts = np.random.RandomState(0).randint(3, low, (8, 4)).astype(np.int32)
  mask, unsafe = np.ones_like(prompts, bool), np.zeros(8, bool)
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
  assert set(state.params) == {"policy"}
  assert np.mean(rewards[:2]) < 0.65, rewards
  assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.25, rewards


def group_config(exports, tokenizer_dir, algorithm, iterations=2):
  c = driver_config(exports, tokenizer_dir, iterations=iterations)
  c.algorithm = algorithm
  c.ppo.update(prompts_per_iteration=4, samples_per_prompt=2, value_init_from="")
  c.ppo.kl.beta = 0.04
  return c


@pytest.mark.slow
def test_grpo_driver_logs_exports_the_policy_alone_and_resumes(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  config = group_config(exports, tokenizer_dir, "grpo")
  workdir = tmp_path / "grpo"
  assert ppo.train(config, str(workdir))["iterations"] == 2
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  for row in rows:
    for name in ("reward", "kl", "kl_loss", "loss", "policy_loss", "entropy", "gold_combined"):
      assert np.isfinite(row[f"ppo/{name}"]), (name, row)
    assert row["ppo/first_approx_kl"] < 1e-4
    assert not any("value" in k for k in row), row  # no critic
  assert rows[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)  # the rollout policy is the reference
  assert 0.0 < rows[0]["ppo/kl_loss"] < 0.1  # ... and the updates move away from it
  params, meta = checkpoint.load_params(workdir / "export")
  assert (
      "lm_head" in params and "score" not in params and meta["step"] == 2 * 2 * 2
  )  # iterations x epochs x minibatches
  # Resume from the checkpoint (policy only) to a third iteration.
  config.ppo.iterations = 3
  assert ppo.train(config, str(workdir))["iterations"] == 3
  assert [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize(
    "algorithm, update, match",
    [
        ("grpo", dict(samples_per_prompt=1), "samples_per_prompt >= 2"),
        ("rloo", dict(reward_baseline="rloo"), "has its own baseline"),
        ("grpo", dict(kl=dict(adaptive=True)), "fixed config.ppo.kl.beta"),
        (
            "ppo",
            dict(share_prompt=True, samples_per_prompt=1),
            r"share_prompt=True .* samples_per_prompt >= 2 \(it is 1\)",
        ),
        (
            "grpo",
            dict(share_prompt=True, minibatches=8),
            r"share_prompt=True .* a multiple of minibatches x accum_steps = 8 x 1",
        ),
    ],
)
def test_group_config_errors_come_before_any_model_loads(tmp_path, algorithm, update, match):
  config = group_config(
      {"lm": str(tmp_path / "missing"), "prompts": str(tmp_path / "none.jsonl"), "helpful": ""},
      tmp_path,
      algorithm,
  )
  config.ppo.update(update)
  with pytest.raises(ValueError, match=match):
    ppo.train(config, str(tmp_path / "run"))


def test_unknown_algorithm_is_refused_by_the_ppo_driver(tmp_path):
  config = group_config({"lm": "", "prompts": "", "helpful": ""}, tmp_path, "a2c")
  with pytest.raises(ValueError, match="ppo.train runs ppo, grpo, rloo"):
    ppo.train(config, str(tmp_path / "run"))


def test_group_advantages_sharded_over_8_devices_equal_unsharded():
  """Rows (whole groups of 4) split over the devices: the same advantages as on one device."""
  old, ref, reward, mask, found = group_inputs(prompts=8, k=4)
  cfg = ppo_cfg(samples_per_prompt=4)
  fn = jax.jit(lambda *a: ppo_rollout.group_advantages_fn(*a, cfg=cfg, estimator="grpo"))
  want = fn(old, ref, reward, mask, found, jnp.float32(0.1))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda x: jax.device_put(
      x,
      jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
      ),
  )
  got = fn(*(put(x) for x in (old, ref, reward, mask, found)), jnp.float32(0.1))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
