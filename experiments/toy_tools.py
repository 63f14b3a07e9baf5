"""Tool use: GRPO with a calculator and a knowledge-base lookup (multi-turn rollouts).

  python -m rlhf_jax.run --config=experiments/toy_tools.py --workdir=runs/tools
  python -m rlhf_jax.run --config=experiments/toy_tools.py:no_tools --workdir=runs/tools_control

The capability world restricted to arithmetic and recalled facts, the two families a small model
gets wrong (it cannot compute 7 * 12, and recalls facts it read once in pretraining poorly). With
tools (`config.world.tools`), the tokenizer has tool-call tokens and `tool_demo_rate` of the SFT
demonstrations of those families call the tool (`<tool_call>calculator: 7 * 12</tool_call>`,
then the tool's message, then the answer), so the SFT model calls them sometimes; GRPO on the
world's gold reward, in multi-turn rollouts in which the calls run (at most `max_turns` per
answer), then has to learn when calling pays. The gold table samples every policy with the tools
available (`config.eval.tools`).

`no_tools` is the control: the same world, demonstrations and reward without tools, so GRPO can
only sharpen what the SFT model computes. Measured: docs/toyworld.md, "Tool use".
"""

from rlhf_jax.configs.toy import classic_world, group_stage, toy_pipeline_config

FAMILIES = ("arithmetic", "facts")
TOOLS = ("calculator", "lookup")
GOLD = ("rlhf_jax.toyworld.verifiers:gold",)


def _config(tools: bool):
  c = classic_world(toy_pipeline_config())
  c.world.update(families=FAMILIES, max_operand=99)
  if tools:
    c.world.update(tools=TOOLS, tool_demo_rate=0.3)
  # 400 SFT steps (not 200): a 2-layer model needs them to copy numbers into a call and the
  # tool's result into the answer (measured at 200 steps: the SFT model's calls were right but its
  # answers ignored the result, gold 0.07 when it called).
  c.sft.train.steps = 500
  c.grpo_tools = group_stage(
      "grpo", init_from="sft", prompts=16, samples=4, iterations=200, lr=1e-4
  )
  c.grpo_tools.reward.update(helpful="", safety="", functions=GOLD)
  c.grpo_tools.update(max_new_tokens=40)
  if tools:
    c.grpo_tools.update(tools=TOOLS, max_turns=2, tool_message_tokens=24)
    c.eval.tools = TOOLS
  c.eval.update(max_new_tokens=40, best_of_n=(), temperatures=())
  c.stages = ("world", "pretrain", "sft", "grpo_tools", "eval")
  return c


def get_config(arg=None):
  if arg not in (None, "no_tools"):
    raise ValueError(f"experiments/toy_tools.py:{arg}: the variants are '' and 'no_tools'")
  return _config(tools=arg != "no_tools")
