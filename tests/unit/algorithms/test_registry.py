"""The algorithm registry (rlhf_jax/algorithms/registry.py): every driver declared once; lookups and
their errors; the method blocks each algorithm's config holds; flat pipeline stages."""

import ml_collections
import pytest

from rlhf_jax import run
from rlhf_jax.algorithms import registry
from rlhf_jax.configs.base import METHOD_BLOCKS, base_config, driver_config, flat_stage
from rlhf_jax.errors import ConfigError

BUILTIN = {
    "sft",
    "pretrain",
    "reward",
    "dpo",
    "kto",
    "ppo",
    "grpo",
    "rloo",
    "rejection_sampling",
    "rest",
    "hir",
    "constitutional_sl",
    "pipeline",
}


def test_every_builtin_driver_is_registered_with_its_role():
  algorithms = registry.algorithms()
  assert BUILTIN <= set(algorithms)
  assert registry.policy_algorithms() == tuple(sorted(BUILTIN - {"reward", "pipeline"}))
  assert algorithms["pretrain"].data_kind == "text" and algorithms["sft"].data_kind is None
  assert algorithms["ppo"].train is algorithms["grpo"].train is algorithms["rloo"].train
  assert not algorithms["pipeline"].pipeline_stage
  for name, entry in algorithms.items():
    assert set(entry.blocks) <= set(METHOD_BLOCKS), name
    if name == "pipeline":
      continue
    config = base_config(name)
    for field in entry.stage_fields + entry.data_fields:  # each names a string field of its config
      assert isinstance(registry.get_field(config, field), str), (name, field)


def test_an_unknown_algorithm_names_the_closest_and_the_known_ones():
  with pytest.raises(ConfigError, match=r"'dpoo' is not known \(did you mean 'dpo'\?\).*kto"):
    registry.get("dpoo")
  with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
    registry.get("no_such_module:train")
  assert registry.get("rlhf_jax.algorithms.dpo:dpo") is registry.get("dpo")
  assert run.resolve_driver("sft") is registry.get("sft").train


def test_a_name_registered_twice_by_two_functions_is_an_error():
  @registry.register("test_registry_twice", policy=False)
  def train(config, workdir):
    return {}

  try:
    registry.register("test_registry_twice", policy=False)(train)  # the same function: fine
    with pytest.raises(ValueError, match="registered twice"):
      registry.register("test_registry_twice", policy=False)(lambda config, workdir: {})
  finally:
    registry.unregister("test_registry_twice")
  assert "test_registry_twice" not in registry.algorithms()


def test_a_config_holds_the_method_blocks_its_algorithm_reads_only():
  assert set(METHOD_BLOCKS) <= set(base_config())  # no algorithm: every block
  dpo = base_config("dpo")
  assert dpo.algorithm == "dpo" and {"dpo", "reward"} <= set(dpo)
  assert not {"ppo", "kto", "hir", "rest", "rejection_sampling", "constitutional"} & set(dpo)
  assert not set(METHOD_BLOCKS) & set(base_config("sft"))
  assert set(METHOD_BLOCKS) & set(base_config("grpo")) == {"ppo"}


@pytest.mark.parametrize("algorithm", sorted(BUILTIN - {"pipeline"}))
def test_a_flat_stage_holds_its_own_block_at_the_top_and_round_trips(algorithm):
  config = base_config(algorithm)
  stage = flat_stage(config)
  block = registry.get(algorithm).own_block
  if block is not None:
    assert block not in stage and set(config[block]) <= set(stage)
  assert driver_config(stage, "s").to_dict() == config.to_dict()


def test_a_stray_stage_field_is_an_error_naming_the_stage():
  stage = flat_stage(base_config("kto"))
  stage.bta = 0.3
  with pytest.raises(ConfigError, match=r"config.my_kto.bta is not a field of a 'kto' stage.*beta"):
    driver_config(stage, "my_kto")


@pytest.mark.parametrize(
    "key, moved",
    [
        ("dpo.dpo.reference", "dpo.reference"),  # a pipeline stage's block, nested
        ("ppo.ppo.kl.beta", "ppo.kl.beta"),
        ("dpo.beta", "dpo.sigmoid.beta (DPO's; ipo.beta for IPO, hinge.beta for hinge)"),
        ("dpo.dpo.cpl_alpha", "dpo.cpl.alpha"),  # both at once
        ("dpo.sigmoid.bta", None),  # a typo: the runner lists the close keys instead
        ("ppo.beta", None),
    ],
)
def test_old_override_spellings_name_the_new_ones(key, moved):
  pipeline = ml_collections.ConfigDict(
      {"dpo": flat_stage(base_config("dpo")), "ppo": flat_stage(base_config("ppo"))}
  )
  valid = run.flat_keys(pipeline)
  assert run.moved_key(key, valid) == moved
