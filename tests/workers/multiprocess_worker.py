"""One process of the multi-process test: 4 fake CPU devices, gloo collectives, one SFT train step
on a mesh spanning both processes. Prints the loss and a parameter checksum as JSON."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository: rlhf_jax and tests
from tests.helpers import xla_flags  # noqa: E402 (imports no jax)

os.environ["XLA_FLAGS"] = xla_flags(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

from rlhf_jax import sharding  # noqa: E402

assert (
    sharding.maybe_initialize_distributed()
)  # from JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
from tests.helpers.sharding import one_train_step  # noqa: E402

loss, checksum = one_train_step(tuple(int(x) for x in sys.argv[1].split(",")))
if jax.process_index() == 0:
  print(
      json.dumps(
          {
              "loss": loss,
              "checksum": checksum,
              "devices": jax.device_count(),
              "processes": jax.process_count(),
          }
      )
  )
