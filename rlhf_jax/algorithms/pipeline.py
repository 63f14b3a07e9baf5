"""The toy-world pipeline: world -> pretrain -> SFT [-> judge] [-> reward models] [-> PPO] -> gold
evaluation.

Training stages are named in `config.stages`, each with its experiment config `config.<stage>`,
whose `algorithm` says which driver trains it (pretrain, sft, reward, ppo). A stage starts from the
export of the stage its `init_from` names, by default the latest *policy* stage before it (pretrain,
sft, ppo; not the judge): so pretrain -> sft -> ppo chain, while reward models, the AI judge and
sweep variants (`init_from="sft"`) branch off; `init_from="scratch"` starts a stage from new weights
of its own `model` config (a second, larger trunk for reward models). A PPO stage names its reward and value models by
their stages (`ppo.reward.helpful="rm_helpful"`). A stage's `data.source` / `data.eval_source`
may name a data set of the world stage ("pairs_helpful", "rankings_eval", "rl_prompts", ...);
"" / "toy" means the data set named like the stage.

The "eval" stage evaluates everything trained, "eval_rewards" the reward stages alone. Reward
stages are evaluated on held-out preference data (their own eval set by margin level and
family, Kendall tau on held-out rankings, accuracy on gold-labelled safety-critical pairs), and
`config.combine` names a helpfulness and a safety stage whose scores are combined (Llama 2 rule or
linear) and evaluated the same way.

The optional "judge" stage fine-tunes the SFT model into the AI judge (toyworld/judge.py) on a
limited number of gold-labelled comparisons, critiques and revisions, and reports its agreement
with gold on held-out comparisons before and after position-swap debiasing. An "ai_feedback" stage
(RLAIF) writes pairs of a policy's samples labelled by that judge ("<stage>/pairs", for a reward
stage with `reward.soft_labels`); a "constitutional_sl" stage (SL-CAI) fine-tunes a policy on the
judge's revisions of its responses; `ppo.reward.judge` names the judge's stage for direct RLAIF.

Each stage works in WORKDIR/<stage> and is skipped when its output exists (a finished training
stage has WORKDIR/<stage>/export), so rerunning the command skips finished stages and resumes an
interrupted one from its last checkpoint. Stage configs are full experiment configs nested in the
pipeline config (`config.pretrain`, `config.sft`), overridable as `--config.sft.train.steps=...`;
the pipeline fills in their data paths, tokenizer, `init_from` chain, seed and mesh.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import time

import jax
import ml_collections

from rlhf_jax import data, generate, sharding
from rlhf_jax.algorithms import (
    ai_feedback,
    common,
    environments,
    ppo,
    registry,
)
from rlhf_jax.configs.base import driver_config
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluation import gold as gold_eval
from rlhf_jax.evaluation import plots, reward_eval
from rlhf_jax.toyworld import annotators, corpora, gates, judge
from rlhf_jax.toyworld import tools as world_tools
from rlhf_jax.toyworld import world as world_lib
from rlhf_jax.train import metrics
from rlhf_jax.train.metrics import format_table

_log = logging.getLogger(__name__)
NOT_POLICIES = ("judge",)  # an SFT-trained model that is not a policy
# "eval": everything trained; "eval_rewards": the reward models only (no policy sampling).
EVAL_STAGES = ("eval", "eval_rewards")
# A data-collection stage (not trained): annotated samples of a policy, see `collect_feedback`.
FEEDBACK = "feedback"
# `init_from` of a stage that starts from new weights although policy stages come before it.
SCRATCH = "scratch"
# Held-out copies of the feedback data sets ("<name>_eval") and gold-labelled pairs on the prompts
# where safety decides (for the combined reward).
EVAL_FEEDBACK = tuple(f"{name}_eval" for name in annotators.DATASET_KINDS)
load_policy = common.load_policy  # the gold evaluation's policies, the judge, feedback sampling


def annotator_options(w: ml_collections.ConfigDict) -> dict:
  """The annotator-pool options `config.world` sets, for `annotators.build_preference_datasets`
  (those it leaves out keep that function's defaults)."""
  fields = {"annotator_bias": "bias_strength", "annotator_flip_rate": "flip_rate"}
  options = {option: w[field] for field, option in fields.items() if field in w}
  if w.get("annotators_seeing"):
    options["seeing"] = dict(w.annotators_seeing)
  return options


def check_world(w: ml_collections.ConfigDict) -> world_lib.World:
  """The world of `config.world`, or a ConfigError naming the field that makes it impossible:
  a behaviour frequency outside [0, 1], an unknown family, a behaviour axis that no annotator
  sees (no label would carry it), an unknown tool, or a tool demonstration rate outside [0, 1] or
  above 0 without tools."""
  try:
    world = world_lib.World.from_config(w)
  except ValueError as e:
    raise ConfigError(
        str(e) if "config.world" in str(e) else f"config.world.families: {e}"
    ) from None
  names, rate = tuple(w.get("tools", ())), w.get("tool_demo_rate", 0.0)
  unknown = [name for name in names if name not in world_tools.TOOL_NAMES]
  if unknown:
    raise ConfigError(
        f"config.world.tools={names}: unknown tools {unknown}; choose from "
        f"{', '.join(world_tools.TOOL_NAMES)}"
    )
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
    raise ConfigError(
        f"config.world.tool_demo_rate={rate!r}: must be a fraction in [0, 1] (of the arithmetic "
        "and facts demonstrations that use a tool)"
    )
  if rate > 0 and not names:
    raise ConfigError(
        f"config.world.tool_demo_rate={rate} demonstrates tools, but config.world.tools is empty; "
        f"name some of {', '.join(world_tools.TOOL_NAMES)} or set the rate to 0"
    )
  seeing = dict(w.get("annotators_seeing") or {})
  for axis, fraction in seeing.items():
    try:
      annotators.make_annotator_pool(
          annotators.POOL_SIZE, 0, noise=0.0, bias_strength=0.0, seeing={axis: fraction}
      )
    except ValueError as e:
      raise ConfigError(f"config.world.annotators_seeing.{axis}={fraction}: {e}") from None
  return world


def build_world(config: ml_collections.ConfigDict, out_dir: str) -> dict:
  """Writes the world's data sets and tokenizer to `out_dir`; returns their paths."""
  w = config.world
  paths = {
      name: os.path.join(out_dir, f"{name}.jsonl")
      for name in (
          "pretrain",
          "sft",
          "eval_tasks",
          "valid_tasks",
          "judge",
          "judge_eval",
          *annotators.DATASET_KINDS,
          *EVAL_FEEDBACK,
          "safety_critical_eval",
          "rl_prompts",
      )
  }
  paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
  os.makedirs(out_dir, exist_ok=True)
  world = check_world(w)
  uses_tools = bool(w.get("tools", ()))
  if os.path.exists(os.path.join(paths["tokenizer"], "tokenizer.json")):
    tokenizer = data.load_tokenizer(paths["tokenizer"])
    if uses_tools and not set(data.TOOL_TOKENS) <= set(tokenizer.get_added_vocab()):
      raise ConfigError(
          f"config.world.tools={tuple(w.tools)}, but the world's tokenizer {paths['tokenizer']} was "
          "trained without tools; use a new workdir (or delete its world directory) to rebuild it"
      )
  else:
    tokenizer = data.train_tokenizer(
        corpora.tokenizer_texts(world) + judge.tokenizer_texts(world),
        w.tokenizer_vocab_size,
        paths["tokenizer"],
        tools=uses_tools,
    )
  groups = _world_datasets(world, w, tokenizer)
  counts = {}
  for names, build in groups:
    if all(os.path.exists(paths[name]) for name in names):
      continue
    for name, records in build().items():
      annotators.write_jsonl(records, paths[name])  # atomic: never a half-written data file
      counts[name] = len(records)
  if counts:
    _log.info("world: wrote %s", counts)
  return paths


def _world_datasets(world, w: ml_collections.ConfigDict, tokenizer) -> list:
  """[(file names, build() -> {name: records})]: the world's data set groups. Each is built only
  when one of its files is missing (`build_world`): a world written by an older version gains the
  new data sets without rewriting (or re-tokenising) what stages trained on."""
  # Dialogues in pretraining text use the chat template, so SFT starts from a model that already
  # knows the format (and its bad habits).
  render = lambda messages: data.tokenizer.render_chat(
      tokenizer, messages, add_generation_prompt=False
  )
  feedback = lambda n, seed, split: annotators.build_preference_datasets(
      world, n_prompts=n, seed=seed, noise=w.annotator_noise, split=split, **annotator_options(w)
  )
  one = lambda name, build: ((name,), lambda: {name: build()})
  return [
      one(
          "pretrain",
          lambda: [
              {"text": d}
              for d in corpora.pretraining_documents(
                  world,
                  w.pretrain_documents,
                  w.seed,
                  bad_habit_rate=w.bad_habit_rate,
                  render=render,
              )
          ],
      ),
      one(
          "sft",
          lambda: corpora.sft_records(
              world,
              w.sft_records,
              w.seed + 1,
              noise=w.sft_noise,
              unsafe_compliance=w.get("sft_unsafe_compliance", 0.0),
              tool_demo_rate=w.get("tool_demo_rate", 0.0),
              tools=tuple(w.get("tools", ())),
          ),
      ),
      one("eval_tasks", lambda: world.tasks(w.eval_prompts, seed=w.seed + 2, split="eval")),
      # Validation prompts, disjoint from the test prompts: what hyper-parameters are chosen on.
      one(
          "valid_tasks",
          lambda: world.tasks(
              w.get("valid_prompts", w.eval_prompts), seed=w.seed + 9, split="valid"
          ),
      ),
      # Simulated human feedback for reward models and preference methods, and held-out copies.
      (
          tuple(annotators.DATASET_KINDS),
          lambda: feedback(w.preference_prompts, w.seed + 3, "train"),
      ),
      (
          EVAL_FEEDBACK,
          lambda: {
              f"{name}_eval": records
              for name, records in feedback(w.preference_eval_prompts, w.seed + 6, "eval").items()
          },
      ),
      one(
          "safety_critical_eval",
          lambda: annotators.gold_pairs(
              world,
              n_prompts=w.preference_eval_prompts,
              seed=w.seed + 7,
              families=annotators.SAFETY_FAMILIES,
          ),
      ),
      # AI-judge training data (a limited number of gold labels) and held-out comparisons.
      one("judge", lambda: judge.judge_sft_records(world, w.judge_comparisons, w.seed + 4)),
      one(
          "judge_eval",
          lambda: judge.comparisons(world, w.judge_eval_comparisons, w.seed + 5, split="eval"),
      ),
      # Prompts for online methods (PPO, rejection sampling): training-split tasks.
      one("rl_prompts", lambda: world.tasks(w.rl_prompts, seed=w.seed + 8, split="train")),
  ]


def feedback_paths(stage: str, stage_dir: str) -> dict:
  """{"<stage>/<data set>": path} for the files a feedback stage writes."""
  return {
      f"{stage}/{name}": os.path.join(stage_dir, f"{name}.jsonl")
      for name in (*annotators.DATASET_KINDS, *EVAL_FEEDBACK)
  }


def collect_feedback(
    config: ml_collections.ConfigDict, stage: str, stage_dir: str, paths: dict, policy_export: str
) -> dict:
  """Human feedback on a policy's own samples, as InstructGPT and Llama 2 collect it.

  For `config.<stage>.prompts` training prompts (and `eval_prompts` held-out ones) the policy
  samples `samples_per_prompt` responses; their distinct ones, topped up with perturbation
  candidates to K ~ U{4..9}, are labelled by the world's annotator pool into the same data sets
  as the world stage's (`annotators.build_preference_datasets`), written to WORKDIR/<stage>/ and
  named "<stage>/pairs_helpful", "<stage>/rankings_eval", ... for later stages' `data.source`.
  A reward model trained on these has seen the policy's own mistakes (and degenerate samples),
  which perturbations alone do not show it. Returns the new paths.
  """
  f, w = config[stage], config.world
  out = feedback_paths(stage, stage_dir)
  if all(os.path.exists(p) for p in out.values()):
    return out
  if not policy_export:
    raise ConfigError(f"config.{stage} (feedback) needs a policy stage before it to sample from")
  mesh = sharding.make_mesh(config.mesh.shape)
  policy = load_policy(policy_export, mesh)
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  k = f.samples_per_prompt

  def policy_samples(tasks: list[dict], seed: int) -> list[list[str]]:
    repeated = [t for t in tasks for _ in range(k)]
    texts, _ = gold_eval.sample_responses(
        policy,
        tokenizer,
        repeated,
        jax.random.key(seed),
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        batch_size=f.batch_size,
    )
    return [texts[i * k : (i + 1) * k] for i in range(len(tasks))]

  os.makedirs(stage_dir, exist_ok=True)
  world = world_lib.World.from_config(w)
  for split, n, seed, suffix in (
      ("train", f.prompts, w.seed + 3, ""),
      ("eval", f.eval_prompts, w.seed + 6, "_eval"),
  ):
    datasets = annotators.build_preference_datasets(
        world,
        n_prompts=n,
        seed=seed,
        noise=w.annotator_noise,
        split=split,
        policy_samples=functools.partial(policy_samples, seed=seed),
        **annotator_options(w),
    )
    for name, records in datasets.items():
      annotators.write_jsonl(records, out[f"{stage}/{name}{suffix}"])
  _log.info(
      "%s: labelled samples of %s on %d + %d prompts",
      stage,
      policy_export,
      f.prompts,
      f.eval_prompts,
  )
  return out


def stage_inputs(config: ml_collections.ConfigDict, stage: str) -> list[str]:
  """The stages `stage` reads other than the policy it starts from, and theirs, recursively: every
  config value of the stage that names a stage ("rm_helpful") or a stage's data set
  ("ai_feedback/pairs"), e.g. reward models, the judge, AI feedback. For the comparison's cost."""
  names, out = set(config.stages), []

  def values(x):
    if isinstance(x, dict):
      for v in x.values():
        yield from values(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        yield from values(v)
    elif isinstance(x, str):
      yield x

  fields = {k: v for k, v in config[stage].to_dict().items() if k not in ("init_from", "algorithm")}
  for value in values(fields):
    name = value.split("/")[0]
    if name in names and name != stage and name not in out and not is_policy(config, name):
      out += [name, *[s for s in stage_inputs(config, name) if s not in out and s != name]]
  return out


def write_stage_info(
    config: ml_collections.ConfigDict,
    stage: str,
    stage_dir: str,
    parent: str | None,
    seconds: float,
) -> None:
  """WORKDIR/<stage>/stage.json: what the comparison (rlhf_jax/evaluation/compare.py) reads about a stage:
  its algorithm, the stage it started from, the wall-clock seconds of the run that finished it
  (a resumed stage: of the last invocation only) and its inputs (`stage_inputs`)."""
  info = {
      "stage": stage,
      "algorithm": config[stage].algorithm,
      "parent": parent,
      "seconds": round(seconds, 1),
      "inputs": stage_inputs(config, stage),
  }
  metrics.write_json(info, os.path.join(stage_dir, "stage.json"))


def stage_config(
    config: ml_collections.ConfigDict,
    stage: str,
    paths: dict,
    init_from: str,
    exports_dir: str = "",
) -> ml_collections.ConfigDict:
  c = driver_config(config[stage], stage)
  c.seed, c.mesh.shape = config.seed, config.mesh.shape
  entry = registry.get(c.algorithm)
  if entry.data_kind:
    c.data.kind = entry.data_kind
  source = c.data.source if c.data.source not in ("", "toy") else stage
  if source not in paths:
    raise ConfigError(
        f"config.{stage}.data.source={source!r} names no world data set; choose one of "
        f"{', '.join(sorted(p for p in paths if p != 'tokenizer'))}"
    )
  c.data.source = paths[source]
  if c.data.eval_source in paths:
    c.data.eval_source = paths[c.data.eval_source]
  c.data.tokenizer = paths["tokenizer"]
  c.init_from = init_from
  # Fields naming other stages (reward and value models, judges) become their exports; fields
  # naming a world data set its path.
  for field in entry.stage_fields:
    name = registry.get_field(c, field)
    registry.set_field(c, field, os.path.join(exports_dir, name, "export") if name else "")
  for field in entry.data_fields:
    if registry.get_field(c, field) in paths:
      registry.set_field(c, field, paths[registry.get_field(c, field)])
  if "ppo" in c and c.ppo.get("tools"):  # the toy world's tools are built on its world
    c.ppo.world = config.world
  return c


def is_policy(config: ml_collections.ConfigDict, stage: str) -> bool:
  entry = registry.algorithms().get(config[stage].algorithm)
  return entry is not None and entry.policy and stage not in NOT_POLICIES


def parent_stage(
    config: ml_collections.ConfigDict, stage: str, previous_policy: str | None
) -> str | None:
  """The stage whose export `stage` starts from: `config.<stage>.init_from` when it names a stage,
  None for "scratch" (new weights), else the latest policy stage before it (None for the first)."""
  named = config[stage].get("init_from", "")
  if named == SCRATCH:
    return None
  if named:
    if named not in config.stages:
      raise ConfigError(f"config.{stage}.init_from={named!r} names no stage of config.stages")
    return named
  return previous_policy


def training_stages(config: ml_collections.ConfigDict) -> list[str]:
  """The training stages of `config.stages` in order; checks each names a known driver."""
  stages = [s for s in config.stages if s not in ("world", *EVAL_STAGES)]
  for stage in stages:
    if stage not in config or "algorithm" not in config[stage]:
      experiments = [k for k, v in config.items() if hasattr(v, "keys") and "algorithm" in v]
      close = difflib.get_close_matches(stage, experiments, n=1)
      raise ConfigError(
          f"config.stages names {stage!r} but config.{stage} is not an experiment "
          f"config{f' (did you mean {close[0]!r}?)' if close else ''}; a stage is "
          "world, eval, eval_rewards or one of the experiment configs in the pipeline "
          f"config: {', '.join(experiments)}"
      )
    drivers = [name for name, a in registry.algorithms().items() if a.pipeline_stage]
    known = (*drivers, FEEDBACK, ai_feedback.ALGORITHM)
    if config[stage].algorithm not in known:
      raise ConfigError(
          f"config.{stage}.algorithm={config[stage].algorithm!r}; a pipeline stage "
          f"runs one of {', '.join(known)}"
      )
    if config[stage].algorithm == ai_feedback.ALGORITHM:
      ai_feedback.check_config(config[stage], stage, config.stages)
  policy = config.get("eval", {}).get("best_of_n_policy", "")
  if policy and policy not in stages:
    raise ConfigError(
        f"config.eval.best_of_n_policy={policy!r} names no training stage of "
        f"config.stages ({', '.join(stages)})"
    )
  return stages


def eval_tasks_path(config: ml_collections.ConfigDict, paths: dict) -> str:
  """The held-out tasks that the gold table, temperature curve and best-of-n report sample:
  `config.eval.split` "eval" (the test prompts, default) or "valid" (the validation prompts,
  for choosing hyper-parameters without looking at the test set)."""
  split = config.eval.get("split", "eval")
  if split not in ("eval", "valid"):
    raise ConfigError(
        f"config.eval.split={split!r}: choose 'eval' (the test prompts) or 'valid' "
        "(the validation prompts that hyper-parameters are tuned on)"
    )
  return paths[f"{split}_tasks"]


def evaluate_stages(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: dict,
    stages: list[str],
    parents: dict | None = None,
) -> dict:
  """Gold table for every policy stage; each is compared with the stage it started from (win rate
  and KL), default the one before it. A parent evaluated in this table lends its own samples for
  the comparison (same tasks, key and sample count: no second sampling pass); a parent that is
  not (`config.eval.skip`, e.g. the pretrained model) gives the KL only."""
  e = config.eval
  parents = parents or {stage: prev for prev, stage in zip([None, *stages], stages)}
  stages = [s for s in stages if s not in e.get("skip", ())]
  if not stages:
    _log.info("eval: every trained stage is in config.eval.skip; no gold table")
    return {}
  out_path = os.path.join(workdir, "eval", "gold.json")
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape)
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  tasks = metrics.read_jsonl(eval_tasks_path(config, paths))
  results, policies = {}, {}
  load = lambda stage: with_tools(
      config, load_policy(os.path.join(workdir, stage, "export"), mesh), tokenizer
  )
  for stage in stages:
    policies[stage] = load(stage)
    parent = parents.get(stage)
    reference = policies.get(parent) if parent else None
    if parent and reference is None:  # a parent trained in an earlier run but not listed here
      reference = load(parent)
    evaluated = results.get(parent, {}).get("samples")
    results[stage] = gold_eval.evaluate(
        policies[stage],
        tokenizer,
        tasks,
        jax.random.key(config.seed),
        reference=reference,
        max_new_tokens=e.max_new_tokens,
        temperature=e.temperature,
        batch_size=e.batch_size,
        samples_per_prompt=e.get("samples_per_prompt", 1),
        win_rate=evaluated is not None,
        reference_samples=evaluated,
    )
    if parent:
      results[stage]["reference"] = parent
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)
  if jax.process_index() == 0:
    split = "validation" if e.get("split", "eval") == "valid" else "held-out test"
    print(
        f"\nGold evaluation on {split} prompts (win rate and KL against the stage each started "
        "from; combined_se: standard error over prompts):"
    )
    print(format_table(gold_eval.table_rows(results)))
    for stage, result in results.items():
      d = result["overall"].get("vs_reference")
      if d and d["ci95"]:
        print(
            f"{stage} - {result['reference']}: combined gold {d['diff']:+.3f} (paired SE "
            f"{d['se']:.4f}, 95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
            f"{d['prompts']} prompts)"
        )
    print(f"\nSample conversations ({stages[-1]}, one sample of a prompt of each family in turn):")
    print(
        format_table(
            [
                {k: r[k] for k in ("family", "prompt", "response", "helpfulness", "safety")}
                for r in shown_samples(results[stages[-1]]["samples"], e.num_samples_shown)
            ]
        )
    )
  return results


