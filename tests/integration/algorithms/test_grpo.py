"""GRPO and RLOO: the PPO driver without a critic. Group advantages against a NumPy loop, GRPO's
k3 KL term in the loss, the loop raises a simple reward, and the driver runs, exports the policy
alone and resumes; its config errors come before any model loads.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/algorithms/test_grpo.py.
"""

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import generate
from rlhf_jax.algorithms import ppo, ppo_rollout
from rlhf_jax.train import checkpoint, metrics
from tests.helpers.ppo import (
    TINY,
    critic_free_loop,
    fake_rollout,
    group_config,
    masked_mean,
    ppo_cfg,
)


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


PARITY = """
def parity(prompts, completions, family, **_):
  # Constant on arithmetic prompts (their groups hold no signal), varied elsewhere.
  return [0.0 if f == "arithmetic" else float(len(c) % 2) for c, f in zip(completions, family)]
"""


@pytest.mark.slow
def test_dynamic_sampling_refills_the_batch_and_resumes_bit_identically(
    tmp_path, exports, tokenizer_dir, compilation_cache
):
  """GRPO with DAPO's dynamic sampling on a reward that is constant on arithmetic prompts: those
  groups are dropped and further prompts sampled; a run stopped after iteration 2 and resumed
  ends where an uninterrupted run does (the prompt stream's extra batches are in the checkpoint)."""
  fns = tmp_path / "parity.py"
  fns.write_text(PARITY)

  def config():
    c = group_config(exports, tokenizer_dir, "grpo", iterations=3)
    c.ppo.update(dynamic_sampling=True, dynamic_sampling_rounds=3)
    c.ppo.reward.update(helpful="", functions=(f"{fns}:parity",))
    return c

  straight = tmp_path / "straight"
  ppo.train(config(), str(straight))
  rows = metrics.read_jsonl(straight / "metrics.jsonl")
  assert all(1 <= r["ppo/dynamic_rounds"] <= 3 for r in rows)
  assert any(r["ppo/dynamic_kept"] < 1.0 for r in rows)  # some groups were constant
  assert all(r["ppo/dynamic_rounds"] > 1 or r["ppo/dynamic_kept"] == 1.0 for r in rows)
  stopped = tmp_path / "stopped"
  c = config()
  c.train.stop_after_steps = 2
  ppo.train(c, str(stopped))
  assert [r["step"] for r in metrics.read_jsonl(stopped / "metrics.jsonl")] == [1, 2]
  ppo.train(config(), str(stopped))
  a, _ = checkpoint.load_params(straight / "export")
  b, _ = checkpoint.load_params(stopped / "export")
  jax.tree.map(np.testing.assert_array_equal, a, b)
