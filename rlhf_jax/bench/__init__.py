"""Throughput benchmarks (`suite`), the same workloads in HF transformers / TRL (`compare`), and
the command line: `python -m rlhf_jax.bench` (`__main__`)."""
