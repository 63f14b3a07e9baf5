"""rlhf_jax: aligning language models with human and AI feedback, in JAX/Flax."""

from setuptools import find_packages, setup

# Lower bounds are the versions the test suite runs with (see constraints.txt).
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "ml_collections>=1.1.0",
    "absl-py>=2.5.1",
    "numpy>=2.4",
    "scipy>=1.17.1",  # Kendall tau for reward-model evaluation
    "transformers>=5.24.0",
    "tokenizers>=0.23.3",
    "datasets>=5.2.0",
    "safetensors>=0.8.0",
    "jinja2>=3.1.6",  # chat templates in transformers
    "tqdm>=4.70.1",
    "tensorboardX>=2.6.5",
    "matplotlib>=3.11.2",  # plots written to workdirs (PPO gold vs KL)
]

EXTRAS_REQUIRE = {
    # nbclient + ipykernel: a test executes notebooks/compare_alignment_methods.ipynb.
    # torch: the reference for HF checkpoint parity (tests/integration/hf/test_checkpoints.py); never imported by rlhf_jax.
    # trl (+ accelerate, ~1.5 MB, seconds): tests/integration/bench/test_suite.py runs `bench --compare` at a tiny size.
    "test": ["pytest>=9.2.0", "pytest-xdist>=3.8.0", "nbclient>=0.11.0", "nbformat>=5.11.1",
             "ipykernel>=7.4.0", "torch==2.13.0", "trl>=1.16.0",
             # `make lint` (part of `make test`): the formatter and the linter, configured in pyproject.toml.
             "pyink>=26.5.1", "ruff>=0.17.6"],
    # `python -m rlhf_jax.bench --compare`: HF generate and TRL's DPO / GRPO trainers beside ours
    # (rlhf_jax/bench/compare.py). torch exactly 2.13.0: another version pulls GBs of CUDA wheels.
    "compare": ["torch==2.13.0", "transformers>=5.24.0", "trl>=1.16.0"],
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "notebooks": ["jupyter", "nbconvert"],
}

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="RLHF and its alternatives (SFT, reward models, PPO, DPO family, ...) in JAX/Flax.",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
