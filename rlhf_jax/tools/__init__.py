"""Command-line tools: the memory planner (`python -m rlhf_jax.tools.plan`)."""
