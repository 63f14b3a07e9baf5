"""DPO of Qwen2.5-0.5B on a public preference set (default UltraFeedback-binarized; hh, shp), from
the SFT export or straight from the (instruction-tuned) HF checkpoint.

  python -m rlhf_jax.run --config=experiments/qwen25_05b_dpo.py:h100x8 --workdir=runs/qwen25_05b/dpo \
      --config.init_from=runs/qwen25_05b/sft/export
  python -m rlhf_jax.run --config=experiments/qwen25_05b_dpo.py:tpu_v5e_8,hh --workdir=runs/qwen25_05b/dpo_hh

`get_config("PRESET[,DATASET]")`: PRESET h100x8 (default) | tpu_v5e_8; DATASET ultrafeedback |
hh | shp. With `init_from` empty the policy and reference are config.hf_model_dir's checkpoint
(models/Qwen2.5-0.5B-Instruct, already instruction-tuned). The reference's log-probs are
precomputed over the data before training (no reference model in memory).
"""

from rlhf_jax.configs import real as real_configs

# A row holds one pair (prompt + chosen + rejected, prompt cut from the left to fit); DPO's step is
# the SFT step's forward + backward on those rows. plan figures: --algorithm=dpo --no_reference.
SIZES = {
    # plan, GB/device: params 1.98 + AdamW 3.95 + activations 47.56 = 53.5 (of 72.0 usable)
    # Data parallel: each GPU holds the whole 0.49B model's state (as qwen25_05b_sft.py).
    "h100x8": dict(
        mesh=(8, 1, 1), batch_size=64, seq_len=2048, accum_steps=1, remat="dots_no_batch"
    ),
    # plan, GB/device: params 0.25 + AdamW 0.49 + activations 8.15 = 8.9 (of 14.4 usable)
    "tpu_v5e_8": dict(mesh=(1, 8, 1), batch_size=64, seq_len=2048, accum_steps=4, remat="full"),
}


def get_config(arg=None):
  return real_configs.dpo_recipe("qwen25_05b", SIZES, arg)
