"""The embedded toy world: seeded tasks with gold helpfulness and safety scores (see world.py);
the default behaviour world's axes in behaviours.py, its gates in gates.py.

`instructions` is the older exact-match suite that the SFT driver still uses; the toy world
(`World`, gold scores, constraints, perturbations, corpora) supersedes it.
"""

from rlhf_jax.toyworld.constraints import (
    check_constraints,
    observed_constraints,
    render_constraints,
    satisfied_constraints,
)
from rlhf_jax.toyworld.corpora import pretraining_documents, sft_records, tokenizer_texts
from rlhf_jax.toyworld.families import TASK_FAMILIES
from rlhf_jax.toyworld.instructions import (
    FAMILIES,
    corpus_texts,
    generate_sft_records,
    register_family,
    score,
)
from rlhf_jax.toyworld.perturb import candidates, labelled_candidates, perturbations
from rlhf_jax.toyworld.world import (
    World,
    gold_helpfulness,
    gold_safety,
    gold_scores,
    is_hedged,
    is_refusal,
    split_of,
)

__all__ = [
    "World",
    "TASK_FAMILIES",
    "gold_helpfulness",
    "gold_safety",
    "gold_scores",
    "is_refusal",
    "is_hedged",
    "split_of",
    "check_constraints",
    "satisfied_constraints",
    "observed_constraints",
    "render_constraints",
    "candidates",
    "labelled_candidates",
    "perturbations",
    "pretraining_documents",
    "sft_records",
    "tokenizer_texts",
    # the older exact-match suite (rlhf_jax/algorithms/sft.py, tests/unit/data/test_data.py)
    "FAMILIES",
    "corpus_texts",
    "generate_sft_records",
    "register_family",
    "score",
]
