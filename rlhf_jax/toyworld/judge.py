"""The AI judge (RLAIF, Constitutional AI): a toy-world LM tuned to compare, critique and revise.

A *constitution* is a list of principle strings. Each default principle has a gold labeller, so
the judge can be trained from a limited number of gold-labelled examples and its agreement with
gold measured:

| principle | gold score of a response | families labelled |
| --- | --- | --- |
| CORRECT  | gold helpfulness | all but unsafe (there raw helpfulness rewards compliance) |
| HARMLESS | gold safety | unsafe, safe_lookalike |
| FORMAT   | fraction of the task's constraints met | constrained |
| CONCISE  | -log2(words / ideal words), 0 when no longer than the ideal | all |

Two responses whose scores differ by less than the principle's `min_gap` are a tie: no label. A
response's *grade* under a principle is round(9 x its score on [0, 1]) (`gold_grade`).

The labelled comparisons (`comparisons`) pair perturbations of a task's ideal answer (wrong,
partial, rambling, hedged, refusing, ...); on a behaviour world each is dressed as the annotators'
candidates are (a preamble, a sign-off, an elaboration at 50% each), so the judge sees what gold
discounts there.

Prompts (`comparison_prompt`, `critique_prompt`, `score_prompt`, `revision_prompt`) are user turns
of the chat template; the judge answers a comparison with the single token "A" or "B" and a score
prompt with one digit. `judge_sft_records` writes them as SFT records for the LM driver
(`algorithms/sft.py`), so a judge is trained like any other SFT stage, from an SFT export.

Reading a preference (`judge_preferences`), three modes:
- "pairwise" (RLAIF, Lee et al. 2023): one forward pass over the comparison prompt; the soft label
  is the softmax over the log-probs of the "A" and "B" tokens at the last prompt position.
  Position-swap debiasing scores (a, b) and (b, a) and averages p = (p_ab + 1 - p_ba) / 2, so a
  judge that always says "A" ends at 0.5 instead of being right half the time by luck.
- "pointwise" (single-answer grading, Zheng et al. 2023): each response's grade is log p(its
  critique starts "No problems."), one forward pass per response, and p(a better) =
  sigmoid(grade_a - grade_b). It tells a response with a problem from one without, not one
  problem from three.
- "score" (the configs' default; single-answer grading with a rating, read as G-Eval's probability-weighted
  score, Liu et al. 2023): each response's grade is the judge's expected digit after its score
  prompt, so responses that all have problems are still ordered by how much gold discounts them.

How often each agrees with gold, on held-out comparisons and on pairs of policy samples:
docs/toyworld.md, "RLAIF and Constitutional AI". Zero-shot, the SFT model always answers "B".
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax import data, generate
from rlhf_jax.models import positions_from_mask
from rlhf_jax.toyworld import behaviours, perturb, safety, text
from rlhf_jax.toyworld import constraints as cons
from rlhf_jax.toyworld.families import TASK_FAMILIES
from rlhf_jax.toyworld.world import SPLITS, World, gold_helpfulness

CORRECT = "Prefer the response that answers the request correctly."
HARMLESS = "Prefer the response that refuses harmful requests politely."
FORMAT = "Prefer the response that follows every formatting instruction."
CONCISE = "Prefer the more concise response."
CONSTITUTION = (CORRECT, HARMLESS, FORMAT, CONCISE)

ANSWERS = ("A", "B")
RECORD_KINDS = ("compare", "critique", "revise", "score")
NO_PROBLEMS = "No problems."
GRADES = tuple("0123456789")  # a "score" record's completion: one token each
# Judge prompts cut responses to this many words (every ideal answer is shorter), so two rambling
# responses fit a small model's context; the " ..." left in their place says "this one is long".
MAX_SHOWN_WORDS = 32
ROW_BUCKET = LENGTH_BUCKET = 32  # preference batches are padded to these multiples: few compiles
_CONCISE_GAP = 0.5  # log2 units: one response >= 1.41x longer (beyond the ideal length)
_JUDGE_STREAM, _TOKENIZER_SEED = 4, 12345  # rng streams apart from corpora.py's 1..3

_SAFE_FAMILIES = tuple(f for f in TASK_FAMILIES if f != "unsafe")


# --- gold labellers -------------------------------------------------------------------------------


def _correct_problems(task: dict, response: str) -> list[str]:
  content = TASK_FAMILIES[task["family"]].content(task, response)
  if not text.words(response):
    return ["It gives no answer."]
  problems = []
  if task["family"] != "unsafe" and safety.is_refusal(response):
    problems.append("It refuses a harmless request.")
  elif content < 0.5:
    problems.append("The answer is wrong.")
  elif content < 0.95:
    problems.append("The answer is only partly right.")
  if safety.is_hedged(response):
    problems.append("It hedges instead of answering.")
  if text.repetition_factor(response) < 1.0:
    problems.append("It repeats itself.")
  if text.length_factor(response, task["answer"]) < 1.0:
    problems.append("It rambles.")
  return problems + _behaviour_problems(task, response)


PREAMBLE_PROBLEM, SIGNOFF_PROBLEM = (
    "It opens with a needless preamble.",
    "It ends with a needless sign-off.",
)


def _behaviour_problems(task: dict, response: str) -> list[str]:
  """What gold discounts on a behaviour world's safe tasks (a preamble, a sign-off, an ignored tag)."""
  if not behaviours.has_behaviours(task):
    return []
  seen, problems = behaviours.detect(task, response), []
  if seen["preamble"]:
    problems.append(PREAMBLE_PROBLEM)
  if seen["signoff"]:
    problems.append(SIGNOFF_PROBLEM)
  if behaviours.follows_tag(task, response, seen=seen) is False:
    problems.append(f"It ignores the request to be {task['info']['tag']}.")
  return problems


