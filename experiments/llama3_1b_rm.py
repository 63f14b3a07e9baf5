"""A Bradley-Terry reward model on Llama-3.2-1B from the SFT export, on a public preference set
(default UltraFeedback-binarized; hh, shp): what PPO (`llama3_1b_ppo.py`) scores its samples with.

  python -m rlhf_jax.run --config=experiments/llama3_1b_rm.py:h100x8 --workdir=runs/llama3_1b/rm \
      --config.init_from=runs/llama3_1b/sft/export

`get_config("PRESET[,DATASET]")`: PRESET h100x8 (default) | tpu_v5e_8. The LM head is replaced by
a fresh scalar head. WORKDIR/export holds the held-out score statistics PPO whitens rewards with.
"""

from rlhf_jax.configs import real as real_configs

# A row holds one pair; the scalar head makes no vocabulary logits. plan: --algorithm=reward.
SIZES = {
    # plan, GB/device: params 0.62 + AdamW 1.24 + activations 41.70 = 43.6 (of 72.0 usable)
    "h100x8": dict(
        mesh=(1, 8, 1), batch_size=64, seq_len=2048, accum_steps=1, remat="dots_no_batch"
    ),
    # plan, GB/device: params 0.62 + AdamW 1.24 + activations 6.35 = 8.2 (of 14.4 usable)
    "tpu_v5e_8": dict(mesh=(1, 8, 1), batch_size=64, seq_len=2048, accum_steps=4, remat="full"),
}


def get_config(arg=None):
  hardware, dataset = real_configs.parse_arg(arg, real_configs.PREFERENCE_DATASETS, "ultrafeedback")
  c = real_configs.real_config(
      "llama3_1b", "reward", sizes=SIZES[hardware], dataset=real_configs.DATASETS[dataset]
  )
  c.data.update(kind="pairwise", packing=False)
  # 1 epoch (InstructGPT: more overfits); a small centring term keeps scores near 0.
  c.train.steps = 950
  c.optim.update(lr=1e-5, warmup_steps=30)
  c.reward.update(margins="none", center_coef=0.01)
  c.sample.num_examples = 0
  return c
