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
