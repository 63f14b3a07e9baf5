"""One training process of the kill-anywhere test (tests/integration/train/test_reliability.py):
runs a driver on a tiny config of tests/workers/reliability_configs.py, as `python -m rlhf_jax.run`
would, so the test can SIGKILL it at any point and run it again.

  python tests/workers/kill_worker.py ALGORITHM WORKDIR [KILL_AFTER_SAVES]

KILL_AFTER_SAVES = N > 0: the process SIGKILLs itself right after its N-th checkpoint save has been
handed to orbax's background thread, i.e. while that asynchronous save is being written.
Input paths come from the JSON file named by RELIABILITY_INPUTS (see reliability_configs)."""

import json
import logging
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository: rlhf_jax and tests
from tests.helpers import xla_flags  # noqa: E402 (imports no jax)

os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

from rlhf_jax import run  # noqa: E402
from rlhf_jax.train import checkpoint  # noqa: E402
from tests.workers.reliability_configs import get_config  # noqa: E402

logging.basicConfig(level=logging.WARNING)
logging.getLogger("rlhf_jax").setLevel(logging.INFO)  # "resumed from step N", as the CLI shows
algorithm, workdir = sys.argv[1], sys.argv[2]
kill_after = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if kill_after:
  save, saves = checkpoint.Checkpointer.save, []

  def save_then_die(self, *args, **kwargs):
    saved = save(self, *args, **kwargs)
    if saved:
      saves.append(args[0])
      if len(saves) == kill_after:  # orbax is writing this step in its background thread now
        print(json.dumps({"killed_in_save": int(args[0])}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return saved

  checkpoint.Checkpointer.save = save_then_die
config = get_config(algorithm)
result = run.resolve_driver(config.algorithm)(config, workdir)
print(json.dumps({"final": result}, default=float), flush=True)
