"""The base experiment config. Experiments (`experiments/*.py`) start from it and override fields.

Every field is overridable on the command line: `--config.train.steps=500`.
"""

from __future__ import annotations

import ml_collections

from rlhf_jax.algorithms import registry
from rlhf_jax.errors import ConfigError
from rlhf_jax.losses import registry as loss_registry
from rlhf_jax.models.config import ModelConfig

# The reward-model block of the methods that score samples (rejection sampling, ReST; PPO adds
# its own options): exports, their combination (losses/reward.py) and whitening; reward functions
# ("package.module:function" or "file.py:function", algorithms/reward_functions.py) in place of
# the models or added to their reward, weighted by function_weights (empty: 1 each).
REWARD_MODELS = dict(
    helpful="",
    safety="",
    combine="llama2",
    safety_threshold=0.15,
    helpful_weight=1.0,
    safety_weight=1.0,
    whiten=True,
    functions=(),
    function_weights=(),
)


# Fields of config.dpo that moved into their loss's own block: old name -> (new name, a note).
RENAMED = {
    "beta": ("sigmoid.beta", "DPO's; ipo.beta for IPO, hinge.beta for hinge"),
    "label_smoothing": ("sigmoid.label_smoothing", "cDPO's; simpo.label_smoothing for SimPO"),
    "simpo_beta": ("simpo.beta", ""),
    "simpo_gamma": ("simpo.gamma", ""),
    "orpo_beta": ("orpo.beta", ""),
    "cpl_alpha": ("cpl.alpha", ""),
    "cpl_lam": ("cpl.lam", ""),
}


# The blocks that belong to methods (each algorithm declares the ones it reads: registry `blocks`);
# every other block (model, lora, mesh, optim, train, data, sample) is shared.
METHOD_BLOCKS = (
    "reward",
    "dpo",
    "kto",
    "ppo",
    "rejection_sampling",
    "rest",
    "constitutional",
    "hir",
)


