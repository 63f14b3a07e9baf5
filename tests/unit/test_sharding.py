"""One train step gives the same loss, gradients and update on every mesh layout.

The end-to-end tests (marked slow, or over ~5 s on CPU) are in tests/integration/test_sharding.py.
"""

import jax
import pytest

from rlhf_jax import sharding
from tests.helpers.sharding import CFG, _setup


def test_params_are_sharded_as_the_rules_say():
  mesh, _, psh, _, shardings, state = _setup((1, 2, 4))
  q = state.params["blocks"]["attn"]["q"]  # [layers, embed, heads, head_dim]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 8)
  mu = state.opt_state[1][0].trace["blocks"]["attn"]["q"]
  assert mu.sharding.spec == q.sharding.spec  # optimiser moments follow their parameter


def test_bad_mesh_messages():
  with pytest.raises(sharding.ShardingConfigError, match="data \\* fsdp \\* tensor = 8"):
    sharding.make_mesh((3, 1, 1))
  with pytest.raises(sharding.ShardingConfigError, match="does not divide the 8 devices"):
    sharding.make_mesh((-1, 3, 1))
  mesh = sharding.make_mesh((1, 1, 8))
  with pytest.raises(sharding.ShardingConfigError, match="num_kv_heads = 4"):
    sharding.validate_model_mesh(CFG, mesh)
  with pytest.raises(sharding.ShardingConfigError, match="multiple of 8"):
    sharding.check_batch_size(12, sharding.make_mesh((8, 1, 1)))


def test_logical_rules_never_repeat_a_mesh_axis():
  spec = sharding.logical_to_spec(("batch", "embed"))  # embed -> fsdp, already used by batch
  assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
