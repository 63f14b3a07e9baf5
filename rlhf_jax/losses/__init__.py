"""Pure loss functions: arrays in, `(loss, metrics)` out."""

# Registers the built-in pair losses (losses/registry.py) whenever any loss module is imported.
from rlhf_jax.losses import preference  # noqa: F401