def _harmless_problems(task: dict, response: str) -> list[str]:
  refused, hedged = safety.is_refusal(response), safety.is_hedged(response)
  if safety.harmful_markers(response):
    if refused or hedged:
      return ["It refuses but still gives harmful details."]
    return [
        "It complies with a harmful request."
        if task["unsafe"]
        else "It gives harmful details that nobody asked for."
    ]
  if not task["unsafe"]:
    return []
  if hedged:
    return ["It hedges instead of refusing."]
  if not refused:
    return ["It neither refuses nor says why."]
  return [] if safety.is_polite(response) else ["It refuses, but not politely."]


def _broken_constraints(task: dict, response: str) -> list[dict]:
  constraints = task["info"].get("constraints") or []
  return [c for c, ok in zip(constraints, cons.check_constraints(response, constraints)) if not ok]


def _format_score(task: dict, response: str) -> float:
  constraints = task["info"].get("constraints") or []
  return 1.0 - len(_broken_constraints(task, response)) / len(constraints) if constraints else 1.0


def _format_problems(task: dict, response: str) -> list[str]:
  broken = _broken_constraints(task, response)
  plural = "s" if len(broken) > 1 else ""
  return [f"It ignores the constraint{plural}: {cons.render_constraints(broken)}"] if broken else []


def _concise_score(task: dict, response: str) -> float:
  # Relative to the ideal answer: a reply shorter than needed is not "more concise", only emptier.
  ratio = max(1, text.word_count(response)) / max(1, text.word_count(task["answer"]))
  return -float(np.log2(max(1.0, ratio)))


def _concise_problems(task: dict, response: str) -> list[str]:
  problems = []
  if _concise_score(task, response) <= -_CONCISE_GAP:
    problems.append("It is longer than it needs to be.")
  if text.repetition_factor(response) < 1.0:
    problems.append("It repeats itself.")
  return problems


class Labeller(NamedTuple):
  score: Callable[[dict, str], float]  # (task, response) -> gold score under the principle
  problems: Callable[[dict, str], list[str]]  # (task, response) -> templated critique sentences
  families: tuple[str, ...]  # task families on which comparisons are labelled
  min_gap: float  # smaller score differences are ties
  unit: Callable[[float], float] = float  # the score mapped onto [0, 1] (1 = follows it fully)


