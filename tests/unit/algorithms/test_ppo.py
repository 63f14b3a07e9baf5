"""PPO: values and rewards line up with the models, the update sees exactly the rollout's numerics
(ratio 1 at the rollout params), one PPO phase is the plain train step when it has one mini-batch
and is the same on every mesh, prompt files are validated, and the driver runs, logs, exports and
resumes to the same params as an uninterrupted run.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_ppo.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import generate
from rlhf_jax.algorithms import ppo, ppo_rollout, rejection_sampling
from rlhf_jax.data import RecordError, encode_prompt
from tests.helpers.ppo import MAX_PROMPT_LEN, TINY, rejection_sampling_config, write_jsonl

# ---------------------------------------------------------------- reward combination


STATS = {
    "helpful": {"mean": 0.5, "std": 2.0, "n": 10},
    "safety": {"mean": -1.0, "std": 0.5, "n": 10},
}


def test_single_reward_model_is_whitened_by_its_own_stats():
  scores = {"helpful": jnp.asarray([-1.0, 0.0, 0.5, 3.0])}
  unsafe = jnp.asarray([False, True, False, True])
  spec = ppo_rollout.RewardSpec(names=("helpful",), stats={"helpful": STATS["helpful"]})
  np.testing.assert_allclose(
      spec(scores, unsafe), (np.array([-1.0, 0.0, 0.5, 3.0]) - 0.5) / 2.0, rtol=1e-6
  )
  raw = ppo_rollout.RewardSpec(
      names=("helpful",), stats={"helpful": STATS["helpful"]}, whiten=False
  )
  np.testing.assert_allclose(raw(scores, unsafe), [-1.0, 0.0, 0.5, 3.0])


def test_llama2_reward_picks_safety_where_unsafe_or_unlikely_safe_each_whitened_by_its_stats():
  helpful = np.array([1.0, 2.0, -0.5, 0.3, 4.0, -2.0], np.float32)
  safety = np.array(
      [3.0, -3.0, 0.0, -1.7, -1.8, 2.0], np.float32
  )  # sigmoid: .95 .05 .5 .154 .142 .88
  unsafe = np.array([False, False, True, False, False, True])
  spec = ppo_rollout.RewardSpec(
      names=("helpful", "safety"), stats=STATS, combine="llama2", safety_threshold=0.15
  )
  got = np.asarray(jax.jit(spec.__call__)({"helpful": helpful, "safety": safety}, unsafe))
  use_safety = unsafe | (1 / (1 + np.exp(-safety.astype(np.float64))) < 0.15)
  assert use_safety.tolist() == [False, True, True, False, True, True]
  expected = np.where(use_safety, (safety - -1.0) / 0.5, (helpful - 0.5) / 2.0)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_linear_reward_is_the_weighted_sum_of_whitened_scores():
  helpful = np.array([1.0, 2.0, -0.5], np.float32)
  safety = np.array([3.0, -3.0, 0.0], np.float32)
  spec = ppo_rollout.RewardSpec(
      names=("helpful", "safety"),
      stats=STATS,
      combine="linear",
      helpful_weight=0.7,
      safety_weight=0.3,
  )
  got = spec({"helpful": helpful, "safety": safety}, np.array([True, False, False]))
  np.testing.assert_allclose(
      got, 0.7 * (helpful - 0.5) / 2.0 + 0.3 * (safety + 1.0) / 0.5, rtol=1e-6, atol=1e-6
  )


def test_load_prompts_reads_prompts_and_unsafe_flags(tmp_path):
  messages = [{"role": "user", "content": "Hi there"}]
  source = write_jsonl(
      tmp_path / "p.jsonl",
      [
          {"prompt": "Name a colour.", "id": 7},
          {"prompt": "Do harm.", "unsafe": True},
          {"prompt": messages, "unsafe": False},
      ],
  )
  records = ppo.load_prompts(source)
  assert [r["prompt"] for r in records[:2]] == ["Name a colour.", "Do harm."]
  assert records[0]["id"] == 7 and "unsafe" not in records[0]
  assert records[1]["unsafe"] is True and records[2]["unsafe"] is False
  assert isinstance(records[2]["prompt"], list)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"text": "no prompt"}, "prompt"),
        ({"prompt": "Hi", "unsafe": "yes"}, "unsafe"),
        ({"prompt": "Hi", "unsafe": 1}, "unsafe"),
    ],
)
def test_load_prompts_names_file_line_and_field(tmp_path, bad, field):
  source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Fine."}, bad])
  with pytest.raises(RecordError) as info:
    ppo.load_prompts(source)
  assert (info.value.source, info.value.line, info.value.field) == (source, 2, field)
  assert str(info.value).startswith(f"{source}:2: field '{field}'")


@pytest.mark.parametrize("line", ['"Name a colour."', '[{"role": "user", "content": "Hi"}]'])
def test_load_prompts_rejects_a_row_that_is_not_an_object(tmp_path, line):
  (tmp_path / "p.jsonl").write_text('{"prompt": "Fine."}\n' + line + "\n")
  source = str(tmp_path / "p.jsonl")
  with pytest.raises(RecordError) as info:
    ppo.load_prompts(source)
  assert (info.value.source, info.value.line) == (source, 2)


def test_load_prompts_rejects_an_empty_file(tmp_path):
  (tmp_path / "p.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no prompts"):
    ppo.load_prompts(str(tmp_path / "p.jsonl"))


def test_toy_prompts_fit_the_driver_config(tokenizer, tasks):
  assert max(len(encode_prompt(tokenizer, t["prompt"])) for t in tasks) <= MAX_PROMPT_LEN
  assert MAX_PROMPT_LEN + 8 <= TINY["max_seq_len"]


def test_baselined_reward_subtracts_the_mean_of_the_prompts_other_samples():
  reward = np.random.RandomState(0).randn(12).astype(np.float32)  # 3 prompts x 4 samples
  got = np.asarray(jax.jit(ppo_rollout.baselined_reward, static_argnums=(1, 2))(reward, 4, "rloo"))
  expected = [
      reward[i] - np.mean([reward[j] for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i])
      for i in range(12)
  ]
  np.testing.assert_allclose(got, expected, atol=1e-6)
  np.testing.assert_allclose(got.reshape(3, 4).sum(axis=1), 0.0, atol=1e-5)  # per prompt
  assert ppo_rollout.baselined_reward(reward, 4, "none") is reward
  with pytest.raises(ValueError, match="reward_baseline='mean'"):
    ppo_rollout.baselined_reward(reward, 4, "mean")


def test_best_of_k_reports_each_samples_mean_logprob(tokenizer, tasks):
  """best_of_k's `mean_logprob` is the sampler's per-token log-probs averaged over each sample's
  real tokens (the best-of-n "reward" that needs no reward model)."""
  logprobs = jnp.array([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])
  lengths = jnp.array([3, 2, 1])

  def sampler(params, tokens, mask, rng, *, max_new_tokens, temperature, eos_id, pad_id, samples):
    del params, mask, rng, max_new_tokens, temperature, pad_id
    assert samples == 3  # each prompt once, sampled K times
    rows = tokens.shape[0] * samples
    valid = jnp.arange(4)[None] < jnp.tile(lengths, rows // 3)[:, None]
    return generate.GenerateOutput(
        jnp.where(valid, eos_id, 0).astype(jnp.int32),
        jnp.tile(logprobs, (rows // 3, 1)),
        valid,
        jnp.tile(lengths, rows // 3),
    )

  out = rejection_sampling.best_of_k(
      None,
      sampler,
      {},
      None,
      tokenizer,
      tasks[:2],
      k=3,
      temperature=1.0,
      max_new_tokens=4,
      max_prompt_len=MAX_PROMPT_LEN,
      batch_prompts=2,
      rng=jax.random.key(0),
  )
  for prompt in out:
    np.testing.assert_allclose(prompt["mean_logprob"], [-2.0, -0.5, -4.0])


def test_rejection_sampling_fresh_prompts_must_fit_the_prompt_set(tmp_path, exports, tokenizer_dir):
  config = rejection_sampling_config(exports, tokenizer_dir)
  n = len(ppo.load_prompts(exports["prompts"]))
  config.rejection_sampling.update(fresh_prompts=True, prompts_per_round=n)
  with pytest.raises(ValueError, match=f"need {2 * n} prompts"):
    rejection_sampling.train(config, str(tmp_path / "rs"))


def test_rejection_sampling_prompt_offset_skips_the_first_prompts():
  """A later stage of an iterated schedule samples prompts no earlier stage saw; too few left is a
  ConfigError naming the offset."""
  prompts = [{"prompt": str(i)} for i in range(10)]
  step = functools.partial(
      rejection_sampling.step_prompts, key="config.rejection_sampling", source="p.jsonl"
  )
  assert step(prompts, steps=2, per_step=3, fresh=True, offset=4) == [prompts[4:7], prompts[7:10]]
  assert step(prompts, steps=2, per_step=3, fresh=False, offset=4) == [prompts[4:7]] * 2
  with pytest.raises(ValueError, match=r"6 skipped \(prompt_offset\) \+ 2 step\(s\) x 3 prompts"):
    step(prompts, steps=2, per_step=3, fresh=True, offset=6)
  with pytest.raises(ValueError, match=r"config.rejection_sampling.prompt_offset: 9 skipped"):
    step(prompts, steps=2, per_step=3, fresh=False, offset=9)
  with pytest.raises(ValueError, match="prompt_offset must be >= 0"):
    step(prompts, steps=1, per_step=3, fresh=False, offset=-1)
