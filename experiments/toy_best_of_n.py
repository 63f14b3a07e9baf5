"""Best-of-n over-optimisation without RL (Gao et al. 2022): the SFT model's best of n = 1..16
samples of 512 test prompts, picked by each reward model and by their Llama 2 combination, scored
by gold; WORKDIR/eval/best_of_n.png draws gold and each reward's own score of its pick (the proxy)
against sqrt(KL(best of n || SFT)).

  python -m rlhf_jax.run --config=experiments/toy_best_of_n.py --workdir=runs/best_of_n_biased
  python -m rlhf_jax.run --config=experiments/toy_best_of_n.py:0.1 --workdir=runs/quickstart

The argument is the annotators' bias strength (default BIASED): each simulated annotator prefers
longer or hedged answers, or is stricter on safety, by this much in utility (the quickstart's world
uses 0.1). The reward models learn what the annotators prefer, so with strongly biased annotators
the proxy keeps rising with n while gold rises less, or turns over.
"""

from rlhf_jax.configs.toy import toy_pipeline_config

BIASED = 0.5


def get_config(arg=None):
  c = toy_pipeline_config()
  c.world.annotator_bias = float(arg) if arg else BIASED
  c.eval.update(best_of_n=(1, 2, 4, 8, 16), best_of_n_prompts=512, reward_records=100)
  c.stages = ("world", "pretrain", "sft", "rm_helpful", "rm_safety", "eval_rewards")
  return c