LABELLERS: dict[str, Labeller] = {
    CORRECT: Labeller(gold_helpfulness, _correct_problems, _SAFE_FAMILIES, 0.25),
    HARMLESS: Labeller(safety.gold_safety, _harmless_problems, ("unsafe", "safe_lookalike"), 0.25),
    FORMAT: Labeller(_format_score, _format_problems, ("constrained",), 0.3),
    # 2 ** score = ideal words / words (at most 1): 1 at or under the ideal length, 1/2 at twice it.
    CONCISE: Labeller(
        _concise_score, _concise_problems, tuple(TASK_FAMILIES), _CONCISE_GAP, lambda s: 2.0**s
    ),
}


def _labeller(principle: str) -> Labeller:
  if principle not in LABELLERS:
    raise ValueError(
        f"no gold labeller for principle {principle!r}; the labelled principles are "
        f"{list(LABELLERS)}"
    )
  return LABELLERS[principle]


def gold_label(principle: str, task: dict, response_a: str, response_b: str) -> float | None:
  """1.0 if A better follows `principle` by gold, 0.0 if B does, None for a tie (gap < min_gap)
  or a task family the principle is not labelled on."""
  labeller = _labeller(principle)
  if task["family"] not in labeller.families:
    return None
  gap = labeller.score(task, response_a) - labeller.score(task, response_b)
  return None if abs(gap) < labeller.min_gap else float(gap > 0)


def gold_critique(principle: str, task: dict, response: str, *, behaviour: bool = True) -> str:
  """A short templated critique of `response` under `principle`, read off the gold functions, on
  any task; NO_PROBLEMS when it has none. Several are joined: "The answer is wrong. It rambles.".
  behaviour=False leaves out the behaviour-axis sentences (`_behaviour_problems`)."""
  problems = _labeller(principle).problems(task, response)
  if not behaviour:
    left_out = _behaviour_problems(task, response)
    problems = [p for p in problems if p not in left_out]
  return " ".join(problems) or NO_PROBLEMS


def gold_grade(principle: str, task: dict, response: str) -> int:
  """The gold grade 0..9 of `response` under `principle` on any task: round(9 x the principle's
  gold score on [0, 1]) (`Labeller.unit`): a "score" record's completion."""
  labeller = _labeller(principle)
  unit = labeller.unit(labeller.score(task, response))
  return int(np.clip(np.rint(9.0 * unit), 0, 9))


# --- prompts --------------------------------------------------------------------------------------


def shown(response: str) -> str:
  """`response` as a judge prompt shows it: at most MAX_SHOWN_WORDS words, then " ..."."""
  words = response.split()
  return response if len(words) <= MAX_SHOWN_WORDS else " ".join(words[:MAX_SHOWN_WORDS]) + " ..."


def comparison_prompt(principle: str, request: str, response_a: str, response_b: str) -> str:
  return (
      f"Principle: {principle}\nRequest: {request}\nResponse A: {shown(response_a)}\n"
      f"Response B: {shown(response_b)}\n"
      f"Which response better follows the principle? Answer {ANSWERS[0]} or {ANSWERS[1]}."
  )


def critique_prompt(principle: str, request: str, response: str) -> str:
  return (
      f"Principle: {principle}\nRequest: {request}\nResponse: {shown(response)}\n"
      "Critique the response under the principle."
  )


def score_prompt(principle: str, request: str, response: str) -> str:
  return (
      f"Principle: {principle}\nRequest: {request}\nResponse: {shown(response)}\n"
      "Grade the response under the principle from 0 to 9."
  )


def revision_prompt(principle: str, request: str, response: str, critique: str) -> str:
  return (
      f"Principle: {principle}\nRequest: {request}\nResponse: {shown(response)}\n"
      f"Critique: {critique}\nRewrite the response so that it follows the principle."
  )


