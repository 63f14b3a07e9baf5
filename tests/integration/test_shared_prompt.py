"""Shared-prompt rows (prefix sharing): a comparison's prompt is held once and each response attends
to it and to itself only. Log-probs, reward-model scores, and the DPO loss and its gradients equal
those of the unshared layout, in packed rows long enough for the chunked attention.

Here: the end-to-end tests (marked slow, or over ~5 s on CPU); the quick ones are in
tests/unit/test_shared_prompt.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import scoring
from rlhf_jax.algorithms.dpo import make_dpo_loss_fn
from rlhf_jax.configs.base import base_config
from rlhf_jax.data.preference import (
    comparison_length,
    logit_budget_for,
    pack_comparisons,
    tokenize_comparisons,
)
from rlhf_jax.models import ModelConfig, create_model, split_model
from tests.helpers.preference import TINY, pair_records, ranking_records

MODEL = {**TINY, "max_seq_len": 256}


def both_layouts(comparisons, k, seq_len=256, rows=4, per_row=4, listed=False):
  """(plain rows, shared-prompt rows, comparisons both hold); `listed`: with logit lists."""
  budget = lambda share: logit_budget_for(comparisons, seq_len, share) if listed else None
  plain, n_plain = pack_comparisons(
      comparisons, seq_len, rows, per_row, k, logit_budget=budget(False)
  )
  shared, n_shared = pack_comparisons(
      comparisons, seq_len, rows, per_row, k, share_prompt=True, logit_budget=budget(True)
  )
  return plain, shared, min(n_plain, n_shared)


def by_comparison(batch, values, count):
  """values [R, P, K] -> {comparison index: values of its valid slots}."""
  out = {}
  for r, p in zip(*np.nonzero(batch["comparison"] >= 0)):
    if batch["comparison"][r, p] < count:
      out[int(batch["comparison"][r, p])] = np.asarray(values)[r, p][batch["valid"][r, p]]
  return out


@pytest.mark.parametrize("kind", ["pairwise", "ranking"])
@pytest.mark.slow
def test_shared_prompt_rows_score_every_response_as_the_unshared_layout(words_tokenizer, kind):
  records = pair_records(14) if kind == "pairwise" else ranking_records(10)
  k = 2 if kind == "pairwise" else 4
  comparisons, _ = tokenize_comparisons(records, kind, words_tokenizer, max_len=64)
  plain, shared, count = both_layouts(comparisons, k)
  assert count >= 6
  # The prompt is held once: (K - 1) x prompt_len fewer tokens per comparison.
  saved = sum((len(c.sequences) - 1) * c.prompt_len for c in comparisons[:count])
  assert saved > 0
  shorter = [comparison_length(c) - comparison_length(c, True) for c in comparisons[:count]]
  assert sum(shorter) == saved
  lm = split_model(create_model(ModelConfig(**MODEL), 0))
  logps = jax.jit(scoring.comparison_logps, static_argnums=0)
  for batch in (plain, shared):  # only the comparisons both layouts hold
    held = (batch["comparison"] < count) & (batch["comparison"] >= 0)
    batch["valid"] &= held[..., None]
  (sums_p, len_p), (sums_s, len_s) = logps(*lm, plain), logps(*lm, shared)
  got, want_logps = by_comparison(shared, sums_s, count), by_comparison(plain, sums_p, count)
  assert sorted(got) == sorted(want_logps) == list(range(count))
  for i in range(count):
    np.testing.assert_allclose(got[i], want_logps[i], atol=2e-4, rtol=1e-5)
  assert by_comparison(shared, len_s, count).keys() == by_comparison(plain, len_p, count).keys()
  for i, lengths in by_comparison(shared, len_s, count).items():
    np.testing.assert_array_equal(lengths, by_comparison(plain, len_p, count)[i])
  # A scalar-head reward model reads each response's last token: the same scores.
  rm = split_model(create_model(ModelConfig(**MODEL, head="scalar", scalar_head_init_std=1.0), 0))
  scores = jax.jit(scoring.comparison_scores, static_argnums=0)
  got = by_comparison(shared, scores(*rm, shared), count)
  want = by_comparison(plain, scores(*rm, plain), count)
  for i in range(count):
    np.testing.assert_allclose(got[i], want[i], atol=1e-4, rtol=1e-5)
  # Scores of the unused slots are masked to 0, as in the unshared layout.
  assert np.all(np.asarray(sums_s)[~shared["valid"]] == 0)
  # With logit lists (the LM head on the response tokens only), either layout: the same sums.
  plain_l, shared_l, count_l = both_layouts(comparisons, k, listed=True)
  assert count_l == count and plain_l["logit_index"].shape[1] < 256
  for batch, ref in ((plain_l, plain), (shared_l, shared)):
    batch["valid"] = ref["valid"]
    sums, lengths = logps(*lm, batch)
    np.testing.assert_array_equal(lengths, len_p if batch is plain_l else len_s)
    got = by_comparison(batch, sums, count)
    assert sorted(got) == list(range(count))
    for i, v in got.items():
      np.testing.assert_allclose(v, want_logps[i], atol=2e-4, rtol=1e-5)
    assert np.all(np.asarray(sums)[~batch["valid"]] == 0)


@pytest.mark.slow
def test_dpo_loss_and_gradients_equal_with_shared_prompts(words_tokenizer):
  comparisons, _ = tokenize_comparisons(pair_records(12), "pairwise", words_tokenizer, max_len=64)
  rs = np.random.RandomState(0)
  comparisons = [c._replace(ref_logps=rs.normal(-20, 3, 2).astype(np.float32)) for c in comparisons]
  plain, shared, count = both_layouts(comparisons[:8], 2)
  assert count == 8
  graphdef, params = split_model(create_model(ModelConfig(**MODEL), 1))
  loss_fn = make_dpo_loss_fn(graphdef, base_config().dpo)
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))
  loss_p, grads_p = grad(params, plain)
  assert float(jnp.max(jnp.abs(grads_p["embed"]))) > 0
  # Shared prompts, logit lists (LM head on the response tokens only), and both.
  plain_l, shared_l, _ = both_layouts(comparisons[:8], 2, listed=True)
  for batch in (shared, plain_l, shared_l):
    loss, grads = grad(params, batch)
    np.testing.assert_allclose(loss, loss_p, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3), grads, grads_p
    )


@pytest.mark.slow
def test_dpo_driver_with_shared_prompts_trains_the_same_policy(
    tmp_path, words_tokenizer_dir, monkeypatch
):
  """One pair per row (packing off), so both layouts see the same pairs in the same batches: the
  precomputed reference, the steps and the export agree; with packing on, the shared rows hold
  more pairs."""
  from rlhf_jax.algorithms import dpo
  from rlhf_jax.train import checkpoint
  from tests.helpers.preference import dpo_config, export_lm, learnable_pairs, write_jsonl

  export_lm(tmp_path / "lm", words_tokenizer_dir)
  source = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(32))
  from rlhf_jax.data import preference

  placed = {False: 0, True: 0}
  place = preference._place

  def counting_place(*args, share_prompt=False):
    placed[share_prompt] += 1
    return place(*args, share_prompt=share_prompt)

  monkeypatch.setattr(preference, "_place", counting_place)
  listed = []  # the trainer's batches list their response tokens (the LM head runs on those)
  logps = scoring.comparison_logps

  def recording_logps(graphdef, params, batch):
    listed.append("logit_index" in batch)
    return logps(graphdef, params, batch)

  monkeypatch.setattr(scoring, "comparison_logps", recording_logps)
  params, results = {}, {}
  for share in (False, True):
    config = dpo_config(tmp_path, words_tokenizer_dir, source, steps=6)
    config.data.packing = False
    config.reward.share_prompt = share
    before = dict(placed)
    results[share] = dpo.train(config, str(tmp_path / f"share{share}"))
    assert placed[share] > before[share] and placed[not share] == before[not share]
    params[share], _ = checkpoint.load_params(tmp_path / f"share{share}" / "export")
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=0), params[True], params[False]
  )
  np.testing.assert_allclose(results[True]["eval/loss"], results[False]["eval/loss"], rtol=1e-3)
  assert listed and all(listed)


# ---------------------------------------------------------------- a prompt's samples (PPO, GRPO)


def grouped_rollout(seed=0, prompts=3, k=4, prompt_len=8, new_tokens=8):
  """A rollout as `ppo.make_iteration` builds it: each left-padded prompt repeated K times, each
  copy with its own right-padded response."""
  from rlhf_jax import generate

  rs = np.random.RandomState(seed)
  prompt_lens = np.repeat(rs.randint(1, prompt_len + 1, prompts), k)
  prompt_mask = np.arange(prompt_len)[None] >= (prompt_len - prompt_lens)[:, None]
  prompt_tokens = np.where(
      prompt_mask, np.repeat(rs.randint(3, 384, (prompts, prompt_len)), k, 0), 0
  ).astype(np.int32)
  lengths = rs.randint(1, new_tokens + 1, prompts * k)
  lengths[0], lengths[1] = 1, new_tokens
  mask = np.arange(new_tokens)[None] < lengths[:, None]
  tokens = np.where(mask, rs.randint(3, 384, (prompts * k, new_tokens)), 0).astype(np.int32)
  out = generate.GenerateOutput(
      tokens=jnp.asarray(tokens),
      logprobs=jnp.zeros(tokens.shape),
      mask=jnp.asarray(mask),
      lengths=jnp.asarray(lengths, jnp.int32),
  )
  tokens, segment_ids, positions, response_mask = generate.full_sequence(
      prompt_tokens, prompt_mask, out
  )
  return {
      "tokens": tokens,
      "segment_ids": segment_ids,
      "positions": positions,
      "response_mask": response_mask,
  }


@pytest.mark.slow
def test_a_prompts_samples_score_and_train_the_same_with_the_prompt_run_once():
  """Policy, value-model, value-head, reference and reward-model outputs, the PPO loss and its
  gradients: equal with `share=(K, N)` to the plain rows, on response tokens; and with the LM head
  on the last N columns only (`response_len=N`), shared or not."""
  from rlhf_jax.algorithms import ppo, ppo_rollout
  from tests.helpers.ppo import POLICY_CFG, VALUE_CFG, ppo_cfg

  policy_gd, policy = split_model(create_model(POLICY_CFG, 0))
  value_gd, value = split_model(create_model(VALUE_CFG, 1))
  reference = jax.tree.map(lambda x: x * 1.01, policy)
  batch = grouped_rollout()
  mask = np.asarray(batch["response_mask"])
  share = (4, 8)
  variants = [(None, None), (share, None), (None, 8), (share, 8)]  # (share, response_len)
  outputs = {}
  for s, n in variants:
    score = jax.jit(
        ppo_rollout.make_score_fn(
            policy_gd, value_gd, {"helpful": value_gd}, temperature=0.9, share=s, response_len=n
        )
    )
    outputs[s, n] = score(policy, reference, value, {"helpful": value}, batch)
  old, ref, values, scores = outputs[None, None]
  for a in (old, ref, values):
    assert np.abs(np.asarray(a)[mask]).max() > 1e-2
  for variant in variants[1:]:
    old_s, ref_s, values_s, scores_s = outputs[variant]
    for a, b in ((old, old_s), (ref, ref_s), (values, values_s)):
      np.testing.assert_allclose(np.where(mask, b, 0), np.where(mask, a, 0), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(scores_s["helpful"], scores["helpful"], atol=1e-4, rtol=1e-5)
  # The PPO loss with a value head on the policy's trunk, and its gradients.
  rs = np.random.RandomState(0)
  rollout = {
      **batch,
      "old_logp": old,
      "old_values": values,
      "advantages": np.where(mask, rs.normal(size=mask.shape), 0).astype(np.float32),
      "returns": np.where(mask, rs.normal(size=mask.shape), 0).astype(np.float32),
  }
  params = {"policy": policy, "value": {"score": jnp.asarray(rs.normal(size=64), jnp.float32)}}
  cfg = ppo_cfg(samples_per_prompt=4, temperature=0.9, entropy_coef=0.1)
  grads = {}
  for s, n in variants:
    loss_fn = ppo.make_ppo_loss_fn(policy_gd, None, cfg, share=s, response_len=n)
    grads[s, n] = jax.jit(jax.value_and_grad(lambda p, b, f=loss_fn: f(p, b, None)[0]))(
        params, rollout
    )
  for variant in variants[1:]:
    np.testing.assert_allclose(grads[variant][0], grads[None, None][0], rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3),
        grads[variant][1],
        grads[None, None][1],
    )
  with pytest.raises(ValueError, match="do not split into groups of 5"):
    ppo_rollout.token_values(
        value_gd,
        value,
        batch["tokens"],
        batch["segment_ids"],
        batch["positions"],
        batch["response_mask"],
        share=(5, 8),
    )


@pytest.mark.slow  # compiles the sampler and four updates
def test_grpo_iteration_with_shared_prompts_updates_as_without():
  """`make_iteration` with config.ppo.share_prompt: the same sampled rollout (same key) gives the
  same single update as without. With 2 epochs x 3 mini-batches, shuffled by whole groups in both
  (`make_ppo_update(group=K)`), the shared loss trains the same params: every mini-batch holds
  whole groups."""
  import optax

  from rlhf_jax.algorithms import ppo, ppo_rollout
  from tests.helpers.ppo import POLICY_CFG, critic_free_loop, ppo_cfg

  policy_gd, policy = split_model(create_model(POLICY_CFG, 0))
  models = (policy_gd, None, {"policy": policy})
  reference = jax.tree.map(lambda x: x * 1.01, policy)
  prompts = np.random.RandomState(0).randint(3, 40, (4, 5)).astype(np.int32)
  mask, unsafe = np.ones_like(prompts, bool), np.zeros(4, bool)
  reward = lambda out: np.asarray(np.asarray(out.tokens).mean(axis=1), np.float32)
  states = {}
  for share in (False, True):
    cfg = ppo_cfg(
        prompts_per_iteration=4,
        samples_per_prompt=3,
        max_new_tokens=6,
        epochs=1,
        minibatches=1,
        share_prompt=share,
    )
    cfg.kl.beta = 0.1
    iterate, fresh, shardings, mesh = critic_free_loop(models, cfg, optax.sgd(1.0), "grpo")
    states[share], info = iterate(
        fresh(), reference, {}, prompts, mask, unsafe, jax.random.key(3), 0.1, text_reward=reward
    )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
      states[True].params,
      states[False].params,
  )
  moved = jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
      states[True].params["policy"],
      policy,
  )
  assert max(jax.tree.leaves(moved)) > 1e-3

  batch = grouped_rollout(prompts=3, k=4, new_tokens=8)
  old, ref, _, _ = jax.jit(ppo_rollout.make_score_fn(policy_gd, None, {}, temperature=1.0))(
      policy, reference, None, {}, batch
  )
  m = np.asarray(batch["response_mask"])
  adv = np.where(m, np.random.RandomState(1).normal(size=m.shape), 0).astype(np.float32)
  rollout = {**batch, "old_logp": old, "ref_logp": ref, "advantages": adv}
  cfg = ppo_cfg(samples_per_prompt=4, max_new_tokens=8, epochs=2, minibatches=3)
  cfg.kl.beta = 0.1
  trained = {}
  for share in (None, (4, 8)):
    update = ppo.make_ppo_update(
        ppo.make_ppo_loss_fn(policy_gd, None, cfg, estimator="grpo", share=share),
        optax.sgd(1.0),
        mesh=mesh,
        shardings=shardings,
        cfg=cfg,
        group=4,
    )
    trained[share], _ = update(fresh(), rollout)
  # Six SGD steps at lr 1.0 on differently laid-out rows: float rounding grows to ~2e-6 (params
  # move by >1e-3; a response that sees a sibling (a mask mutation) moves them by 2e-4).
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
      trained[(4, 8)].params,
      trained[None].params,
  )


def test_shared_prompt_scoring_sharded_over_8_devices_equals_the_plain_rows():
  """Two prompts x 4 samples on a (2, 2, 2) mesh: the grouped rows (2) are fewer than the data
  axes' devices (4); XLA reshards them, and every output equals the plain rows'."""
  from rlhf_jax import sharding
  from rlhf_jax.algorithms import ppo_rollout
  from tests.helpers.ppo import POLICY_CFG, VALUE_CFG

  policy_gd, policy = split_model(create_model(POLICY_CFG, 0))
  value_gd, value = split_model(create_model(VALUE_CFG, 1))
  batch = grouped_rollout(prompts=2, k=4)
  mesh = sharding.make_mesh((2, 2, 2))
  placed = sharding.put_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
  outs = {}
  for share in (None, (4, 8)):
    score = ppo_rollout.make_score_fn(
        policy_gd, value_gd, {"helpful": value_gd}, temperature=1.0, share=share
    )

    def run(*args, score=score):
      with sharding.activation_sharding(mesh):
        return score(*args)

    outs[share] = jax.jit(run)(policy, policy, value, {"helpful": value}, placed)
  mask = np.asarray(batch["response_mask"])
  for a, b in zip(outs[None][:3], outs[(4, 8)][:3]):
    np.testing.assert_allclose(np.where(mask, b, 0), np.where(mask, a, 0), atol=1e-4)
  np.testing.assert_allclose(outs[(4, 8)][3]["helpful"], outs[None][3]["helpful"], atol=1e-4)
