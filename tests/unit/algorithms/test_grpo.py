"""GRPO and RLOO: the PPO driver without a critic. Group advantages against a NumPy loop, GRPO's
k3 KL term in the loss, the loop raises a simple reward, and the driver runs, exports the policy
alone and resumes; its config errors come before any model loads.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_grpo.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.algorithms import ppo, ppo_rollout
from tests.helpers.ppo import (
    group_config,
    ppo_cfg,
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
        (
            "grpo",
            dict(clip_eps_high=0.1),
            r"config.ppo.clip_eps_high=0.1 is below config.ppo.clip_eps=0.2 \(eps_low\)",
        ),
        ("grpo", dict(loss_aggregation="seq-sum"), r"config.ppo.loss_aggregation='seq-sum'"),
        ("grpo", dict(importance_level="group"), r"config.ppo.importance_level='group'"),
        ("ppo", dict(importance_level="sequence"), r"'sequence' \(GSPO\) .* 'grpo' or 'rloo'"),
        ("grpo", dict(overlong_buffer=100), r"config.ppo.overlong_buffer=100 exceeds"),
        ("ppo", dict(dynamic_sampling=True), r"dynamic_sampling=True .* 'grpo' or 'rloo'"),
        ("grpo", dict(tools=("calculator",), max_turns=0), r"config.ppo.max_turns=0: with"),
        (
            "grpo",
            dict(tools=("calculator",), max_decode_steps=4),
            r"config.ppo.max_decode_steps=4 is below max_new_tokens",
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


def test_overlong_penalty_enters_the_group_score():
  """DAPO's soft overlong punishment is added to the reward before the group statistics: with
  max_new_tokens 10 and a buffer of 4, a 9-token response loses 0.75 x factor."""
  old, ref, reward, mask, found = group_inputs()
  cfg = ppo_cfg(samples_per_prompt=4, scale_rewards=False, max_new_tokens=10)
  plain = ppo_rollout.group_advantages_fn(
      old, ref, reward, mask, found, jnp.float32(0.0), cfg, estimator="grpo"
  )
  cfg.update(overlong_buffer=4, overlong_penalty=2.0)
  penalised = ppo_rollout.group_advantages_fn(
      old, ref, reward, mask, found, jnp.float32(0.0), cfg, estimator="grpo"
  )
  lengths = mask.sum(axis=1)
  penalty = 2.0 * np.where(lengths <= 6, 0.0, (6 - lengths) / 4)
  centred = (penalty - penalty.reshape(-1, 4).mean(axis=1).repeat(4))[:, None]
  np.testing.assert_allclose(
      np.asarray(penalised["advantages"]) - np.asarray(plain["advantages"]),
      np.where(mask, centred, 0.0),
      atol=1e-5,
  )
  assert np.any(lengths > 6)


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


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
  """DAPO's dynamic sampling on stub rollouts of 3 prompts x 2 samples: groups with equal rewards
  are dropped, further batches sampled until 3 groups differ (or the rounds run out, then the
  dropped ones fill the batch), and every array is gathered by the chosen rows."""
  from types import SimpleNamespace

  # Rewards of successive rollouts: group rewards (a, b) per prompt; equal = no gradient.
  batches = [
      [(1.0, 1.0), (0.0, 1.0), (2.0, 2.0)],  # keeps group 1
      [(0.5, 0.5), (3.0, 1.0), (4.0, 4.0)],  # keeps group 1
      [(7.0, 8.0), (9.0, 9.0), (6.0, 5.0)],  # keeps groups 0 and 2 (one needed)
  ]

  def rollout(index):
    reward = jnp.asarray(batches[index], jnp.float32).reshape(-1)
    return {"reward": reward, "tag": jnp.full((6, 2), index), "values": None}

  calls = []

  def fake(rounds):
    def _rollout(*args):
      calls.append(args)
      return rollout(len(calls))

    return SimpleNamespace(
        cfg=ppo_cfg(samples_per_prompt=2, dynamic_sampling=True, dynamic_sampling_rounds=rounds),
        _rollout=_rollout,
    )

  r, info = ppo._Iteration._dynamic_batch(
      fake(4), rollout(0), None, None, None, jax.random.key(0), lambda: (None,) * 5
  )
  assert info["rounds"] == 3 and info["filled"] == 0 and info["groups"] == [(0, 1), (1, 1), (2, 0)]
  np.testing.assert_array_equal(r["reward"], [0.0, 1.0, 3.0, 1.0, 7.0, 8.0])
  np.testing.assert_array_equal(r["tag"][:, 0], [0, 0, 1, 1, 2, 2])
  assert r["values"] is None and info["kept"] == pytest.approx(4 / 9)
  calls.clear()
  r, info = ppo._Iteration._dynamic_batch(
      fake(2), rollout(0), None, None, None, jax.random.key(0), lambda: (None,) * 5
  )  # two rollouts: two groups differ, one dropped group fills the batch
  assert info["rounds"] == 2 and info["filled"] == 1
  assert info["groups"] == [(0, 1), (1, 1), (0, 0)]
  np.testing.assert_array_equal(r["reward"], [0.0, 1.0, 3.0, 1.0, 1.0, 1.0])