def base_config(algorithm: str = "") -> ml_collections.ConfigDict:
  """The base experiment config. `algorithm` "": every method's block (a config any driver can
  read); a registered algorithm: `config.algorithm` set to it, and of the method blocks only those
  it reads (rlhf_jax/algorithms/registry.py), so its overrides list no other method's fields."""
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"  # which registered driver (rlhf_jax/algorithms/registry.py) runs this config
  c.seed = 0
  # JAX's persistent compilation cache (programs that took >= 1 s to compile are stored and
  # reloaded; run.enable_compilation_cache): "" = off, "workdir" = WORKDIR/jax_cache, else a
  # directory. Ignored when JAX_COMPILATION_CACHE_DIR is set (that one is used).
  c.compile_cache = ""

  model = ModelConfig().to_dict()
  model["rope_scaling"] = ml_collections.FieldReference(None, field_type=dict)
  c.model = ml_collections.ConfigDict(model)
  c.init_from = (
      ""  # a params export directory (e.g. another run's workdir/export); "" = random init
  )
  # A local Hugging Face checkpoint directory (config.json + safetensors + tokenizer). With
  # init_from empty, it is imported once into WORKDIR/hf_import and becomes init_from (and, with
  # data.tokenizer empty, its tokenizer the tokenizer); "" = off (common.resolve_inputs).
  c.hf_model_dir = ""

  # LoRA adapters (models/lora.py) on the model, for every method: rank 0 = off (full fine-tuning).
  # Only the adapters (and a new scalar head) train and have optimiser state; the reference of
  # DPO / KTO / PPO is the base (adapters off), with no second copy of it.
  c.lora = ml_collections.ConfigDict(
      dict(
          rank=0,
          alpha=16.0,  # adapter output scaled by alpha / rank
          targets=("q", "v"),  # any of q, k, v, o, gate (llama), up, down
          merge_on_export=True,  # export W + (alpha / rank) A B: a plain model for later stages / HF
      )
  )

  # (data, fsdp, tensor); one entry may be -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

  c.optim = ml_collections.ConfigDict(
      dict(
          name="adamw",
          lr=3e-4,
          b1=0.9,
          b2=0.95,
          eps=1e-8,
          weight_decay=0.1,
          decay_norms_biases_embeddings=False,
          schedule="cosine",
          warmup_steps=20,
          min_lr_ratio=0.1,
          grad_clip_norm=1.0,
          # A step whose gradient holds a NaN or Inf is skipped (params and moments unchanged; counted
          # in the `skipped_steps` metric), see train.max_nonfinite_steps and train/optim.skip_nonfinite.
          skip_nonfinite=True,
      )
  )

  c.train = ml_collections.ConfigDict(
      dict(
          steps=1000,
          batch_size=32,  # global, in sequences (rows) per optimiser step
          accum_steps=1,  # micro-batches per step: batch_size / accum_steps rows each
          seq_len=128,
          log_every=10,
          eval_every=100,
          eval_batches=4,
          checkpoint_every=100,
          keep_checkpoints=3,
          async_checkpoint=True,
          stop_after_steps=0,  # >0: stop this invocation after that many steps (preemptible jobs);
          # rerunning the same command resumes
          max_nonfinite_steps=10,  # this many consecutive skipped (non-finite) steps stop the run
          # (checked every log_every steps); 0 = never stop
      )
  )

  c.data = ml_collections.ConfigDict(
      dict(
          kind="sft",  # record kind: "sft" (prompt/completion or messages) | "text" (pretraining) |
          # "pairwise" | "ranking" (reward models) | "kto" (prompt/completion/label)
          source="toy",  # "toy" (generated instructions) | a path to JSONL / json / parquet / a
          # save_to_disk directory of `kind` records
          eval_source="",  # same forms; "" = hold out `eval_fraction` of the training records
          eval_fraction=0.05,
          split="",  # split name for HF datasets ("" = the only / 'train' split)
          # A public schema of data.source / eval_source (data/sources.py): "hh" | "ultrafeedback" |
          # "shp" | "ranked" | "auto" (preference data; PPO's family: their prompts) | "messages" (chat
          # records, e.g. ultrachat_200k). With a schema, or a source that is not a local path (a hub
          # name, loaded with datasets.load_dataset(source, split=split)), the data are converted once
          # into WORKDIR/data/{train,eval}.jsonl. "" = data.source holds our own records.
          schema="",
          eval_split="",  # split of eval_source when it is converted ("" = data.split)
          tokenizer="",  # a tokenizer directory; "" with source=toy: train one into workdir/tokenizer
          tokenizer_vocab_size=512,
          packing=False,
          prompt_overflow="skip",  # prompts >= seq_len: "skip" (counted, logged) | "error" |
          # "truncate_left" (keep BOS + the prompt's end); for reward data,
          # any response that does not fit whole
          toy_num_records=4000,
          toy_families=(),  # () = all families
      )
  )

  # Reward models (algorithm "reward", data.kind "pairwise" | "ranking"; docs/algorithms.md).
  c.reward = ml_collections.ConfigDict(
      dict(
          margins="none",  # Llama 2 margin by preference level: "none" | "small" | "large" | 4 floats
          center_coef=0.0,  # + coef * mean((r_c + r_r)^2): keeps rewards near zero mean (TRL ~1e-2)
          max_responses=9,  # ranking data: responses per comparison (K); longer rankings are errors
          comparisons_per_row=4,  # with data.packing: comparisons packed into one row of train.seq_len
          # tokens (train.batch_size counts rows)
          soft_labels=False,  # pairwise: cross-entropy on each record's soft_label = P(chosen better)
          # (RLAIF's AI labels) instead of chosen-always-wins
          lm_coef=0.0,  # > 0: + coef * next-token loss of the best responses through the SFT model's
          # LM head kept beside the scalar head (GRM, Yang et al. 2024); exports drop it
          share_prompt=False,  # training rows hold each comparison's prompt once, its responses
          # attending to it (prefix sharing): the same losses on fewer tokens;
          # reward models, DPO and its relatives, KTO (not with lm_coef)
      )
  )

  # DPO and relatives (algorithm "dpo"; data.kind "pairwise" | "ranking"). The pair loss is
  # `loss_type`, one of the registered losses (losses/registry.py; built in: "sigmoid" = DPO, cDPO
  # with label_smoothing > 0 | "ipo" | "hinge" | "simpo" | "orpo" | "cpl"), and each loss's
  # hyper-parameters are its own block: `--config.dpo.sigmoid.beta=0.3`, `config.dpo.cpl.alpha`.
  c.dpo = ml_collections.ConfigDict(
      dict(
          loss_type="sigmoid",
          reference_free=False,  # True: no reference model (its log-probs taken as 0)
          reference="precompute",  # "precompute": reference log-probs once over the data before
          # training | "per_batch": a reference forward pass every batch
          ranking_pairs="best_vs_rest",  # data.kind "ranking": "best_vs_rest" (K - 1 pairs) | "all"
          **{name: dict(loss.defaults) for name, loss in loss_registry.pair_losses().items()},
      )
  )

  # KTO (algorithm "kto"; data.kind "kto": {prompt, completion, label} unpaired records).
  c.kto = ml_collections.ConfigDict(
      dict(
          beta=0.1,
          desirable_weight=1.0,  # lambda_D; KTO suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]
          undesirable_weight=1.0,  # lambda_U
          reference="precompute",  # as config.dpo.reference: "precompute" | "per_batch"
      )
  )

  # PPO (algorithm "ppo"; docs/algorithms.md). data.source = prompt records ({"prompt", "unsafe"?}).
  # GRPO and RLOO (algorithm "grpo" | "rloo") run the same driver and read this block too: no value
  # model (value_* and vf_coef unused), samples_per_prompt >= 2, a fixed kl.beta (GRPO: coefficient
  # of the k3 KL in the loss, 0.04 in the paper; RLOO: of the summed `kl_kind` KL in the reward).
  c.ppo = ml_collections.ConfigDict(
      dict(
          iterations=100,
          prompts_per_iteration=32,  # distinct prompts per rollout
          samples_per_prompt=1,  # responses per prompt: the rollout has prompts x samples rows
          # The sequence reward's baseline across one prompt's samples (needs samples_per_prompt >= 2):
          # "none" | "rloo" (minus the mean of the prompt's other samples: removes how hard the prompt
          # is from the signal, which a value model otherwise has to learn first).
          reward_baseline="none",
          # True: every forward pass (policy, reference, value and reward models, the update) runs a
          # prompt's samples with the prompt once (prefix sharing; samples_per_prompt >= 2): the same
          # numbers on fewer tokens
          share_prompt=False,
          max_prompt_len=64,  # prompts are left-padded to this (fixed shapes: nothing recompiles)
          max_new_tokens=48,
          temperature=1.0,  # sampling temperature; log-probs in the loss use the same
          epochs=4,  # passes over each rollout
          minibatches=4,  # optimiser steps per pass (divides prompts x samples)
          accum_steps=1,  # micro-batches per mini-batch
          clip_eps=0.2,  # the ratio's clip range [1 - clip_eps, 1 + clip_eps_high]
          clip_eps_high=0.0,  # 0: = clip_eps (symmetric, PPO / GRPO); DAPO's clip-higher: 0.28
          # How the per-token losses reduce (losses/ppo.py, aggregate_loss): "token-mean" (PPO,
          # DAPO) | "seq-mean-token-mean" (GRPO) | "seq-mean-token-sum" | "seq-mean-token-sum-norm"
          # (Dr. GRPO: token sums / max_new_tokens).
          loss_aggregation="token-mean",
          # "token" (PPO, GRPO, DAPO) | "sequence" (GSPO: one length-normalised ratio per sample;
          # GRPO / RLOO only).
          importance_level="token",
          # DAPO's soft overlong punishment, added to the reward: 0 up to max_new_tokens -
          # overlong_buffer tokens, then down to -overlong_penalty at max_new_tokens (0 = off).
          overlong_buffer=0,
          overlong_penalty=1.0,
          # DAPO's dynamic sampling (GRPO / RLOO): groups whose rewards are all equal (no
          # gradient) are dropped and further prompts sampled until the batch is full, at most
          # dynamic_sampling_rounds rollouts per iteration (then filled with dropped groups).
          dynamic_sampling=False,
          dynamic_sampling_rounds=4,
          # Multi-turn rollouts with tools (algorithms/environments.py): the toy world's tools by
          # name ("calculator", "lookup") or functions "pkg.module:fn" / "file.py:fn" as
          # fn(arguments, *, record) -> str; () = one turn. max_turns: tool calls per sample;
          # tool_message_tokens: the most tokens one tool message takes (content cut to fit);
          # max_decode_steps: decode steps of all turns together (0 = (max_turns + 1) x
          # max_new_tokens, never cuts); world: the toy tools' world (a pipeline sets it).
          # Rollouts on devices of their own: the last rollout_devices devices sample (a
          # data-parallel mesh of them; the policy's weights resharded there after every
          # update), the others train (config.mesh.shape over them); 0 = every device does both.
          # staleness 1: each rollout samples with the weights from before the previous update,
          # so sampling the next batch overlaps the update; the loss's importance ratio is taken
          # against the sampling (behaviour) policy's log-probs. 0: on-policy.
          rollout_devices=0,
          staleness=0,
          tools=(),
          max_turns=2,
          tool_message_tokens=32,
          max_decode_steps=0,
          world=None,
          value_clip_eps=0.2,
          vf_coef=0.1,
          entropy_coef=0.0,
          gamma=1.0,
          lam=0.95,
          whiten_advantages=True,  # PPO's GAE advantages, over the rollout
          scale_rewards=True,  # GRPO: divide by the group's reward std (False: Dr. GRPO, centred only)
          kl_kind="k1",  # per-token KL estimator in the reward: k1 | k2 | k3
          missing_eos_penalty=-1.0,  # added to the score of a response that never emitted EOS
          score_clip=0.0,  # > 0: clip the (whitened) sequence reward to [-score_clip, score_clip]
          kl=dict(beta=0.05, adaptive=False, target=6.0, horizon=10000),  # Ziegler et al.
          # Reward-model exports; with both, `combine` = "llama2" | "linear" (losses/reward.py).
          # gold=True: no reward model, the toy world's gold combined reward of each response (an
          # oracle: the upper bound for what PPO can do with a perfect reward model).
          # judge: direct RLAIF, no reward model: an AI judge's export (toyworld/judge.py; in a
          # pipeline its stage name) compares each prompt's samples (samples_per_prompt >= 2); a
          # sample's reward is its mean position-swapped P(better than a sibling), under
          # judge_principles (() = HARMLESS on unsafe prompts, else CORRECT; or names / texts, one
          # drawn per prompt; algorithms/ai_feedback.py).
          # normalize: where whitening's statistics come from: "policy" (each reward model's scores
          # on one sample of the start policy for each of the first normalize_prompts training
          # prompts: the reward has mean 0, std 1 where PPO starts, so kl.beta means the same for
          # any reward model) | "export" (the export's held-out candidate responses).
          # judge_mode: "score" (each sample's expected 0-9 grade) | "pointwise" (log p(its
          # critique starts "No problems.")) | "pairwise" (RLAIF's comparison prompt,
          # position-swapped); algorithms/ai_feedback.py.
          reward=dict(
              REWARD_MODELS,
              gold=False,
              judge="",
              judge_principles=(),
              judge_mode="score",
              normalize="policy",
              normalize_prompts=256,
          ),
          eval_every=0,  # held-out gold + KL every N iterations on data.eval_source toy tasks (0 = off)
          eval_prompts=256,  # at most this many held-out tasks
          frozen_dtype="",  # "bfloat16": hold and run the reference and reward models in bf16
          value_model="separate",  # "separate" (a scalar-head model) | "policy_head" (head on the policy)
          value_init_from="",  # separate: the value model's export ("" = the policy's, head replaced)
          # separate: "fresh" re-initialises the exported scalar head (values ~0 at the start: the
          # advantages are then the rewards, not the noise of a reward head read at every token);
          # "export" keeps it (InstructGPT's value-from-RM, head included).
          value_head="fresh",
      )
  )

  # Rejection sampling (algorithm "rejection_sampling", Llama 2). data.source = prompt records;
  # each round's fine-tuning uses train / optim / data.packing as SFT does.
  c.rejection_sampling = ml_collections.ConfigDict(
      dict(
          rounds=3,
          samples_per_prompt=8,  # K
          prompts_per_round=512,  # the first N prompts, the same every round (Llama 2) ...
          fresh_prompts=False,  # ... or the next N unseen prompts each round (no refitting the same ones)
          prompt_offset=0,  # skip the source's first N prompts (a later stage of an iterated schedule)
          temperatures=(1.0, 1.0, 1.0),  # one per round (Llama 2 raised it over rounds)
          keep_best_across_rounds=True,  # a prompt keeps the best response of any round so far
          max_prompt_len=64,
          max_new_tokens=48,
          batch_prompts=8,  # prompts per sampler call (x K sequences)
          reward=dict(REWARD_MODELS),
      )
  )

  # ReST (algorithm "rest", Gulcehre et al. 2023). data.source = prompt records. Each Grow step
  # samples N responses per prompt from the current policy; each Improve step fine-tunes (train /
  # optim / data.packing, as SFT) on the samples with reward >= tau_k, from the previous step.
  c.rest = ml_collections.ConfigDict(
      dict(
          grow_steps=2,  # G
          prompts_per_grow=512,  # the first ones of data.source every Grow step ...
          fresh_prompts=False,  # ... or the next unseen ones each Grow step
          samples_per_prompt=8,  # N
          temperature=1.0,
          thresholds=(0.5, 0.75, 0.9),  # tau_1 < tau_2 < ..., one Improve step each
          threshold_kind="quantile",  # "quantile" of the Grow set's rewards, in (0, 1) (robust to the
          # reward's scale) | "absolute" reward values
          max_prompt_len=64,
          max_new_tokens=48,
          batch_prompts=8,  # prompts per sampler call (x N sequences)
          reward=dict(REWARD_MODELS),
      )
  )

  # Constitutional AI's supervised stage (algorithm "constitutional_sl"; algorithms/
  # constitutional.py). data.source = toy-world task records (red-team prompts).
  c.constitutional = ml_collections.ConfigDict(
      dict(
          judge="",  # the AI judge's export (toyworld/judge.py; in a pipeline, its stage name)
          # Principle names (CORRECT, HARMLESS, FORMAT, CONCISE = judge.CONSTITUTION) or texts; each
          # critique -> revision draws one at random.
          constitution=("CORRECT", "HARMLESS", "FORMAT", "CONCISE"),
          families=("unsafe", "safe_lookalike"),  # task families of data.source revised (() = all)
          prompts=512,  # the first N such prompts
          n_revisions=1,  # critique -> revision rounds per response
          temperature=1.0,  # the policy's sampling temperature for the initial responses
          revision_temperature=0.0,  # the judge's critiques and revisions (0 = greedy)
          max_new_tokens=48,
          batch_size=64,
          helpful_source="",  # SFT records mixed into the revisions (in a pipeline, e.g. "sft")
          helpful_fraction=0.5,  # their share of the SFT data, in [0, 1)
      )
  )

  # HIR (algorithm "hir", Zhang et al. 2023; algorithms/hir.py). data.source = toy-world task
  # records (their gold functions are the scripted feedback); config.train.steps per round.
  c.hir = ml_collections.ConfigDict(
      dict(
          rounds=2,  # online sampling -> relabeling -> offline training, from the previous round
          prompts_per_round=512,  # fresh prompts every round (the next ones of data.source)
          samples_per_prompt=4,  # K responses per prompt: a group, whose relabelings are negatives
          temperature=1.0,
          min_gold=0.8,  # a sample is kept when gold combined under its relabeled instruction >= this
          negatives=3,  # instructions per example that the output does not follow (padded: fixed shape)
          contrastive_coef=1.0,  # x -log softmax over [own, negatives] of log p(y | instruction)
          entropy_coef=0.001,  # x mean token entropy, subtracted (the authors' code: 0.001)
          max_prompt_len=64,
          max_new_tokens=48,
          batch_prompts=16,  # prompts per sampler call (x K sequences)
      )
  )

  c.sample = ml_collections.ConfigDict(
      dict(
          num_examples=6,  # generations printed before and after training
          max_new_tokens=32,
          temperature=0.0,
          top_k=0,
          top_p=1.0,
      )
  )
  if algorithm:
    keep = registry.get(algorithm).blocks
    for block in METHOD_BLOCKS:
      if block not in keep:
        del c[block]
    c.algorithm = algorithm
  return c


