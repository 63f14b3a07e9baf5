"""The allowed range of every numeric config field, checked in one place before any work.

`check_ranges(config)` walks the whole config (a pipeline's stages included) and raises one
ConfigError naming the first field outside its range, its value and the range:

  config.optim.lr=-1.0 is out of range: must be a finite number > 0

A field's rule is looked up by its parent block and name first (`("train", "eval_every")`), then by
its name alone, so a stage's copy of a block (`ppo_adaptive.kl.beta`) gets the block's rule. A
numeric field with no rule is an error of this module, not of the user's config: the test that
walks every experiment file's config (tests/unit/configs/test_ranges.py) finds it. The one
exception: a DPO-family loss's own block (`config.dpo.<loss_type>.*`, any registered loss, a
user's too) is checked by that loss's own hyper-parameter checks (`dpo.check_loss_config`), since
its fields mean what the loss says (`lam` is DPO-Positive's penalty weight, CPL's conservative
weight).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import ml_collections

from rlhf_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
  """lo <= value <= hi (a bound is open where `lo_open` / `hi_open`); `integer`: a whole number."""

  lo: float = -math.inf
  hi: float = math.inf
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False

  def contains(self, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if not math.isfinite(value) or (self.integer and value != int(value)):
      return False
    above = value > self.lo if self.lo_open else value >= self.lo
    below = value < self.hi if self.hi_open else value <= self.hi
    return above and below

  def describe(self) -> str:
    kind = "a whole number" if self.integer else "a finite number"
    parts = []
    if self.lo > -math.inf:
      parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
    if self.hi < math.inf:
      parts.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
    return f"{kind} {' and '.join(parts)}" if parts else kind

  def outside(self) -> float:
    """A value this range excludes (for tests)."""
    if self.lo > -math.inf:
      return self.lo if self.lo_open else self.lo - 1
    return self.hi if self.hi_open else self.hi + 1


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Range(1, integer=True)  # sizes, steps, intervals: at least one
OPTIONAL_COUNT = Range(0, integer=True)  # 0 = off / auto / none
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
ANY = Range()

RULES: dict[str, Range] = {
    # Counts, sizes, steps and intervals.
    **dict.fromkeys(
        (
            "accum_steps batch_prompts batch_size checkpoint_every comparisons_per_row "
            "dynamic_sampling_rounds embed_dim max_operand tool_message_tokens "
            "epochs eval_batches grow_steps iterations judge_batch_size keep_checkpoints log_every "
            "max_new_tokens max_nonfinite_steps max_prompt_len max_seq_len minibatches mlp_dim "
            "n_revisions num_heads num_kv_heads num_layers prompts_per_grow prompts_per_iteration "
            "prompts_per_round rounds samples_per_prompt seq_len steps horizon toy_num_records "
            "judge_comparisons judge_eval_comparisons preference_eval_prompts preference_prompts "
            "pretrain_documents rl_prompts sft_records valid_prompts eval_prompts prompts"
        ).split(),
        COUNT,
    ),
    "max_responses": Range(2, integer=True),  # a ranking compares at least two
    "tokenizer_vocab_size": Range(256, integer=True),  # the byte-level alphabet and more
    # 0 = off, auto or none.
    **dict.fromkeys(
        (
            "best_of_n_prompts eval_every max_decode_steps max_turns negatives normalize_prompts "
            "rollout_devices staleness "
            "num_examples "
            "num_samples_shown overlong_buffer prompt_offset rank reward_records seed "
            "stop_after_steps "
            "temperature_prompts top_k vocab_size warmup_steps"
        ).split(),
        OPTIONAL_COUNT,
    ),
    # Rates, probabilities and fractions.
    **dict.fromkeys(
        (
            "annotator_bias annotator_flip_rate bad_habit_rate detail_rate preamble_rate "
            "signoff_rate tag_follow_rate tagged_rate sft_noise sft_unsafe_compliance "
            "tool_demo_rate "
            "helpful_fraction min_gold gamma lam "
            "min_lr_ratio preamble signoff tag"
        ).split(),
        FRACTION,
    ),
    "eval_fraction": Range(0, 1, hi_open=True),  # something must be left to train on
    "label_smoothing": Range(0, 0.5, hi_open=True),  # at 0.5 the labels say nothing
    "top_p": Range(0, 1, lo_open=True),
    "b1": Range(0, 1, hi_open=True),
    "b2": Range(0, 1, hi_open=True),
    # Scales, coefficients and temperatures.
    **dict.fromkeys(
        (
            "lr eps init_std scalar_head_init_std norm_eps rope_theta clip_eps value_clip_eps "
            "target alpha beta"
        ).split(),
        POSITIVE,
    ),
    **dict.fromkeys(
        (
            "annotator_noise center_coef clip_eps_high contrastive_coef entropy_coef grad_clip_norm "
            "overlong_penalty "
            "helpful_weight lm_coef safety_weight score_clip temperature revision_temperature "
            "vf_coef weight_decay desirable_weight undesirable_weight"
        ).split(),
        NON_NEGATIVE,
    ),
    # Any finite number: a threshold on a reward model's score, a reward added for a missing EOS.
    **dict.fromkeys("safety_threshold missing_eos_penalty".split(), ANY),
}

# Where a name means something else in one block (parent block, name) -> range.
BLOCK_RULES: dict[tuple[str, str], Range] = {
    ("train", "eval_every"): COUNT,  # the trainer evaluates every N steps (PPO's: 0 = never)
    ("kl", "beta"): NON_NEGATIVE,  # PPO's KL coefficient: 0 = no penalty
    ("train", "seq_len"): Range(2, integer=True),  # a row holds a prompt token and a target
}


def loss_block(path: tuple[str, ...]) -> bool:
  """Whether `path` is a field of a registered pair loss's block (`dpo.<loss_type>.<field>`, or
  `<stage>.<loss_type>.<field>` in a pipeline's flat DPO stage)."""
  from rlhf_jax.losses import registry  # the built-in losses register on import

  return len(path) >= 2 and path[-2] in registry.pair_losses()  # in a flat stage too


def rule(path: tuple[str, ...]) -> Range | None:
  """The range of the field at `path` (e.g. ("ppo", "kl", "beta")), or None if it has none (a
  pair loss's own fields: `loss_block`)."""
  if loss_block(path):
    return None
  if len(path) >= 2 and (path[-2], path[-1]) in BLOCK_RULES:
    return BLOCK_RULES[(path[-2], path[-1])]
  return RULES.get(path[-1])


def numeric_fields(config: ml_collections.ConfigDict, prefix=()) -> Iterator[tuple[tuple, Any]]:
  """(path, value) of every int or float field (not bool) of `config`, nested blocks included."""
  for key, value in config.items():
    path = (*prefix, key)
    if isinstance(value, ml_collections.ConfigDict):
      yield from numeric_fields(value, path)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield path, value


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first numeric field outside its range (`RULES`, `BLOCK_RULES`)."""
  for path, value in numeric_fields(config):
    allowed = rule(path)
    if allowed is not None and not allowed.contains(value):
      raise ConfigError(
          f"config.{'.'.join(path)}={value!r} is out of range: must be {allowed.describe()}"
      )
