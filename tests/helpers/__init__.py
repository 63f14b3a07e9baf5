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
  LLVM's backend at -O1, and XLA's older elemental emitters instead of its MLIR fusion emitters.
  The tests' programs are tiny and most of their time is XLA's compiler (60-75% of a driver
  test). Measured on the whole suite (2-core VM, alone, one run each, same day; sum of the tests'
  own times / wall): defaults at -O1 1,647 s / 850 s; elemental emitters at -O1 1,233 s / 647 s;
  the same at -O0 932 s / 493 s, but at -O0 a worker aborted (no message) in the tiny judge's
  200-step training in 2 of 3 whole-suite runs, never alone, so -O0 is not used. The numbers are
  the same under each (no fast-math). Benchmarks never run under these flags."""
  return (
      f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1 "
      "--xla_cpu_use_fusion_emitters=false"
  )