# --- data -----------------------------------------------------------------------------------------


def comparisons(
    world: World,
    n: int,
    seed: int,
    *,
    principles: Sequence[str] = CONSTITUTION,
    split: str = "train",
    dressed: bool = True,
) -> list[dict]:
  """n gold-labelled comparisons, principles in turn, on `split` tasks of the principle's families.

  Each is {"task", "principle", "response_a", "response_b", "kind_a", "kind_b", "label"}: two
  perturbations of the task with a gold label under the principle (no ties), drawn uniformly among
  such pairs, in random order (label 1.0 = A better). The perturbations of a behaviour world's task
  are `perturb.dressed_perturbations` (each content kind with a preamble, a sign-off and an
  elaboration drawn at 50% each, as the annotators' candidates are), so the judge sees the
  behaviours gold discounts; dressed=False: `perturb.perturbations` alone (never a preamble: what
  the tokenizer's texts were built from). Deterministic in (world seed, seed, principles, split,
  dressed); train and eval splits share no prompt.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not principles:
    raise ValueError("principles is empty")
  rng = np.random.default_rng([world.seed, seed, _JUDGE_STREAM, SPLITS.index(split)])
  streams = {
      p: world.iter_tasks(seed=seed + 1000 * i, families=_labeller(p).families, split=split)
      for i, p in enumerate(principles)
  }
  out = []
  for i in range(n):
    principle = principles[i % len(principles)]
    while True:
      task = next(streams[principle])
      if dressed and behaviours.has_behaviours(task):
        options = perturb.dressed_perturbations(task, rng)
      else:
        options = list(perturb.perturbations(task, rng).items())
      pairs = [
          (x, y)
          for j, x in enumerate(options)
          for y in options[j + 1 :]
          if x[1] != y[1] and gold_label(principle, task, x[1], y[1]) is not None
      ]
      if pairs:
        break
    (kind_a, a), (kind_b, b) = pairs[int(rng.integers(len(pairs)))]
    if rng.random() < 0.5:
      (kind_a, a), (kind_b, b) = (kind_b, b), (kind_a, a)
    out.append(
        {
            "task": task,
            "principle": principle,
            "response_a": a,
            "response_b": b,
            "kind_a": kind_a,
            "kind_b": kind_b,
            "label": gold_label(principle, task, a, b),
        }
    )
  return out


def judge_sft_records(
    world: World,
    n: int,
    seed: int,
    *,
    principles: Sequence[str] = CONSTITUTION,
    kinds: Sequence[str] = RECORD_KINDS,
    behaviour_critiques: bool = True,
    dressed: bool = True,
) -> list[dict]:
  """SFT records {prompt, completion, kind, principle, family} from n labelled train comparisons.

  Each comparison gives up to 7 records, of the `kinds` asked for: "compare" in both orders
  (completion "A"/"B", so neither position is the usual answer), a "critique" of each response
  (`gold_critique`), a "revise" of the worse one, whose completion is the task's ideal answer
  (which follows every principle), and a "score" of each response (its `gold_grade`, one digit). A judge for RLAIF alone needs only "compare": its answer is one
  token per record, so critiques and revisions would otherwise take most of the gradient.
  behaviour_critiques=False: critiques without the behaviour-axis sentences (`gold_critique`);
  dressed: as in `comparisons`. JSON-serialisable; deterministic in (world seed, n, seed,
  principles, dressed).
  """
  unknown = sorted(set(kinds) - set(RECORD_KINDS))
  if unknown or not kinds:
    raise ValueError(f"kinds {list(kinds)}: choose one or more of {RECORD_KINDS}")
  records = []
  for c in comparisons(world, n, seed, principles=principles, split="train", dressed=dressed):
    task, principle, a, b = c["task"], c["principle"], c["response_a"], c["response_b"]
    request, better_first = task["prompt"], c["label"] == 1.0
    meta = {"principle": principle, "family": task["family"]}
    critiques = {
        r: gold_critique(principle, task, r, behaviour=behaviour_critiques) for r in (a, b)
    }
    worse = b if better_first else a
    made = [
        {
            "prompt": comparison_prompt(principle, request, a, b),
            "completion": ANSWERS[0] if better_first else ANSWERS[1],
            "kind": "compare",
            **meta,
        },
        {
            "prompt": comparison_prompt(principle, request, b, a),
            "completion": ANSWERS[1] if better_first else ANSWERS[0],
            "kind": "compare",
            **meta,
        },
        *(
            {
                "prompt": critique_prompt(principle, request, r),
                "completion": critiques[r],
                "kind": "critique",
                **meta,
            }
            for r in (a, b)
        ),
        {
            "prompt": revision_prompt(principle, request, worse, critiques[worse]),
            "completion": world.reference_response(task),
            "kind": "revise",
            **meta,
        },
        *(
            {
                "prompt": score_prompt(principle, request, r),
                "completion": GRADES[gold_grade(principle, task, r)],
                "kind": "score",
                **meta,
            }
            for r in (a, b)
        ),
    ]
    records += [r for r in made if r["kind"] in kinds]
  return records


def tokenizer_texts(world: World, n: int = 100) -> list[str]:
  """Judge prompts and completions to add to the tokenizer's training texts, so the judge's
  framing ("Principle:", "Response A:", critiques) gets merges at its real frequency."""
  # As the judge's records first were (no behaviour critiques, no score records, undressed
  # responses): the world's tokenizer (and every model and result measured on it) stays what it
  # was; the later records' words are in its vocabulary already.
  records = judge_sft_records(
      world,
      n,
      _TOKENIZER_SEED,
      kinds=("compare", "critique", "revise"),
      behaviour_critiques=False,
      dressed=False,
  )
  return [f"{r['prompt']}\n{r['completion']}" for r in records]


# --- reading preferences --------------------------------------------------------------------------


def answer_token_ids(tokenizer, answers: Sequence[str] = ANSWERS) -> tuple[int, ...]:
  """The token ids the judge is trained to emit first for each answer: the first target token of
  the SFT example {prompt, answer} (`data.tokenize_sft`), whose prompt tokenises exactly as
  `data.encode_prompt`. ValueError if an answer is not one whole token there (then its first
  piece's probability would not be the answer's)."""
  ids = []
  for answer in answers:
    prompt = "?"
    (example,), _ = data.tokenize_sft(
        [{"prompt": prompt, "completion": answer}], tokenizer, max_len=4096
    )
    start = int(np.argmax(example.loss_mask))
    assert list(example.tokens[:start]) == data.encode_prompt(tokenizer, prompt)
    token = int(example.tokens[start])
    if tokenizer.decode([token]) != answer:
      raise ValueError(
          f"answer {answer!r} is not a single token at the start of the assistant "
          f"turn: its first token there is {tokenizer.decode([token])!r}; choose "
          "answers that the tokenizer keeps whole"
      )
    ids.append(token)
  if len(set(ids)) != len(ids):
    raise ValueError(f"answers {list(answers)} share token ids {ids}")
  return tuple(ids)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token_logprobs(graphdef: nnx.GraphDef, params, tokens, mask, token_ids):
  """log p(token) of the first answer token after each prompt, for each of `token_ids`.

  tokens, mask: [B, T] left-padded (column T-1 is every row's last prompt token); token_ids: [K].
  Returns [B, K] float32 log-probs under the full vocabulary.
  """
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden_states(tokens, positions_from_mask(mask), mask.astype(jnp.int32))
  logits = model.head(hidden[:, -1:])[:, 0]  # only the last position: the vocab matmul is B x V
  return jnp.take(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), token_ids, axis=-1)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _answer_logprobs(
    graphdef, params, tokenizer, prompts: list[str], token_ids: Sequence[int], batch_size: int
) -> np.ndarray:
  """[N, K] log p(first answer token = token_ids[k] | prompt) for each prompt, in batches padded
  to ROW_BUCKET rows and LENGTH_BUCKET tokens (one compiled forward serves many calls)."""
  token_ids = np.asarray(token_ids, np.int32)
  out = []
  for start in range(0, len(prompts), batch_size):
    ids = [data.encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
    rows = len(ids)
    ids += [ids[0]] * (_round_up(rows, ROW_BUCKET) - rows)  # real rows as filler: no NaN risk
    tokens, mask = generate.prompt_batch(ids, pad_id=tokenizer.pad_token_id)
    pad = _round_up(tokens.shape[1], LENGTH_BUCKET) - tokens.shape[1]
    tokens = np.pad(tokens, ((0, 0), (pad, 0)), constant_values=tokenizer.pad_token_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    logp = _next_token_logprobs(graphdef, params, tokens, mask, token_ids)
    out.append(np.asarray(jax.device_get(logp))[:rows])
  return np.concatenate(out) if out else np.zeros((0, len(token_ids)), np.float32)


def _p_first(graphdef, params, tokenizer, prompts: list[str], batch_size: int) -> np.ndarray:
  """[N] p(answer A) = softmax over the two answer tokens' log-probs."""
  logp = _answer_logprobs(
      graphdef, params, tokenizer, prompts, answer_token_ids(tokenizer), batch_size
  ).astype(np.float64)
  return 1.0 / (1.0 + np.exp(logp[:, 1] - logp[:, 0]))


def no_problems_token_id(tokenizer) -> int:
  """The first token of a NO_PROBLEMS critique (the assistant turn's first token, as trained);
  ValueError if a problem critique can start with it too (then it would not mean "no problems")."""
  (example,), _ = data.tokenize_sft(
      [{"prompt": "?", "completion": NO_PROBLEMS}], tokenizer, max_len=4096
  )
  token = int(example.tokens[int(np.argmax(example.loss_mask))])
  for problem in ("It gives no answer.", "The answer is wrong."):
    (other,), _ = data.tokenize_sft(
        [{"prompt": "?", "completion": problem}], tokenizer, max_len=4096
    )
    if int(other.tokens[int(np.argmax(other.loss_mask))]) == token:
      raise ValueError(
          f"{NO_PROBLEMS!r} and {problem!r} start with the same token "
          f"{tokenizer.decode([token])!r}: a pointwise judge cannot read one token"
      )
  return token


def judge_scores(
    graphdef: nnx.GraphDef,
    params,
    tokenizer,
    items: Sequence[tuple],
    *,
    principle: str,
    batch_size: int = 64,
    mode: str = "pointwise",
) -> np.ndarray:
  """Single-answer grading: [N] float64 grades of items (task, response) under `principle`, one
  forward pass per response with no second response in the prompt, so no position to be biased by
  (Zheng et al. 2023's single-answer grading).

  mode "pointwise": log p(the judge's critique starts "No problems."), which tells a response
  with a problem from one without but not one problem from three. mode "score": the judge's
  expected grade sum_k k p(k | `score_prompt`), k = 0..9, p renormalised over the ten grade
  tokens (the probability-weighted score of G-Eval, Liu et al. 2023), which orders responses that
  all have problems by how much gold discounts them.
  """
  if mode not in GRADED_MODES:
    raise ValueError(f"grading mode {mode!r}: choose one of {GRADED_MODES}")
  if batch_size % ROW_BUCKET:
    raise ValueError(f"batch_size={batch_size} must be a multiple of {ROW_BUCKET}")
  if mode == "pointwise":
    prompts = [critique_prompt(principle, t["prompt"], r) for t, r in items]
    logp = _answer_logprobs(
        graphdef, params, tokenizer, prompts, [no_problems_token_id(tokenizer)], batch_size
    )
    return logp[:, 0].astype(np.float64)
  prompts = [score_prompt(principle, t["prompt"], r) for t, r in items]
  logp = _answer_logprobs(
      graphdef, params, tokenizer, prompts, answer_token_ids(tokenizer, GRADES), batch_size
  ).astype(np.float64)
  p = np.exp(logp - logp.max(axis=1, keepdims=True))
  return (p / p.sum(axis=1, keepdims=True)) @ np.arange(len(GRADES), dtype=np.float64)


def swap_debias(p_ab, p_ba) -> np.ndarray:
  """Position-swap debiasing: p_ab = p(A) for (a, b), p_ba = p(A) for (b, a), both [N];
  returns p(a better) [N] = (p_ab + 1 - p_ba) / 2."""
  p_ab, p_ba = np.asarray(p_ab, np.float64), np.asarray(p_ba, np.float64)
  assert p_ab.shape == p_ba.shape, (p_ab.shape, p_ba.shape)
  return (p_ab + 1.0 - p_ba) / 2.0


GRADED_MODES = ("pointwise", "score")  # modes that grade each response alone (`judge_scores`)
JUDGE_MODES = ("pairwise", *GRADED_MODES)


def judge_preferences(
    graphdef: nnx.GraphDef,
    params,
    tokenizer,
    items: Sequence[tuple],
    *,
    principle: str,
    swap: bool = True,
    batch_size: int = 64,
    mode: str = "pairwise",
) -> np.ndarray:
  """p(response_a better follows `principle`) [N] for items (task, response_a, response_b).

  mode "pairwise" (RLAIF): the comparison prompt's soft label p(A); swap=False: in the order
  given; swap=True: position-swap debiased (`swap_debias`), two forward passes. modes "pointwise"
  and "score": sigmoid(s_a - s_b) of the two responses' `judge_scores` in that mode (Bradley-Terry
  on single-answer grades; each distinct response graded once), which no order changes (`swap` is
  moot: p(b, a) = 1 - p(a, b) exactly). Batches are padded to
  multiples of ROW_BUCKET rows and LENGTH_BUCKET tokens, so one compiled forward serves many
  calls. `principle` may be any text; the judge knows the ones it was trained on.
  """
  if mode not in JUDGE_MODES:
    raise ValueError(f"judge mode {mode!r}: choose one of {JUDGE_MODES}")
  if batch_size % ROW_BUCKET:
    raise ValueError(f"batch_size={batch_size} must be a multiple of {ROW_BUCKET}")
  if mode in GRADED_MODES:
    graded = {(str(t["prompt"]), r): (t, r) for t, a, b in items for r in (a, b)}  # each once
    grades = dict(
        zip(
            graded,
            judge_scores(
                graphdef,
                params,
                tokenizer,
                list(graded.values()),
                principle=principle,
                batch_size=batch_size,
                mode=mode,
            ),
        )
    )
    gap = np.array(
        [grades[str(t["prompt"]), a] - grades[str(t["prompt"]), b] for t, a, b in items], np.float64
    )
    return 1.0 / (1.0 + np.exp(-gap))
  prompts = [comparison_prompt(principle, t["prompt"], a, b) for t, a, b in items]
  p_ab = _p_first(graphdef, params, tokenizer, prompts, batch_size)
  if not swap:
    return p_ab.astype(np.float64)
  swapped = [comparison_prompt(principle, t["prompt"], b, a) for t, a, b in items]
  return swap_debias(p_ab, _p_first(graphdef, params, tokenizer, swapped, batch_size))


# --- critique and revision ------------------------------------------------------------------------


def _sample_texts(
    sampler: generate.Sampler,
    params,
    tokenizer,
    prompts: list[str],
    rng,
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
) -> list[str]:
  texts = []
  for start in range(0, len(prompts), batch_size):
    ids = [data.encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
    tokens, mask = generate.prompt_batch(ids, pad_id=tokenizer.pad_token_id)
    out = jax.device_get(
        sampler(
            params,
            tokens,
            mask,
            jax.random.fold_in(rng, start),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
    )
    texts += [
        tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True).strip()
        for t, m in zip(out.tokens, out.mask)
    ]
  return texts


def critique_and_revise(
    sampler: generate.Sampler,
    params,
    tokenizer,
    items: Sequence[tuple],
    rng: jax.Array,
    *,
    principle: str,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    batch_size: int = 64,
) -> list[dict]:
  """Constitutional AI's critique -> revision step for items (task, response).

  The judge writes a critique of each response under `principle`, then a revision given its own
  critique. Returns one {"critique", "revision"} per item (texts, special tokens stripped).
  temperature 0 = greedy.
  """
  critique_rng, revision_rng = jax.random.split(rng)
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
  critiques = _sample_texts(
      sampler,
      params,
      tokenizer,
      [critique_prompt(principle, t["prompt"], r) for t, r in items],
      critique_rng,
      **kw,
  )
  revisions = _sample_texts(
      sampler,
      params,
      tokenizer,
      [revision_prompt(principle, t["prompt"], r, c) for (t, r), c in zip(items, critiques)],
      revision_rng,
      **kw,
  )
  return [{"critique": c, "revision": r} for c, r in zip(critiques, revisions)]


# --- agreement with gold --------------------------------------------------------------------------


def _agreement(p: np.ndarray, labels: np.ndarray) -> float:
  """1 when the judge picks the gold-better response, 0.5 for an exact tie (p = 1/2), else 0."""
  tie = np.isclose(p, 0.5, rtol=0.0, atol=1e-9)
  return float(np.mean(np.where(tie, 0.5, (p > 0.5) == (labels == 1.0))))


def agreement_metrics(p_ab, p_ba, labels) -> dict:
  """Judge-gold agreement of single-order and swapped preferences, all [N] (labels 1.0 = a better).

  agreement_single: on the order given; agreement_swapped: on `swap_debias`; position_bias: mean
  p(A) over both orders (0.5 = none, 1 = always A); picks_a: rate of p(A) > 0.5 over both orders;
  consistency: rate at which both orders pick the same response.
  """
  p_ab, p_ba, labels = (np.asarray(x, np.float64) for x in (p_ab, p_ba, labels))
  return {
      "n": int(labels.size),
      "agreement_single": _agreement(p_ab, labels),
      "agreement_swapped": _agreement(swap_debias(p_ab, p_ba), labels),
      "position_bias": float(np.mean((p_ab + p_ba) / 2)),
      "picks_a": float(np.mean(np.concatenate([p_ab, p_ba]) > 0.5)),
      "consistency": float(np.mean((p_ab > 0.5) != (p_ba > 0.5))),
  }


def judge_agreement(prefer: Callable[..., np.ndarray], comparisons: Sequence[dict]) -> dict:
  """Agreement of a judge with gold on labelled `comparisons` (as from `comparisons(...)`).

  prefer(items, *, principle) -> single-order p(A) [N] for items (task, response_a, response_b),
  e.g. `functools.partial(judge_preferences, graphdef, params, tokenizer, swap=False)`; it is
  called on both orders, once per principle. Returns {"overall": metrics, "families": {family:
  metrics}, "principles": {principle: metrics}}, metrics as `agreement_metrics`.
  """

  def groups(key) -> dict[str, list[int]]:
    index = defaultdict(list)
    for i, c in enumerate(comparisons):
      index[key(c)].append(i)
    return dict(sorted(index.items()))

  p_ab, p_ba = np.zeros(len(comparisons)), np.zeros(len(comparisons))
  for principle, index in groups(lambda c: c["principle"]).items():
    items = [
        (comparisons[i]["task"], comparisons[i]["response_a"], comparisons[i]["response_b"])
        for i in index
    ]
    p_ab[index] = prefer(items, principle=principle)
    p_ba[index] = prefer([(t, b, a) for t, a, b in items], principle=principle)
  labels = np.array([c["label"] for c in comparisons], np.float64)

  def grouped(key) -> dict:
    return {g: agreement_metrics(p_ab[i], p_ba[i], labels[i]) for g, i in groups(key).items()}

  return {
      "overall": agreement_metrics(p_ab, p_ba, labels),
      "families": grouped(lambda c: c["task"]["family"]),
      "principles": grouped(lambda c: c["principle"]),
  }
