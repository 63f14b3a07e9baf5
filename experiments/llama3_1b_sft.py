"""SFT of Llama-3.2-1B(-Instruct) on a chat data set (default HuggingFaceH4/ultrachat_200k), from a
local HF checkpoint directory. The first stage of SFT -> reward model -> PPO, or SFT -> DPO.

  hf download meta-llama/Llama-3.2-1B-Instruct --local-dir models/Llama-3.2-1B-Instruct
  python -m rlhf_jax.run --config=experiments/llama3_1b_sft.py:h100x8 --workdir=runs/llama3_1b/sft
  python -m rlhf_jax.run --config=experiments/llama3_1b_sft.py:tpu_v5e_8 --workdir=runs/llama3_1b/sft

`get_config("PRESET[,DATASET]")`: PRESET h100x8 (default) | tpu_v5e_8; DATASET ultrachat. Own data:
--config.data.source=my.jsonl --config.data.schema='' --config.data.split='' (our sft records).
Other checkpoint: --config.hf_model_dir=DIR. Writes WORKDIR/export (what DPO / RM / PPO start from).
"""

from rlhf_jax.configs import real as real_configs

# Per device: params + AdamW moments (fp32, FSDP over 8) + the compiled step's temporaries, from
# `python -m rlhf_jax.tools.plan --config=experiments/llama3_1b_sft.py:PRESET --chip=...` (CPU compiler,
# 2026-11-26; docs/real_models.md: CPU plans run ~1.3-1.6x above the measured GPU peak).
SIZES = {
    # 8 rows of 2048 tokens per GPU per step (131k tokens per step); FSDP costs one all-gather of
    # each layer per pass over NVLink, cheap next to 8 x 2048 tokens of matmuls.
    # plan, GB/device: params 0.62 + AdamW 1.24 + activations 47.68 = 49.5 (of 72.0 usable)
    "h100x8": dict(
        mesh=(1, 8, 1), batch_size=64, seq_len=2048, accum_steps=1, remat="dots_no_batch"
    ),
    # 16 GB chips: 2 rows per chip per micro-batch, 4 micro-batches, full remat (the 128k-vocab
    # logits of a row alone are 1 GB in fp32).
    # plan, GB/device: params 0.62 + AdamW 1.24 + activations 9.16 = 11.0 (of 14.4 usable)
    "tpu_v5e_8": dict(mesh=(1, 8, 1), batch_size=64, seq_len=2048, accum_steps=4, remat="full"),
}


def get_config(arg=None):
  return real_configs.sft_recipe("llama3_1b", SIZES, arg)
