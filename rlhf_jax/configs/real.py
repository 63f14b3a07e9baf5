"""What the real-model experiments (`experiments/llama3_1b_*.py`, `experiments/qwen25_05b_*.py`)
share: the models (a local HF checkpoint directory each), the named public data sets and the
hardware presets' common settings. Each experiment file holds its own sizes per preset.

    get_config("h100x8")               8x H100 80 GB, the file's default data set
    get_config("tpu_v5e_8,hh")         a TPU v5e-8 (8 chips, 16 GB each), Anthropic HH-RLHF

The model comes from `config.hf_model_dir` (imported once into WORKDIR/hf_import when
`config.init_from` is empty; `algorithms/common.resolve_inputs`); the data set from
`config.data.source` + `schema` + `split` (a hub name is loaded with `datasets.load_dataset`, a
local file or directory is read as is, both converted once into WORKDIR/data/*.jsonl).
"""

from __future__ import annotations

import ml_collections

from rlhf_jax.configs.base import base_config
from rlhf_jax.models.config import llama3_config

HARDWARE = ("h100x8", "tpu_v5e_8")
DEFAULT_HARDWARE = "h100x8"

# Architectures as the checkpoints' config.json describe them. A run takes the architecture from the
# imported checkpoint (only dtype, param_dtype, remat and scan_layers of config.model apply); these
# fields let `python -m rlhf_jax.tools.plan --config=experiments/FILE.py:PRESET` plan the run without it.
# (Llama 3.2's llama3 RoPE scaling is left out: it changes no shape.)
MODELS = {
    "llama3_1b": dict(
        hf_model_dir="models/Llama-3.2-1B-Instruct",
        arch={
            k: v
            for k, v in llama3_config("1b", max_seq_len=131072).to_dict().items()
            if k not in ("rope_scaling", "dtype", "param_dtype", "remat")
        },
    ),
    "qwen25_05b": dict(
        hf_model_dir="models/Qwen2.5-0.5B-Instruct",
        arch=dict(
            vocab_size=151936,
            num_layers=24,
            embed_dim=896,
            num_heads=14,
            num_kv_heads=2,
            mlp_dim=4864,
            max_seq_len=32768,
            family="llama",
            rope_theta=1000000.0,
            norm_eps=1e-6,
            tie_embeddings=True,
            qkv_bias=True,
        ),
    ),
}

# Named data sets: hub name, schema (data/sources.py), train and held-out splits.
DATASETS = {
    # SFT: multi-turn chats; rows also carry a `prompt` column, so the `messages` schema.
    "ultrachat": dict(
        source="HuggingFaceH4/ultrachat_200k",
        schema="messages",
        split="train_sft",
        eval_split="test_sft",
    ),
    # Preferences (reward models, DPO).
    "hh": dict(source="Anthropic/hh-rlhf", schema="hh", split="train", eval_split="test"),
    "ultrafeedback": dict(
        source="HuggingFaceH4/ultrafeedback_binarized",
        schema="ultrafeedback",
        split="train_prefs",
        eval_split="test_prefs",
    ),
    "shp": dict(source="stanfordnlp/SHP", schema="shp", split="train", eval_split="validation"),
}
# PPO's prompts: the contexts of a preference set. UltraFeedback's train_gen split holds the same
# prompts as train_prefs.
PROMPT_DATASETS = {
    "hh": dict(DATASETS["hh"], eval_split=""),
    "ultrafeedback": dict(DATASETS["ultrafeedback"], split="train_gen", eval_split=""),
}
SFT_DATASETS = ("ultrachat",)
PREFERENCE_DATASETS = ("hh", "ultrafeedback", "shp")


def parse_arg(arg: str | None, datasets, default_dataset: str) -> tuple[str, str]:
  """ "HARDWARE[,DATASET]" -> (hardware preset, data-set name); "" = the defaults."""
  hardware, _, dataset = (arg or "").partition(",")
  hardware, dataset = hardware or DEFAULT_HARDWARE, dataset or default_dataset
  if hardware not in HARDWARE:
    raise ValueError(
        f"hardware preset {hardware!r}: choose one of {HARDWARE} "
        "(--config=experiments/FILE.py:PRESET[,DATASET])"
    )
  if dataset not in datasets:
    raise ValueError(
        f"data set {dataset!r}: choose one of {tuple(datasets)}, or give "
        "--config.data.source / schema / split"
    )
  return hardware, dataset


