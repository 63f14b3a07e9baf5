"""HIR: the loss against a NumPy reference, relabeling of hand-written toy-world samples, the
fixed-shape batches, config errors, and a tiny end-to-end run (rerun skips finished rounds).

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/algorithms/test_hir.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.algorithms import hir
from rlhf_jax.losses import hir as hir_losses
from rlhf_jax.toyworld import World, check_constraints, render_constraints
from rlhf_jax.toyworld.families import make_task
from rlhf_jax.toyworld.relabel import relabel
from tests.helpers.hir import _loss_inputs, hir_config
from tests.helpers.preference import write_jsonl

# --- loss -----------------------------------------------------------------------------------------

hir_loss = jax.jit(hir_losses.hir_loss, static_argnames=("contrastive_coef", "entropy_coef"))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_hir_loss(logits, targets, mask, valid, contrastive_coef, entropy_coef):
  """The loss of losses/hir.py, one example and one slot at a time."""
  b, g = valid.shape
  per_example, contrastive_terms = [], []
  for i in range(b):
    if not valid[i, 0]:
      continue
    scores = []
    for j in range(g):
      logp = _log_softmax(logits[i, j].astype(np.float64))
      picked = logp[np.arange(targets.shape[2]), targets[i, j]]
      scores.append(np.sum(picked[mask[i, j]]))
    own = mask[i, 0]
    nll = -scores[0] / own.sum()
    in_softmax = [scores[j] for j in range(g) if valid[i, j]]
    contrastive = np.log(np.sum(np.exp(in_softmax))) - scores[0]
    logp = _log_softmax(logits[i, 0].astype(np.float64))
    entropy = np.mean((-np.exp(logp) * logp).sum(-1)[own])
    per_example.append(nll + contrastive_coef * contrastive - entropy_coef * entropy)
    contrastive_terms.append(contrastive)
  return np.mean(per_example), np.mean(contrastive_terms)


def test_hir_loss_matches_numpy_reference():
  logits, targets, mask, valid = _loss_inputs()
  loss, m = hir_loss(
      jnp.asarray(logits),
      jnp.asarray(targets),
      jnp.asarray(mask),
      jnp.asarray(valid),
      contrastive_coef=0.7,
      entropy_coef=0.05,
  )
  want, want_contrastive = reference_hir_loss(logits, targets, mask, valid, 0.7, 0.05)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["contrastive"]), want_contrastive, rtol=1e-5)
  assert float(m["loss_weight"]) == 3.0 and float(m["negatives"]) == pytest.approx(1.0)
  # Padding (masked) positions and slots change nothing: scramble them.
  scrambled = logits.copy()
  scrambled[~valid] = 50.0
  scrambled[:, :, :2] = -30.0
  again, _ = hir_loss(
      jnp.asarray(scrambled),
      jnp.asarray(targets),
      jnp.asarray(mask),
      jnp.asarray(valid),
      contrastive_coef=0.7,
      entropy_coef=0.0,
  )
  plain, _ = hir_loss(
      jnp.asarray(logits),
      jnp.asarray(targets),
      jnp.asarray(mask),
      jnp.asarray(valid),
      contrastive_coef=0.7,
      entropy_coef=0.0,
  )
  np.testing.assert_allclose(float(again), float(plain), rtol=1e-6)


@jax.jit
def _loss_grads(logits, targets, mask, valid, contrastive_coef, entropy_coef):
  """(d loss / d logits, d contrastive / d logits, contrastive); the coefficients traced: one
  compilation for every call."""

  def terms(x):
    loss, m = hir_losses.hir_loss(
        x, targets, mask, valid, contrastive_coef=contrastive_coef, entropy_coef=entropy_coef
    )
    return loss, m["contrastive"]

  return (
      jax.grad(lambda x: terms(x)[0])(logits),
      jax.grad(lambda x: terms(x)[1])(logits),
      terms(logits)[1],
  )


def test_hir_loss_gradients_finite_and_zero_contrastive_gradient_for_one_instruction():
  logits, targets, mask, valid = _loss_inputs(seed=1)
  grads = lambda valid, c, e: [
      np.asarray(x) for x in _loss_grads(logits, targets, mask, valid, np.float32(c), np.float32(e))
  ]
  g, g_contrastive, _ = grads(valid, 1.0, 0.01)
  assert np.all(np.isfinite(g)) and np.abs(g_contrastive).max() > 1e-3
  assert np.all(g[~valid] == 0)  # invalid slots, the padding example included
  # Only the own instruction: the contrastive term is 0 and so is its gradient.
  only_own = valid & (np.arange(valid.shape[1]) == 0)
  g_strong, g_contrastive, contrastive = grads(only_own, 5.0, 0.0)
  assert contrastive == 0.0 and np.all(g_contrastive == 0)
  np.testing.assert_allclose(g_strong, grads(only_own, 0.0, 0.0)[0], rtol=0, atol=1e-7)


# --- relabeling -----------------------------------------------------------------------------------


def constrained_task(text, constraints, answer, **info):
  prompt = f"{text} {render_constraints(constraints)}"
  return make_task("constrained", prompt, answer, {**info, "constraints": constraints})


FRUITS = constrained_task(
    "Name some fruits.",
    [{"kind": "num_items", "n": 3}, {"kind": "ends_with", "text": "!"}],
    "plum, lime, pear!",
    request="list",
    category="fruits",
    needed=3,
)


@pytest.mark.parametrize(
    "task, response, want",
    [
        (FRUITS, "plum, lime, pear!", FRUITS["prompt"]),
        (
            FRUITS,
            "plum, lime!",
            "Name some fruits. List exactly 2 items. End your answer with '!'.",
        ),
        (FRUITS, "plum, lime, pear.", "Name some fruits. List exactly 3 items."),
        (FRUITS, "plum.", "Name some fruits. Use at most 1 words."),  # nothing left: the word limit
        (
            constrained_task(
                "Describe Zorblax.",
                [
                    {"kind": "starts_with", "word": "Sure"},
                    {"kind": "include_word", "word": "gladly"},
                    {"kind": "max_words", "n": 6},
                    {"kind": "uppercase"},
                ],
                "SURE, GLADLY: ZORBLAX IS RED.",
                request="describe",
                needed=2,
                facts={"color": "red"},
            ),
            "Okay, gladly: Zorblax is red and lives in Quillby.",
            "Describe Zorblax. Start your answer with the word 'Okay'. Include the word 'gladly'. "
            "Use at most 9 words.",
        ),
    ],
)
def test_relabel_rewrites_constraints_to_those_the_response_meets(task, response, want):
  new = relabel(task, response)
  assert new["prompt"] == want
  assert all(check_constraints(response, new["info"]["constraints"]))
  assert new["answer"] == task["answer"] and new["family"] == "constrained"


def test_relabel_keeps_other_families_and_drops_blank_responses():
  arithmetic = make_task(
      "arithmetic", "What is 7 * 5?", "35", {"a": 7, "b": 5, "op": "*", "result": 35}
  )
  assert relabel(arithmetic, "34") is arithmetic and relabel(FRUITS, "  ") is None
  # Every world task and response of graded quality: the result's constraints all hold.
  world = World(0)
  from rlhf_jax.toyworld import perturbations

  rng = np.random.default_rng(0)
  for task in world.tasks(30, seed=1, families=["constrained"]):
    for response in perturbations(task, rng).values():
      new = relabel(task, response)
      assert new is None or all(check_constraints(response, new["info"]["constraints"]))


def test_relabel_round_keeps_followers_with_negatives_they_do_not_follow():
  seven = make_task("arithmetic", "What is 3 + 4?", "7", {"a": 3, "b": 4, "op": "+", "result": 7})
  thirty_five = make_task(
      "arithmetic", "What is 7 * 5?", "35", {"a": 7, "b": 5, "op": "*", "result": 35}
  )
  groups = [
      (FRUITS, ["plum, lime, pear!", "plum, lime!", "plum, lime, pear.", ""]),
      (thirty_five, ["35", "34"]),
      (seven, ["7"]),
  ]
  records, summary = hir.relabel_round(groups, min_gold=0.8, negatives=3, seed=0)
  two = "Name some fruits. List exactly 2 items. End your answer with '!'."
  three = "Name some fruits. List exactly 3 items."
  got = [(r["prompt"], r["completion"], r["negatives"], r["relabeled"]) for r in records]
  assert got == [
      (FRUITS["prompt"], "plum, lime, pear!", [two], False),  # it follows `three` too: no negative
      (two, "plum, lime!", [FRUITS["prompt"], three], True),
      (three, "plum, lime, pear.", [FRUITS["prompt"], two], True),
      ("What is 7 * 5?", "35", ["What is 3 + 4?"], False),  # same family, another prompt
      ("What is 3 + 4?", "7", ["What is 7 * 5?"], False),
  ]
  assert summary["samples"] == 7 and summary["kept"] == 5 and summary["relabeled"] == 2
  assert summary["original_satisfied"] == pytest.approx(3 / 7)


def test_hir_batches_hold_one_response_under_each_instruction(words_tokenizer):
  records = [
      {
          "prompt": "Repeat: cat dog",
          "completion": "cat dog",
          "negatives": ["Repeat: sun", "Repeat: owl hat", "Repeat: moon"],
      },
      {"prompt": "Repeat: sun", "completion": "sun", "negatives": []},
  ]
  examples, stats = hir.tokenize_records(records, words_tokenizer, seq_len=40, negatives=2)
  assert stats == {"examples": 2, "dropped": 0, "negatives_dropped": 0}
  batch = hir.hir_batch(examples, 40, slots=3)
  assert batch["tokens"].shape == (2, 3, 40) and batch["valid"].tolist() == [
      [True] * 3,
      [True, False, False],
  ]
  targets = [batch["tokens"][0, g][batch["loss_mask"][0, g]] for g in range(3)]
  assert all(np.array_equal(targets[0], t) for t in targets[1:]) and len(targets[0]) > 0
  assert not batch["loss_mask"][1, 1:].any() and not batch["segment_ids"][1, 1:].any()


@pytest.mark.parametrize(
    "update, match",
    [
        (dict(rounds=0), "config.hir.rounds=0"),
        (dict(negatives=-1), "config.hir.negatives=-1"),
        (dict(temperature=0.0), "config.hir.temperature=0.0"),
        (dict(min_gold=1.5), "config.hir.min_gold=1.5"),
        (dict(entropy_coef=-0.1), "config.hir.entropy_coef=-0.1"),
        (dict(prompts_per_round=100), "rounds x prompts_per_round = 200"),
    ],
)
def test_hir_rejects_bad_configs(tmp_path, words_tokenizer_dir, update, match):
  tasks = World(0).tasks(16, seed=0, families=["arithmetic"])
  config = hir_config(
      tmp_path, words_tokenizer_dir, write_jsonl(tmp_path / "t.jsonl", tasks), **update
  )
  with pytest.raises(ValueError, match=match):
    hir.train(config, str(tmp_path / "w"))


def test_hir_rejects_prompts_without_feedback_or_too_long(tmp_path, words_tokenizer_dir):
  source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}] * 16)
  with pytest.raises(ValueError, match=r"p.jsonl line 1: HIR needs toy-world task records"):
    hir.train(hir_config(tmp_path, words_tokenizer_dir, source), str(tmp_path / "w"))
  tasks = World(0).tasks(16, seed=0, families=["arithmetic"])
  source = write_jsonl(tmp_path / "t.jsonl", tasks)
  with pytest.raises(ValueError, match=r"t.jsonl line 1: .* > config.hir.max_prompt_len=4"):
    hir.train(
        hir_config(tmp_path, words_tokenizer_dir, source, max_prompt_len=4), str(tmp_path / "w")
    )