def flat_stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A pipeline stage from an experiment config: its algorithm's own block's fields moved to the
  top level (`stage.beta`, not `stage.dpo.beta`); `driver_config` undoes it."""
  block = registry.get(config.algorithm).own_block
  if block is None:
    return config
  d = config.to_dict()
  fields = d.pop(block)
  clash = sorted(set(fields) & set(d))
  if clash:
    raise ValueError(f"config.{block} fields {clash} clash with top-level fields of the config")
  return ml_collections.ConfigDict({**d, **fields})


def driver_config(stage: ml_collections.ConfigDict, name: str = "") -> ml_collections.ConfigDict:
  """The experiment config a driver reads from a flat pipeline stage (`flat_stage`): the fields of
  its algorithm's own block nested back under the block. A field that belongs neither to the
  shared config nor to the block is a ConfigError naming `config.<name>.<field>`."""
  full = base_config(stage.algorithm)
  block = registry.get(stage.algorithm).own_block
  d = stage.to_dict()
  if block is not None:
    d[block] = {k: d.pop(k) for k in list(full[block]) if k in d}
  unknown = sorted(set(d) - set(full))
  if unknown:
    raise ConfigError(
        f"config.{name or 'stage'}.{unknown[0]} is not a field of a {stage.algorithm!r} stage; its "
        f"fields are {', '.join(k for k in full if k != block)}"
        + (f" and those of config.{block}: {', '.join(full[block])}" if block else "")
    )
  return ml_collections.ConfigDict(d)
