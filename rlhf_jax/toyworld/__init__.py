"""The embedded toy world: procedurally generated tasks with exact answers (more to come)."""

from rlhf_jax.toyworld.instructions import (
    FAMILIES,
    corpus_texts,
    generate_sft_records,
    register_family,
    score,
)

__all__ = ["FAMILIES", "corpus_texts", "generate_sft_records", "register_family", "score"]
