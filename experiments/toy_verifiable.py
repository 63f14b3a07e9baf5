"""The verifiable-reward track (RLVR): GRPO on the toy world's exact checkers instead of reward
models, on the capability world (arithmetic, word-list operations, constrained instructions, facts,
safety), reported by family apart from the preference world's combined gold.

  python -m rlhf_jax.run --config=experiments/toy_verifiable.py --workdir=runs/verifiable

The reward is the sum of `rlhf_jax.toyworld.verifiers` `arithmetic`, `word_list` and `constraints`
(each 0..1 on its own families, None elsewhere); on the other families every sample scores 0, so
DAPO's dynamic sampling drops those groups and samples further prompts. Stages: world ->
pretrain -> SFT -> grpo_verifiable -> eval (gold by family on the test prompts; the checkers'
families are the ones to read). Measured: docs/toyworld.md, "The verifiable-reward track".
"""

from rlhf_jax.configs.toy import classic_world, group_stage, toy_pipeline_config

VERIFIERS = tuple(
    f"rlhf_jax.toyworld.verifiers:{name}" for name in ("arithmetic", "word_list", "constraints")
)


def get_config():
  c = classic_world(toy_pipeline_config())
  c.grpo_verifiable = group_stage("grpo", init_from="sft", prompts=16, samples=4, iterations=60)
  c.grpo_verifiable.update(dynamic_sampling=True, dynamic_sampling_rounds=4)
  c.grpo_verifiable.reward.update(helpful="", safety="", functions=VERIFIERS)
  c.stages = ("world", "pretrain", "sft", "grpo_verifiable", "eval")
  return c
