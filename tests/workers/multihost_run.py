"""One process of the multi-host driver test: 4 fake CPU devices, gloo collectives, a mesh spanning
both processes (2, 2, 2). Runs the SFT or DPO driver (`argv[1]`) into `argv[2]`, stopping after
`argv[3]` steps (0 = run to the end), as `python -m rlhf_jax.run` would on each host of a slice.
Extra arguments: the DPO test's tokenizer dir, pairs file and initial LM export."""

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
)  # JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
from tests.workers.multihost_configs import dpo_config, sft_config  # noqa: E402

kind, workdir, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "sft":
  from rlhf_jax.algorithms import sft

  config, driver = sft_config(), sft.train
else:
  from rlhf_jax.algorithms import dpo

  config, driver = dpo_config(*sys.argv[4:7]), dpo.train
config.train.stop_after_steps = stop
result = driver(config, workdir)
if jax.process_index() == 0:
  print(
      json.dumps(
          {
              "step": int(result["step"]),
              "devices": jax.device_count(),
              "processes": jax.process_count(),
          }
      )
  )
