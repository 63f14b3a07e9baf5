"""The toy-world pipeline config that the toy experiments (`experiments/toy_*.py`) start from.

Every stage is an experiment config of its algorithm (`base_config(algorithm)`) with the fields of
the algorithm's own block at its top level (`flat_stage`: `config.dpo.beta`, `config.ppo.kl.beta`,
not `config.dpo.dpo.beta`), nested in the pipeline config; an experiment picks `stages` and
overrides fields. Stages cache in WORKDIR/<stage>, so experiments run
with the quickstart's workdir reuse its world, pretrained and SFT models.
"""

from __future__ import annotations

import ml_collections

from rlhf_jax.configs.base import base_config, flat_stage
from rlhf_jax.toyworld import world as world_lib

# Two layers, unrolled: the behaviour world's content is canned answers a small model learns in
# minutes, and at this size an unrolled step is ~1.5x faster than a scanned one on a CPU.
MODEL = dict(
    vocab_size=0,
    num_layers=2,
    embed_dim=128,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=384,
    max_seq_len=256,
    family="llama",
    scan_layers=False,
)


def stage(
    algorithm: str, *, lr: float, warmup: int, steps: int, seq_len: int, log_every: int
) -> ml_collections.ConfigDict:
  """A training stage on the toy model. Later stages take the architecture from the previous export;
  dtypes, remat etc. come from `model`."""
  s = base_config(algorithm)
  s.model.update(**MODEL)
  s.optim.update(lr=lr, warmup_steps=warmup, weight_decay=0.01)
  s.train.update(
      steps=steps,
      batch_size=32,
      seq_len=seq_len,
      log_every=log_every,
      eval_every=max(1, steps // 2),
      checkpoint_every=100,
  )
  s.data.update(packing=True)
  s.sample.update(num_examples=0)
  return flat_stage(s)


def reward_stage(
    source: str,
    *,
    kind: str = "pairwise",
    steps: int = 150,
    margins: str = "small",
    seq_len: int = 512,
    batch_size: int = 8,
) -> ml_collections.ConfigDict:
  """A reward model on the world data set `source` (held out: `<source>_eval`), from the SFT model.

  Rows of `seq_len` tokens are packed with whole comparisons (up to 6 pairs; a pair takes ~100
  tokens on average, ~400 at most). The small centring term pins the scores' offset, which the
  Llama 2 combination reads (its safety threshold is an absolute score).
  """
  s = stage("reward", lr=1e-4, warmup=10, steps=steps, seq_len=seq_len, log_every=10)
  s.data.update(kind=kind, source=source, eval_source=f"{source}_eval")
  s.train.update(batch_size=batch_size)
  s.update(
      margins=margins if kind == "pairwise" else "none", center_coef=0.01, comparisons_per_row=6
  )
  return s


def dpo_stage(
    source: str = "rankings",
    *,
    kind: str = "ranking",
    steps: int = 150,
    lr: float = 5e-5,
    loss_type: str = "sigmoid",
    init_from: str = "sft",
    seq_len: int = 512,
    batch_size: int = 8,
    **loss_hparams,
) -> ml_collections.ConfigDict:
  """DPO (or IPO / cDPO / hinge) from the SFT model on a world preference set (held out:
  `<source>_eval`; default the combined-criterion rankings as best-vs-rest pairs), rows packed
  with whole pairs as for the reward models; the reference's log-probs are precomputed once.
  `loss_hparams` (e.g. beta=0.3) set the loss's own block, `<stage>.<loss_type>`."""
  s = stage("dpo", lr=lr, warmup=10, steps=steps, seq_len=seq_len, log_every=10)
  s.init_from = init_from
  s.data.update(kind=kind, source=source, eval_source=f"{source}_eval")
  s.train.update(batch_size=batch_size)
  s.reward.update(comparisons_per_row=6)  # pairs per packed row
  s.loss_type = loss_type
  unknown = set(loss_hparams) - set(s[loss_type])
  if unknown:
    raise ValueError(
        f"dpo_stage: {sorted(unknown)} are not hyper-parameters of the {loss_type!r} loss "
        f"({', '.join(s[loss_type])})"
    )
  s[loss_type].update(loss_hparams)  # e.g. beta=0.3: config.<stage>.<loss_type>.beta
  return s


def kto_stage(
    source: str = "kto",
    *,
    steps: int = 150,
    beta: float = 0.1,
    lr: float = 5e-5,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    init_from: str = "sft",
    seq_len: int = 512,
    batch_size: int = 8,
) -> ml_collections.ConfigDict:
  """KTO from the SFT model on a world set of unpaired thumbs-up / thumbs-down labels (held out:
  `<source>_eval`), rows packed with whole (example, mismatched pair) comparisons as DPO packs
  pairs; the reference's log-probs are precomputed once."""
  s = stage("kto", lr=lr, warmup=10, steps=steps, seq_len=seq_len, log_every=10)
  s.init_from = init_from
  s.data.update(kind="kto", source=source, eval_source=f"{source}_eval")
  s.train.update(batch_size=batch_size)
  s.reward.update(comparisons_per_row=6)  # examples (with their mismatched pairs) per packed row
  s.update(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
  return s


def ppo_stage(
    *, iterations: int = 40, beta: float = 0.3, lr: float = 5e-5, init_from: str = ""
) -> ml_collections.ConfigDict:
  """PPO from the latest policy (or the stage `init_from` names) against the Llama 2 combination
  of the two reward models; the value model starts from the helpfulness RM (InstructGPT).
  40 iterations of 32 prompts, 2 epochs x 2 mini-batches each at lr 5e-5: ~2.5 minutes on a
  2-core CPU (60 iterations of 4 x 4 updates at lr 2e-5 took ~5, docs/toyworld.md)."""
  s = stage("ppo", lr=lr, warmup=0, steps=iterations, seq_len=128, log_every=1)
  s.init_from = init_from  # a stage name in the pipeline ("" = the latest policy stage)
  s.optim.update(schedule="constant", grad_clip_norm=1.0)
  s.data.update(
      source="rl_prompts", eval_source="valid_tasks"
  )  # its gold curve: validation prompts
  s.train.update(checkpoint_every=10)
  s.update(
      eval_every=10,
      eval_prompts=128,
      iterations=iterations,
      prompts_per_iteration=32,
      max_prompt_len=64,
      max_new_tokens=48,
      epochs=2,
      minibatches=2,
      value_init_from="rm_helpful",
  )
  s.kl.update(beta=beta)
  s.reward.update(helpful="rm_helpful", safety="rm_safety", combine="llama2")
  return s


# The GRPO family's variants as `config.ppo` settings (docs/algorithms.md, "Online group methods").
# GRPO here is the paper's advantage with DAPO's token-mean loss (`loss_aggregation`'s default).
GROUP_VARIANTS = {
    "grpo": {},
    # DAPO (Yu et al. 2025): clip-higher, token-level loss, soft overlong punishment (the last 8
    # tokens of the 48-token budget), dynamic sampling, no KL term.
    "dapo": dict(
        clip_eps_high=0.28,
        overlong_buffer=8,
        overlong_penalty=1.0,
        dynamic_sampling=True,
        kl=dict(beta=0.0),
    ),
    # Dr. GRPO (Liu et al. 2025): no std scaling, token sums over the fixed budget.
    "dr_grpo": dict(scale_rewards=False, loss_aggregation="seq-mean-token-sum-norm"),
    # GSPO (Zheng et al. 2025): one length-normalised ratio per sample, clipped to its paper's
    # narrow range, sequence-mean loss.
    "gspo": dict(
        importance_level="sequence",
        loss_aggregation="seq-mean-token-mean",
        clip_eps=3e-4,
        clip_eps_high=4e-4,
    ),
}


def group_stage(
    algorithm: str = "grpo",
    *,
    iterations: int = 60,
    prompts: int = 16,
    samples: int = 4,
    beta: float = 0.04,
    lr: float = 5e-5,
    init_from: str = "",
    variant: str = "grpo",
) -> ml_collections.ConfigDict:
  """GRPO or RLOO (`algorithm`) from the latest policy against the Llama 2 combination of the two
  reward models: `prompts` x `samples` responses per iteration (64 at the defaults; the PPO stage
  samples 32), no value model; GRPO's beta weighs the k3 KL in its loss, RLOO's the summed KL in
  its reward. variant: a GRPO variant of `GROUP_VARIANTS` ("dapo", "dr_grpo", "gspo")."""
  if variant not in GROUP_VARIANTS:
    raise ValueError(f"GRPO variant {variant!r}: choose one of {list(GROUP_VARIANTS)}")
  s = ppo_stage(iterations=iterations, beta=beta, lr=lr, init_from=init_from)
  s.algorithm = algorithm
  # share_prompt: each prompt runs once for its samples in every forward pass (the same numbers).
  s.update(
      prompts_per_iteration=prompts,
      samples_per_prompt=samples,
      epochs=2,
      minibatches=2,
      value_init_from="",
      share_prompt=True,
  )
  s.update(GROUP_VARIANTS[variant])
  return s


def rejection_sampling_stage(
    *, rounds: int = 3, samples: int = 8, prompts: int = 512, steps: int = 40
) -> ml_collections.ConfigDict:
  """Llama 2 rejection sampling from the latest policy: best of `samples` per prompt under the
  Llama 2 combination of the two reward models, `steps` SFT steps on the kept set per round."""
  s = stage("rejection_sampling", lr=3e-4, warmup=5, steps=steps, seq_len=128, log_every=10)
  s.data.update(source="rl_prompts")
  s.train.update(eval_batches=1)
  s.update(
      rounds=rounds,
      samples_per_prompt=samples,
      prompts_per_round=prompts,
      temperatures=(1.0,) * rounds,
  )
  s.reward.update(helpful="rm_helpful", safety="rm_safety", combine="llama2")
  return s


def rest_stage(
    *,
    grow_steps: int = 2,
    prompts: int = 256,
    samples: int = 8,
    thresholds: tuple = (0.5, 0.75, 0.9),
    steps: int = 16,
    lr: float = 1e-4,
    init_from: str = "",
) -> ml_collections.ConfigDict:
  """ReST from the latest policy (or the stage `init_from` names): `grow_steps` Grow steps of
  `samples` responses to `prompts` fresh prompts each, scored by the Llama 2 combination of the
  two reward models, and one Improve step of `steps` SFT steps per rising reward quantile."""
  s = stage("rest", lr=lr, warmup=2, steps=steps, seq_len=128, log_every=4)
  s.init_from = init_from
  s.data.update(source="rl_prompts")
  s.train.update(eval_batches=1)
  s.update(
      grow_steps=grow_steps,
      prompts_per_grow=prompts,
      samples_per_prompt=samples,
      fresh_prompts=True,
      thresholds=thresholds,
      threshold_kind="quantile",
  )
  s.reward.update(helpful="rm_helpful", safety="rm_safety", combine="llama2")
  return s


def ai_feedback_stage(
    *,
    judge: str = "judge",
    prompts: int = 2000,
    eval_prompts: int = 200,
    principles: tuple = (),
    families: tuple = (),
    init_from: str = "",
    judge_mode: str = "score",
) -> ml_collections.ConfigDict:
  """RLAIF's data stage (algorithms/ai_feedback.py): two samples per prompt of the latest policy (or
  `init_from`'s) on `prompts` training tasks of `families` (() = all), labelled by the judge stage
  `judge` under `principles` (() = HARMLESS on unsafe prompts, else CORRECT; names or texts), read
  as `judge_mode` ("score": expected 0-9 grades | "pointwise": log p(no problems) | "pairwise":
  position-swapped comparisons)."""
  return ml_collections.ConfigDict(
      dict(
          algorithm="ai_feedback",
          init_from=init_from,
          judge=judge,
          prompts=prompts,
          eval_prompts=eval_prompts,
          principles=principles,
          families=families,
          temperature=1.0,
          max_new_tokens=48,
          batch_size=256,
          judge_batch_size=64,
          judge_mode=judge_mode,
      )
  )


def ai_reward_stage(source: str, *, steps: int = 150) -> ml_collections.ConfigDict:
  """A reward model on an ai_feedback stage's pairs (`source` = "<stage>/pairs"), trained on the
  judge's soft labels, no margins."""
  s = reward_stage(source, steps=steps, margins="none")
  s.soft_labels = True
  return s


def constitutional_sl_stage(
    *,
    judge: str = "judge",
    prompts: int = 512,
    n_revisions: int = 1,
    steps: int = 100,
    helpful_fraction: float = 0.5,
    init_from: str = "",
) -> ml_collections.ConfigDict:
  """SL-CAI (algorithms/constitutional.py) from the latest policy: the judge stage `judge`
  critiques and revises its responses to `prompts` red-team prompts (unsafe and safe look-alike
  tasks of rl_prompts), then `steps` SFT steps on the revisions mixed with world SFT data."""
  s = stage("constitutional_sl", lr=3e-4, warmup=5, steps=steps, seq_len=128, log_every=10)
  s.init_from = init_from
  s.data.update(source="rl_prompts")
  s.train.update(eval_batches=1)
  s.update(
      judge=judge,
      prompts=prompts,
      n_revisions=n_revisions,
      helpful_source="sft",
      helpful_fraction=helpful_fraction,
  )
  return s


def hir_stage(
    *,
    rounds: int = 3,
    prompts: int = 256,
    samples: int = 4,
    steps: int = 64,
    lr: float = 3e-4,
    negatives: int = 3,
    contrastive_coef: float = 1.0,
    init_from: str = "sft",
) -> ml_collections.ConfigDict:
  """HIR from the SFT model (or the stage `init_from` names) on the world's rl_prompts: `rounds`
  rounds of `samples` responses to `prompts` fresh prompts, relabeled by the toy world's constraint
  checker and gold functions (no reward model), then `steps` steps of the HIR loss (16 examples,
  each under 1 + `negatives` instructions). The defaults were chosen on the validation prompts
  (experiments/toy_hir_sweep.py: 3 x 64 steps at 3e-4 gained +0.462 there, 2 x 24 at 1e-4 +0.262).
  """
  s = stage("hir", lr=lr, warmup=2, steps=steps, seq_len=128, log_every=4)
  s.init_from = init_from
  s.data.update(source="rl_prompts", packing=False)
  s.train.update(batch_size=16, checkpoint_every=steps)
  s.update(
      rounds=rounds,
      prompts_per_round=prompts,
      samples_per_prompt=samples,
      negatives=negatives,
      contrastive_coef=contrastive_coef,
  )
  return s


def toy_pipeline_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "pipeline"
  c.seed = 0
  # The stages compile many of the same programs (the two reward models' steps, pretraining's and
  # SFT's): compiled once, reloaded after (measured: ~10 programs, ~20 s per reward stage).
  c.compile_cache = "workdir"
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.stages = ("world", "pretrain", "sft", "eval")

  # The behaviour world (toyworld/behaviours.py): content the SFT model gets right, behaviour
  # axes whose frequencies in the demonstrations are wrong. `classic_world(c)` restores the
  # earlier capability world.
  c.world = ml_collections.ConfigDict(
      dict(
          seed=0,
          families=world_lib.BEHAVIOUR_FAMILIES,
          behaviours=dict(
              enabled=True,
              preamble_rate=0.8,
              signoff_rate=0.5,
              tagged_rate=2 / 3,
              detail_rate=0.5,
              tag_follow_rate=0.0,
          ),
          annotators_seeing=dict(preamble=1.0, signoff=1.0, tag=1.0),
          annotator_bias=0.1,
          annotator_flip_rate=0.05,
          pretrain_documents=8000,
          bad_habit_rate=0.1,
          sft_records=4000,
          sft_noise=0.02,
          # The fraction of unsafe requests whose demonstration complies (0: the SFT model
          # refuses ~98%, so safety training has little to remove; experiments/toy_constitutional.py
          # :unsafe_sft raises it).
          sft_unsafe_compliance=0.0,
          # Tools the world offers (names of toyworld.tools.TOOL_NAMES: "calculator", "lookup"):
          # the tokenizer gains the tool-call tokens and its chat template the "tool" role. The
          # fraction of the arithmetic / facts SFT demonstrations that call the calculator / the
          # lookup is tool_demo_rate (0: none; the other records stay as without tools).
          tools=(),
          tool_demo_rate=0.0,
          # The arithmetic family's operands are 0..max_operand (12: 507 problems, which a model
          # memorises from enough demonstrations; 99: it has to compute, or call a calculator).
          max_operand=12,
          eval_prompts=1024,
          valid_prompts=1024,
          tokenizer_vocab_size=1024,
          preference_prompts=4000,
          preference_eval_prompts=400,
          annotator_noise=0.1,
          judge_comparisons=2000,
          judge_eval_comparisons=200,
          rl_prompts=4000,
      )
  )

  # 50 steps: the behaviour world's pretraining text is dialogues like the SFT records (measured:
  # the SFT model's gold at T = 1 is the same after 50 or 100 pretraining steps, 0.476 / 0.481).
  c.pretrain = stage("pretrain", lr=3e-3, warmup=20, steps=50, seq_len=128, log_every=10)
  # 200 steps at lr 2e-3: at 200 steps of lr 1e-3 the SFT model's safe samples at T = 1 still
  # slipped in ~10% (mean content 0.929; mostly one topic's answer for another's), noise that
  # sharpening removes (+0.04 content at T = 0.85); 300 steps at 1e-3 and 200 at 2e-3 both fix it
  # (measured: SFT gold 0.447 / 0.441, T = 0.85 -0.009 / -0.009), the second in 2/3 of the time.
  c.sft = stage("sft", lr=2e-3, warmup=10, steps=200, seq_len=128, log_every=10)
  # The AI judge (add "judge" to stages): SFT from the SFT model on judge records. 2,000 labelled
  # comparisons (14,000 records: both orders, two critiques, a revision, two grades) and 400
  # steps; its agreement with gold: docs/toyworld.md, "RLAIF and Constitutional AI".
  c.judge = stage("sft", lr=1e-3, warmup=10, steps=400, seq_len=256, log_every=20)
  # Annotated samples of the SFT model (add "feedback" to stages after sft; reward stages read
  # "feedback/pairs_helpful" etc.): on-policy preference data, as InstructGPT and Llama 2 collect.
  # init_from names the policy to sample: "sft", not "" (the latest policy stage before it, which
  # in a multi-method experiment is another method's model).
  c.feedback = ml_collections.ConfigDict(
      dict(
          algorithm="feedback",
          init_from="sft",
          prompts=4000,
          eval_prompts=400,
          samples_per_prompt=4,
          temperature=1.0,
          max_new_tokens=48,
          batch_size=256,
      )
  )
  # Llama 2's two reward models, each on its own annotators' pairs, with the margin loss. 100 / 70
  # steps at lr 2e-4 order the SFT model's samples as well as 150 / 100 at 1e-4 (measured:
  # within-prompt correlation with gold on behaviour prompts 0.705 / 0.653); 80 / 50 at 1e-4 do not
  # (0.518: the reward gate fails).
  c.rm_helpful = reward_stage("pairs_helpful", steps=100)
  c.rm_safety = reward_stage("pairs_safety", steps=70)
  for rm in (c.rm_helpful, c.rm_safety):
    rm.optim.lr = 2e-4
  # How the pipeline's evaluation (and later PPO) combines them: "llama2" (safety score where the
  # prompt is flagged unsafe or sigmoid(safety) < safety_threshold, else helpfulness) | "linear".
  c.combine = ml_collections.ConfigDict(
      dict(
          helpful="rm_helpful",
          safety="rm_safety",
          kind="llama2",
          safety_threshold=0.15,
          helpful_weight=1.0,
          safety_weight=1.0,
      )
  )
  # PPO and rejection sampling against the combination (add them to stages after the RMs).
  c.ppo = ppo_stage()
  c.rejection_sampling = rejection_sampling_stage()

  # best_of_n: the reward evaluation also scores by gold the best of n samples of the policy the
  # reward models branched from (or the stage `best_of_n_policy` names), picked by each reward
  # (() = off).
  # temperatures: with PPO stages, the gold and KL of their start policy sampled at these
  # temperatures (no reward model, no training): the baseline PPO must beat at equal KL.
  # rewards: "eval" also reports on the reward models in `stages` ("eval_rewards" always does).
  # samples_per_prompt: gold of every policy from this many samples of each held-out prompt
  # (paired standard errors over prompts; 1,024 prompts x 4 samples give ~0.005).
  # split: "eval" (the test prompts) or "valid" (the validation prompts: tune on these).
  # reward_records: held-out rankings and safety-critical pairs the reward report scores (0 = all).
  # temperature_prompts: the temperature curve on the first N held-out prompts (0 = all).
  # rounds: the gold table also scores each rejection-sampling round's policy ("<stage>/round_<r>",
  # each against the round before it).
  # skip: trained stages the gold table does not sample (a stage started from one of them gets
  # its KL, not a win rate). best_of_n_prompts: the first N held-out tasks (0 = all).
  # best_of_n_functions: reward functions ("pkg.module:fn" or "file.py:fn") that also pick a best
  # of n each, beside the reward models (algorithms/reward_functions.py).
  c.eval = ml_collections.ConfigDict(
      dict(
          split="eval",
          max_new_tokens=40,
          temperature=1.0,
          batch_size=256,
          samples_per_prompt=4,
          num_samples_shown=8,
          skip=(),
          best_of_n=(1, 2, 4, 8),
          best_of_n_prompts=0,
          reward_records=0,
          best_of_n_policy="",
          best_of_n_functions=(),
          # Tools every policy of the gold table may call (algorithms/environments.py; the toy
          # world's "calculator" / "lookup" or "pkg.module:fn"; () = none), at most max_turns
          # calls per answer, a tool message at most tool_message_tokens tokens.
          tools=(),
          max_turns=2,
          tool_message_tokens=32,
          temperatures=(1.0, 0.85, 0.7, 0.5),
          temperature_prompts=0,
          rewards=True,
          rounds=False,
      )
  )
  return c


def classic_world(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` with the earlier capability world (arithmetic, word lists, recalled facts, constraints,
  safety; no behaviour axes), whose negative result docs/toyworld.md explains."""
  c.world.families = world_lib.CLASSIC_FAMILIES
  c.world.behaviours.enabled = False
  return c
