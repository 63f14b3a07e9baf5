"""PPO of Llama-3.2-1B against a reward model, on the prompts of a public preference set (default
UltraFeedback's train_gen split; hh). Needs, in this order:

  1. the SFT export:  experiments/llama3_1b_sft.py  -> runs/llama3_1b/sft/export
  2. a reward model:  experiments/llama3_1b_rm.py   -> runs/llama3_1b/rm/export
  3. python -m rlhf_jax.run --config=experiments/llama3_1b_ppo.py:h100x8 --workdir=runs/llama3_1b/ppo \
       --config.init_from=runs/llama3_1b/sft/export --config.ppo.reward.helpful=runs/llama3_1b/rm/export

`get_config("PRESET[,DATASET]")`: PRESET h100x8 (default) | tpu_v5e_8. Without init_from the policy
is config.hf_model_dir's checkpoint; without ppo.reward.helpful the run stops with an error naming
it. The value model starts from the policy with a fresh head; InstructGPT's value-from-RM is
--config.ppo.value_init_from=runs/llama3_1b/rm/export --config.ppo.value_head=export. The toy
world's gold evaluation (ppo.eval_every, ppo.reward.gold) does not apply to real prompts: off.
Prompts longer than ppo.max_prompt_len tokens are dropped (counted in the log).
"""

from rlhf_jax.configs import real as real_configs

# Per iteration: prompts x 1 sample generated (KV cache: bf16), scored by policy, reference, value
# and reward model, then `epochs` x `minibatches` updates of policy + value (fp32 params and AdamW
# moments of both; reference and reward model held in bf16). batch_size and seq_len are a
# mini-batch's rows and tokens (max_prompt_len + max_new_tokens), what `rlhf_jax.tools.plan` compiles
# (the update; the rollout's sampling and scoring are not in the plan).
SIZES = {
    # 64 prompts -> 4 mini-batches of 16 rows (2 per GPU) of 512 + 256 tokens.
    # plan, GB/device: params 1.24 + AdamW 2.47 + frozen 0.62 + activations 6.13 = 10.5 of 72.0
    "h100x8": dict(
        mesh=(1, 8, 1),
        batch_size=16,
        seq_len=768,
        accum_steps=1,
        remat="dots_no_batch",
        prompts=64,
        max_prompt_len=512,
        max_new_tokens=256,
    ),
    # 32 prompts -> 4 mini-batches of 8 rows (1 per chip) of 256 + 256 tokens: the rollout's
    # [rows, tokens, 128k] fp32 logits are what fills a 16 GB chip first.
    # plan, GB/device: params 1.24 + AdamW 2.47 + frozen 0.62 + activations 2.69 = 7.0 of 14.4
    "tpu_v5e_8": dict(
        mesh=(1, 8, 1),
        batch_size=8,
        seq_len=512,
        accum_steps=1,
        remat="full",
        prompts=32,
        max_prompt_len=256,
        max_new_tokens=256,
    ),
}


def get_config(arg=None):
  hardware, dataset = real_configs.parse_arg(arg, real_configs.PROMPT_DATASETS, "ultrafeedback")
  sizes = SIZES[hardware]
  c = real_configs.real_config(
      "llama3_1b", "ppo", sizes=sizes, dataset=real_configs.PROMPT_DATASETS[dataset]
  )
  c.ppo.update(
      iterations=300,
      prompts_per_iteration=sizes["prompts"],
      samples_per_prompt=1,
      max_prompt_len=sizes["max_prompt_len"],
      max_new_tokens=sizes["max_new_tokens"],
      epochs=2,
      minibatches=sizes["prompts"] // sizes["batch_size"],
      accum_steps=sizes["accum_steps"],
      temperature=1.0,
      frozen_dtype="bfloat16",
      value_model="separate",
      eval_every=0,
  )
  c.ppo.kl.update(beta=0.05, adaptive=False)
  c.ppo.reward.update(helpful="", gold=False, judge="")  # helpful: the RM export (required)
  c.optim.update(lr=1e-6, warmup_steps=20)
  c.train.checkpoint_every = 20  # PPO iterations
  return c
