"""SFT of Qwen2.5-0.5B(-Instruct) on a chat data set (default HuggingFaceH4/ultrachat_200k), from a
local HF checkpoint directory: the first stage of SFT -> DPO (`qwen25_05b_dpo.py`).

  hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct
  python -m rlhf_jax.run --config=experiments/qwen25_05b_sft.py:h100x8 --workdir=runs/qwen25_05b/sft
  python -m rlhf_jax.run --config=experiments/qwen25_05b_sft.py:tpu_v5e_8 --workdir=runs/qwen25_05b/sft

`get_config("PRESET[,DATASET]")`: PRESET h100x8 (default) | tpu_v5e_8; DATASET ultrachat. Own data:
--config.data.source=my.jsonl --config.data.schema='' --config.data.split='' (our sft records).
Other checkpoint: --config.hf_model_dir=DIR. Writes WORKDIR/export (what DPO starts from).
"""

from rlhf_jax.configs import real as real_configs

# Per device: params + AdamW moments (fp32; FSDP: 1/8 of them) + the compiled step's temporaries,
# from `python -m rlhf_jax.tools.plan --config=experiments/qwen25_05b_sft.py:PRESET --chip=...`
# (CPU compiler, 2026-11-26; docs/real_models.md: CPU plans run ~1.3-1.6x above the measured GPU peak).
SIZES = {
    # 0.49B params: params + AdamW moments + gradients are ~8 GB, so each GPU holds all of them
    # (pure data parallelism: no per-layer all-gathers) and 8 rows of 2048 tokens.
    # plan, GB/device: params 1.98 + AdamW 3.95 + activations 47.56 = 53.5 (of 72.0 usable)
    "h100x8": dict(
        mesh=(8, 1, 1), batch_size=64, seq_len=2048, accum_steps=1, remat="dots_no_batch"
    ),
    # 16 GB chips: FSDP (the replicated state alone would take half a chip), 2 rows per chip per
    # micro-batch, full remat (a row's 152k-vocab logits are 1.2 GB in fp32).
    # plan, GB/device: params 0.25 + AdamW 0.49 + activations 8.15 = 8.9 (of 14.4 usable)
    "tpu_v5e_8": dict(mesh=(1, 8, 1), batch_size=64, seq_len=2048, accum_steps=4, remat="full"),
}


def get_config(arg=None):
  return real_configs.sft_recipe("qwen25_05b", SIZES, arg)