def real_config(
    model: str, algorithm: str, *, sizes: dict, dataset: dict
) -> ml_collections.ConfigDict:
  """A base config for `algorithm` on `model` with a preset's `sizes` (mesh, batch_size, seq_len,
  accum_steps, remat) and a `DATASETS` entry."""
  c = base_config(algorithm)
  c.hf_model_dir = MODELS[model]["hf_model_dir"]
  # bf16 compute (the MXU / tensor cores' rate), fp32 params and AdamW moments: with FSDP over
  # 8 chips a 1.24B model's params + moments are 1.24e9 x 12 B / 8 = 1.9 GB per chip, so bf16
  # params would save little, and would lose the small updates of fine-tuning (lr 1e-6 x |w| is
  # below bf16's resolution of |w| / 256).
  c.model.update(
      **MODELS[model]["arch"], dtype="bfloat16", param_dtype="float32", remat=sizes["remat"]
  )
  c.mesh.shape = sizes["mesh"]
  c.train.update(
      batch_size=sizes["batch_size"],
      seq_len=sizes["seq_len"],
      accum_steps=sizes["accum_steps"],
      log_every=10,
      eval_every=200,
      eval_batches=8,
      checkpoint_every=200,
      keep_checkpoints=2,
  )
  c.optim.update(weight_decay=0.0, grad_clip_norm=1.0, schedule="cosine", min_lr_ratio=0.1)
  c.data.update(
      source=dataset["source"],
      schema=dataset["schema"],
      split=dataset["split"],
      eval_source=dataset["source"] if dataset["eval_split"] else "",
      eval_split=dataset["eval_split"],
      tokenizer="",  # "": the checkpoint's
      prompt_overflow="truncate_left",
  )
  c.sample.update(num_examples=4, max_new_tokens=128)
  # LoRA off: full fine-tuning. LoRA on (adapters only train; no second copy of the base for the
  # reference): --config.lora.rank=16 --config.lora.targets="('q','k','v','o','gate','up','down')"
  c.lora.rank = 0
  return c


def sft_recipe(model: str, sizes: dict, arg: str | None) -> ml_collections.ConfigDict:
  """Chat SFT of `model` (a `MODELS` key) with a file's per-preset `sizes` and `get_config`'s arg:
  packed rows, ~1 epoch of ultrachat_200k (~145k packed rows of 2048 tokens / 64 per step)."""
  hardware, dataset = parse_arg(arg, SFT_DATASETS, "ultrachat")
  c = real_config(model, "sft", sizes=sizes[hardware], dataset=DATASETS[dataset])
  c.data.update(kind="sft", packing=True)
  c.train.steps = 2000
  c.optim.update(lr=2e-5, warmup_steps=60)
  # No generations before / after by default (chat records sample from their turns before the last
  # answer): --config.sample.num_examples=4 to see some.
  c.sample.num_examples = 0
  return c


def dpo_recipe(model: str, sizes: dict, arg: str | None) -> ml_collections.ConfigDict:
  """DPO of `model` on a public preference set (default UltraFeedback-binarized): ~1 epoch of its
  61k pairs, beta and lr as Zephyr / TRL's DPO recipes, reference log-probs precomputed."""
  hardware, dataset = parse_arg(arg, PREFERENCE_DATASETS, "ultrafeedback")
  c = real_config(model, "dpo", sizes=sizes[hardware], dataset=DATASETS[dataset])
  c.data.update(kind="pairwise", packing=False)
  c.train.steps = 950
  c.optim.update(lr=5e-7, warmup_steps=95)
  c.dpo.update(loss_type="sigmoid", reference="precompute")
  c.dpo.sigmoid.beta = 0.1
  c.sample.num_examples = 0
  return c
