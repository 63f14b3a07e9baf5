"""Train state, optimiser, and the one train-step factory."""

from rlhf_jax.train.optim import (
    NonFiniteError,
    check_nonfinite,
    make_optimizer,
    make_schedule,
    nonfinite_counts,
)
from rlhf_jax.train.state import TrainState, create_train_state, state_shardings
from rlhf_jax.train.step import (
    accumulate_gradients,
    make_eval_step,
    make_train_step,
    make_update,
    train_compiler_options,
)

__all__ = [
    "NonFiniteError",
    "check_nonfinite",
    "nonfinite_counts",
    "make_optimizer",
    "make_schedule",
    "TrainState",
    "create_train_state",
    "state_shardings",
    "accumulate_gradients",
    "make_eval_step",
    "make_train_step",
    "make_update",
    "train_compiler_options",
]
