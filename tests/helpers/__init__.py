"""Plain helpers shared by test modules: tiny configs, data and export builders, reference
computations. No tests, and no fixtures: fixtures used by several test modules live in
tests/conftest.py; a fixture that both halves of a module split into tests/unit/ and
tests/integration/ use is a thin wrapper in each around a `build_*` function here. A test module
never imports another test module, only these.

One module per area, named after what it serves, e.g. `tests.helpers.ppo` (the PPO-family drivers'
tiny models, rollouts and configs) or `tests.helpers.preference` (reward-model / DPO / KTO data and
configs); `tests.helpers.compile_cache` is JAX's persistent compilation cache for tests.
"""

import os
from pathlib import Path

# The repository's root (tests/helpers/__init__.py is three levels down).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT_PATH = Path(ROOT)


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process (tests/conftest.py and every worker): `devices` fake CPU devices,
  and LLVM's backend at -O1. The tests' programs are tiny and much of their time is XLA's compiler:
  against the default -O2, a 6-step SFT run took 27 s -> 22 s and a 150-step one 34 s -> 28 s
  (2-core VM, one run each); -O0 compiles a little faster still but runs the steps ~2x slower
  (19 s and 35 s). The numbers are the same at any level (no fast-math). Benchmarks never run
  under it."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1"
