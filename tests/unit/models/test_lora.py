"""LoRA: B = 0 is the base model bit for bit; training moves only the adapters, which alone have
optimiser state; merged params compute what the adapters compute and export to HF (checked against
transformers-PyTorch); the reference is the base; a sharded forward equals a single-device one; SFT
and DPO run end to end with LoRA from a base export.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in
tests/integration/models/test_lora.py.
"""

import pytest

from rlhf_jax.algorithms import common
from rlhf_jax.configs.base import base_config
from rlhf_jax.models import ModelConfig
from tests.helpers.preference import TINY, export_lm


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(lora_rank=4, lora_targets=("q", "x")), r"lora_targets=\('q', 'x'\).*\['x'\]"),
        (
            dict(lora_rank=4, lora_targets=("gate",), family="gpt2", num_kv_heads=None),
            "lora_targets",
        ),
        (dict(lora_rank=4, lora_targets=()), "lora_targets"),
        (dict(lora_rank=4, lora_targets=("q", "q")), "lora_targets"),
        (dict(lora_rank=-1), "lora_rank=-1"),
        (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha=0.0"),
        (
            dict(lora_rank=64, lora_targets=("k",)),
            r"lora_rank=64 exceeds .*'k': 32",
        ),  # 2 kv heads x 16
    ],
)
def test_bad_lora_configs_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**TINY, **fields})


def test_bad_lora_config_in_a_run_names_the_config_block(tmp_path):
  export_lm(tmp_path / "lm")
  config = base_config()
  config.init_from = str(tmp_path / "lm")
  config.lora.update(rank=8, targets=("q", "wq"))
  with pytest.raises(ValueError, match=r"lora_targets.*'wq'.*config\.lora"):
    common.model_config(config)
