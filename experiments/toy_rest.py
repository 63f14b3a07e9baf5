"""ReST (Gulcehre et al. 2023) from the SFT model: each of 2 Grow steps samples 8 responses to 256
fresh prompts from the current policy, scored by the Llama 2 combination of the helpfulness and
safety reward models; 3 Improve steps then fine-tune on the samples above the Grow set's rising
reward quantiles 0.5 / 0.75 / 0.9, each from the previous one; then the gold evaluation.

  python -m rlhf_jax.run --config=experiments/toy_rest.py --workdir=runs/quickstart

Reuses the quickstart's world, pretrain, SFT and reward-model stages. WORKDIR/rest/steps.json has,
per Grow step, the reward and gold of the policy's own samples and, per Improve step, its
threshold, the kept count and the kept set's reward and gold. Variants by override, e.g.
`--config.rest.thresholds='(0.5, 0.9)'`, `--config.rest.grow_steps=3`,
`--config.rest.train.steps=32`.
"""

from rlhf_jax.configs.toy import rest_stage, toy_pipeline_config


def get_config():
  c = toy_pipeline_config()
  c.rest = rest_stage()
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "rest", "eval")
  return c