def shown_samples(rows: list[dict], n: int) -> list[dict]:
  """n rows to print: the first sample of distinct prompts, the families taken in turn."""
  by_family = {}
  seen = set()
  for row in rows:
    if row.get("prompt_index") not in seen:
      seen.add(row.get("prompt_index"))
      by_family.setdefault(row["family"], []).append(row)
  queues = list(by_family.values())
  out = []
  while len(out) < n and any(queues):
    for queue in queues:
      if queue and len(out) < n:
        out.append(queue.pop(0))
  return out


@registry.register("pipeline", policy=False, pipeline_stage=False)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.stages` in order in WORKDIR/<stage> (finished stages are skipped, a stopped one
  resumes), then the evaluations they name. -> the final metrics ({"stopped_in": stage} when a
  stage stopped early)."""
  # A bad mesh fails before any stage runs; each stage writes its own config.
  common.start_run(config, workdir, write=False, train_batch=False)
  training = training_stages(config)
  paths = build_world(config, os.path.join(workdir, "world"))
  if config.get("eval"):
    eval_tasks_path(config, paths)  # a bad config.eval.split fails before any training
  done = run_stages(config, workdir, training, paths)
  if done.stopped_in:
    return {"stopped_in": done.stopped_in}
  return evaluate_pipeline(config, workdir, paths, done)


@dataclasses.dataclass
class Trained:
  """What `run_stages` trained: each policy stage's parent (in order), the reward stages and
  theirs, or the stage that stopped early."""

  parents: dict = dataclasses.field(default_factory=dict)
  rewards: list = dataclasses.field(default_factory=list)
  reward_parents: dict = dataclasses.field(default_factory=dict)
  stopped_in: str | None = None


def run_stages(config: ml_collections.ConfigDict, workdir: str, training: list, paths: dict):
  """Runs the training stages (data collection, AI feedback, drivers) in order; `paths` gains the
  data sets the collection stages write. -> Trained."""
  done, previous = Trained(), None
  for stage in training:
    stage_dir = os.path.join(workdir, stage)
    export = os.path.join(stage_dir, "export")
    parent = parent_stage(config, stage, previous)
    parent_export = os.path.join(workdir, parent, "export") if parent else ""
    if config[stage].algorithm == FEEDBACK:
      paths.update(collect_feedback(config, stage, stage_dir, paths, parent_export))
      continue
    if config[stage].algorithm == ai_feedback.ALGORITHM:  # AI-labelled pairs (RLAIF, RL-CAI)
      started = time.time()
      fresh = not os.path.exists(os.path.join(stage_dir, "stage.json"))
      judge_export = os.path.join(workdir, config[stage].judge, "export")
      paths.update(
          ai_feedback.collect(config, stage, stage_dir, paths, parent_export, judge_export)
      )
      if fresh:
        write_stage_info(config, stage, stage_dir, parent, time.time() - started)
      continue
    if os.path.exists(export):
      _log.info("stage %s: done (%s), skipping", stage, export)
    else:
      _log.info("stage %s: training in %s (from %s)", stage, stage_dir, parent or "scratch")
      os.makedirs(stage_dir, exist_ok=True)
      stage_cfg = stage_config(config, stage, paths, parent_export, exports_dir=workdir)
      started = time.time()
      registry.get(stage_cfg.algorithm).train(stage_cfg, stage_dir)
      if not os.path.exists(export):  # stopped early (stop_after_steps): rerun to continue
        done.stopped_in = stage
        return done
      write_stage_info(config, stage, stage_dir, parent, time.time() - started)
    if is_policy(config, stage):
      previous = stage
      done.parents[stage] = parent
    elif config[stage].algorithm == "reward":
      done.rewards.append(stage)
      done.reward_parents[stage] = parent
  return done


def evaluate_pipeline(
    config: ml_collections.ConfigDict, workdir: str, paths: dict, done: Trained
) -> dict:
  """The evaluations `config.stages` names: the reward models (`eval_rewards`, or `eval` with
  `eval.rewards`), every trained policy's gold (`eval`) with the temperature baseline, the PPO
  plot and the gates, the judge's agreement. -> the final metrics."""
  stages, trained, parents = list(config.stages), list(done.parents), done.parents
  result = {"stages": trained}
  best_of_n = None  # the reward evaluation's best-of-n curve, drawn on the PPO plot
  score_rewards = "eval_rewards" in stages or (
      "eval" in stages and config.eval.get("rewards", True)
  )
  if done.rewards and score_rewards:
    # Best of n from `eval.best_of_n_policy`, by default the policy the (helpfulness) reward model
    # branched from.
    anchor = (
        config.combine.helpful
        if config.get("combine") and config.combine.helpful in done.rewards
        else done.rewards[0]
    )
    policy = config.eval.get("best_of_n_policy") or done.reward_parents.get(anchor)
    summary, best_of_n = reward_eval.evaluate_reward_stages(
        config,
        workdir,
        paths,
        done.rewards,
        policy_export=os.path.join(workdir, policy, "export") if policy else "",
        tasks_path=eval_tasks_path(config, paths),
    )
    result.update(summary)
  if "eval" in stages and trained:
    result.update(evaluate_policies(config, workdir, paths, parents, best_of_n))
  if "eval" in stages and "judge" in stages:
    agreement = evaluate_judge(config, workdir, paths)
    result.update({f"judge/{k}": v for k, v in agreement["overall"].items()})
    for mode in judge.GRADED_MODES:
      result[f"judge/{mode}_agreement"] = agreement[mode]["overall"]["agreement_swapped"]
  return result


def with_tools(config: ml_collections.ConfigDict, policy, tokenizer):
  """`policy` sampling multi-turn rollouts with `config.eval.tools` (the toy world's tools, or
  functions) when set: every policy of the gold table answers with the tools available."""
  e = config.eval
  if not e.get("tools"):
    return policy
  tools = environments.load_tools(e.tools, tokenizer, world=config.world, key="config.eval.tools")
  sampler = generate.TurnSampler(
      policy.graphdef,
      policy.sampler.config,
      mesh=policy.sampler.mesh,
      param_shardings=policy.sampler.param_shardings,
  )
  tool_sampler = environments.ToolSampler(
      sampler,
      tools,
      max_turns=e.get("max_turns", 2),
      queue_size=e.get("tool_message_tokens", 32),
  )
  return dataclasses.replace(policy, sampler=tool_sampler)


def evaluate_policies(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: dict,
    parents: dict,
    best_of_n: dict | None,
) -> dict:
  """Gold of every trained policy (and rejection sampling's rounds) against its parent, the
  temperature baseline of the PPO stages' start policy (else SFT's), the gold-vs-KL plot and the
  gates. -> the final metrics' part of them."""
  trained, result = list(parents), {}
  evaluated, eval_parents = with_rounds(config, workdir, trained, parents)
  results = evaluate_stages(config, workdir, paths, evaluated, eval_parents)
  result.update({f"{s}/{k}": v for s, r in results.items() for k, v in r["overall"].items()})
  ppo_stages = [s for s in trained if config[s].algorithm in ppo.ESTIMATOR_OF]  # + GRPO, RLOO
  tool_stages = [s for s in ppo_stages if config[s].get("tools")]
  if tool_stages:  # how often each family calls, and its accuracy, over training
    path = plots.plot_tool_use(
        {s: metrics.read_jsonl(os.path.join(workdir, s, "metrics.jsonl")) for s in tool_stages},
        os.path.join(workdir, "eval", "tool_use.png"),
        families=tuple(dict.fromkeys(config.world.families)),
    )
    _log.info("wrote %s", path)
  # The temperature curve of the PPO stages' start policy (else of the SFT model): the baseline
  # without a reward model or training that every method has to beat at equal KL.
  start = parents.get(ppo_stages[0]) if ppo_stages else ("sft" if "sft" in trained else None)
  curve = None
  if config.eval.get("temperatures") and start:
    curve = temperature_baseline(
        config,
        workdir,
        paths,
        start,
        at_t1=results.get(start) if config.eval.temperature == 1.0 else None,
    )
    result["temperature_curve"] = curve
  if ppo_stages:
    baselines = []
    if best_of_n:
      name = next((k for k in best_of_n if k.startswith("combined")), None)
      if name:
        baselines.append({"label": f"best of n ({name})", "kl": best_of_n["kl"], **best_of_n[name]})
    if curve:
      temperatures = ", ".join(f"{t:g}" for t in curve["temperature"])
      baselines.append({**curve, "label": f"{curve['policy']} at T = {temperatures}"})
    result["plot"] = plot_ppo_runs(config, workdir, ppo_stages, results, baselines)
  result["gates"] = write_gates(workdir, curve=curve, best_of_n=best_of_n, gold=results)
  return result


def with_rounds(
    config: ml_collections.ConfigDict, workdir: str, stages: list[str], parents: dict
) -> tuple[list[str], dict]:
  """(stages, parents) for the gold table; with `config.eval.rounds`, each rejection-sampling
  stage's intermediate policies ("<stage>/round_<r>", Llama 2's RLHF-V1, V2, ...) come before it,
  each compared with the one before it (the first with the stage's own start policy), and the
  stage itself (the last round's policy) with the round before it."""
  if not config.eval.get("rounds"):
    return stages, parents
  out, parents = [], dict(parents)
  for stage in stages:
    if config[stage].algorithm == "rejection_sampling":
      previous = parents.get(stage)
      for r in range(1, config[stage].rounds):
        name = f"{stage}/round_{r}"
        if os.path.exists(os.path.join(workdir, name, "export")):
          out.append(name)
          parents[name], previous = previous, name
      parents[stage] = previous
    out.append(stage)
  return out, parents


def write_gates(workdir: str, *, curve: dict | None, best_of_n: dict | None, gold: dict) -> list:
  """WORKDIR/eval/gates.json and a printed PASS / FAIL / NOT RUN line per gate (toyworld/gates.py)."""
  reward_name = next((k for k in (best_of_n or {}) if k.startswith("combined")), None)
  checked = gates.check(curve=curve, best_of_n=best_of_n, reward_name=reward_name, gold=gold)
  metrics.write_json(checked, os.path.join(workdir, "eval", "gates.json"))
  if jax.process_index() == 0:
    print("\nGates (can this world show feedback winning?):")
    print(format_table(checked))
  return checked


def temperature_baseline(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: dict,
    stage: str,
    at_t1: dict | None = None,
) -> dict:
  """Gold and KL of `stage`'s policy (the PPO stages' start) sampled at `config.eval.temperatures`
  on the held-out tasks (`gold_eval.temperature_curve`): what sharpening the start policy buys
  without a reward model, the baseline PPO must beat at equal KL. Writes
  WORKDIR/eval/temperature.json. `at_t1`: the stage's gold evaluation at T = 1 with the same key
  and samples, reused for the curve's T = 1 point. `config.eval.temperature_prompts` (0 = all):
  the curve on the first N held-out tasks only; their samples at every temperature then use the
  same random numbers as the first N tasks' samples in `at_t1` (same key, same batches), so the
  paired differences to T = 1 keep their common random numbers."""
  mesh = sharding.make_mesh(config.mesh.shape)
  e = config.eval
  tasks = metrics.read_jsonl(eval_tasks_path(config, paths))
  n = e.get("temperature_prompts") or len(tasks)
  if n < len(tasks):
    tasks = tasks[:n]
    if at_t1 is not None:
      rows = [r for r in at_t1["samples"] if r["prompt_index"] < n]
      at_t1 = {"overall": gold_eval.summarise(rows), "samples": rows}
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  curve = gold_eval.temperature_curve(
      with_tools(config, load_policy(os.path.join(workdir, stage, "export"), mesh), tokenizer),
      tokenizer,
      tasks,
      jax.random.key(config.seed),
      e.temperatures,
      max_new_tokens=e.max_new_tokens,
      batch_size=e.batch_size,
      samples_per_prompt=e.get("samples_per_prompt", 1),
      at_t1=at_t1,
  )
  curve.update(policy=stage, prompts=len(tasks))
  path = os.path.join(workdir, "eval", "temperature.json")
  with open(path, "w") as f:
    json.dump(curve, f, indent=1)
  if jax.process_index() == 0:
    print(
        f"\nGold of {stage} sampled at lower temperatures on {len(tasks)} held-out prompts (KL to "
        "itself at T = 1):"
    )
    print(format_table(temperature_rows(curve)))
  return curve


def temperature_rows(curve: dict) -> list[dict]:
  """The temperature curve as table rows: gold, its SE, the paired difference to T = 1 with its
  95% interval, and the behaviour-axis rates where the world has them."""
  rows = []
  for i, t in enumerate(curve["temperature"]):
    d = curve["vs_t1"][i] if curve.get("vs_t1") else None
    row = {
        "temperature": t,
        "kl": curve["kl"][i],
        "helpfulness": curve["helpfulness"][i],
        "combined": curve["combined"][i],
        "se": curve.get("combined_se", [None] * (i + 1))[i],
    }
    if d and d["ci95"]:
      row["vs T=1 [95% CI]"] = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
    for axis in gold_eval.AXIS_METRICS:
      if curve.get(axis) and curve[axis][i] is not None:
        row[axis] = curve[axis][i]
    rows.append(row)
  return rows


def plot_ppo_runs(
    config: ml_collections.ConfigDict,
    workdir: str,
    stages: list[str],
    results: dict,
    baselines: list[dict] = (),
) -> str:
  """WORKDIR/eval/ppo_gold_vs_kl.png: proxy and gold reward against KL for each PPO stage (a beta
  sweep shows over-optimisation), with each stage's held-out gold result as a marker and the
  curves without RL (`baselines`: best of n under the combined reward, the start policy at lower
  temperatures)."""
  label = (
      lambda s: f"{s} (beta={config[s].kl.beta:g}{', adaptive' if config[s].kl.adaptive else ''})"
  )
  runs = {label(s): metrics.read_jsonl(os.path.join(workdir, s, "metrics.jsonl")) for s in stages}
  final = {label(s): results[s]["overall"] for s in stages if s in results}
  path = plots.plot_gold_vs_kl(
      runs, os.path.join(workdir, "eval", "ppo_gold_vs_kl.png"), final=final, baselines=baselines
  )
  _log.info("wrote %s", path)
  return path


def evaluate_judge(config: ml_collections.ConfigDict, workdir: str, paths: dict) -> dict:
  """The judge's agreement with gold on held-out comparisons, read in each of `judge.JUDGE_MODES`:
  "pairwise" (before and after position swapping), "pointwise" and "score" (single-answer grades;
  their swapped and single-order figures are equal). WORKDIR/eval/judge.json: the pairwise result
  with the graded ones under "pointwise" and "score"; returns the same."""
  mesh = sharding.make_mesh(config.mesh.shape)
  tokenizer = data.load_tokenizer(paths["tokenizer"])
  policy = load_policy(os.path.join(workdir, "judge", "export"), mesh)
  comparisons = metrics.read_jsonl(paths["judge_eval"])
  by_mode = {
      mode: judge.judge_agreement(
          functools.partial(
              judge.judge_preferences,
              policy.graphdef,
              policy.params,
              tokenizer,
              swap=False,
              mode=mode,
          ),
          comparisons,
      )
      for mode in judge.JUDGE_MODES
  }
  agreement = {**by_mode["pairwise"], **{mode: by_mode[mode] for mode in judge.GRADED_MODES}}
  with open(os.path.join(workdir, "eval", "judge.json"), "w") as f:
    json.dump(agreement, f, indent=1)
  if jax.process_index() == 0:
    rows = [
        {"mode": mode, "principle": p, **m}
        for mode, result in by_mode.items()
        for p, m in [("all", result["overall"]), *result["principles"].items()]
    ]
    print(
        "\nAI judge vs gold on held-out comparisons (agreement before/after position swap; "
        "pointwise, score: single-answer grades, no position):"
    )
    print(format_table(rows))
  return agreement
