"""Test harness: 8 fake CPU devices so every sharding path runs without accelerators, and the
fixtures shared by several test modules (the modules import plain helpers from tests/helpers/, never
fixtures and never another test module)."""

import os

from tests.helpers import xla_flags  # noqa: E402 (plain constants: imports no jax)

# Must happen before jax is imported anywhere; worker processes inherit them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.helpers.compile_cache import persistent_compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module, for tests that run the same programs
  several times (a driver run, its resumed rerun, the next round): each compiles once. Not
  suite-wide: there it saved ~1% of the suite's time (most programs compile once) and added a
  disk write for every compile."""
  with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")):
    yield


@pytest.fixture(scope="session")
def words_tokenizer_dir(tmp_path_factory):
  """A small BPE tokenizer on toy-world SFT text plus the preference tests' words (WORDS,
  "great", "awful"): shared by the reward-model and DPO tests."""
  from rlhf_jax.data import train_tokenizer
  from rlhf_jax.toyworld import corpus_texts, generate_sft_records
  from tests.helpers.preference import WORDS

  out_dir = tmp_path_factory.mktemp("words_tok")
  texts = (
      corpus_texts(generate_sft_records(200, seed=0)) + [" ".join(WORDS + ["great", "awful"])] * 5
  )
  train_tokenizer(texts, 384, out_dir)
  return out_dir


@pytest.fixture(scope="session")
def words_tokenizer(words_tokenizer_dir):
  from rlhf_jax.data import load_tokenizer

  return load_tokenizer(words_tokenizer_dir)


# ---------------------------------------------------------------- the PPO-family drivers' inputs
# Used by the PPO, GRPO / RLOO, ReST, rejection-sampling and LoRA tests (tests.helpers.ppo has
# their tiny models and configs). Module-scoped: each test module builds its own.


@pytest.fixture(scope="module")
def tasks():
  from rlhf_jax.toyworld import world as world_lib

  return world_lib.World(0).tasks(16, seed=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tasks):
  from rlhf_jax.data import train_tokenizer
  from rlhf_jax.toyworld import corpus_texts, generate_sft_records

  out_dir = tmp_path_factory.mktemp("tok")
  texts = corpus_texts(generate_sft_records(200, seed=0)) + [t["prompt"] for t in tasks]
  train_tokenizer(texts, 384, out_dir)
  return out_dir


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  from rlhf_jax.data import load_tokenizer

  return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def models():
  """(policy graphdef, value graphdef, {"policy": LM params, "value": scalar-head params})."""
  from tests.helpers.ppo import POLICY_CFG, VALUE_CFG, init_params

  policy_gd, policy = init_params(POLICY_CFG, 0)
  value_gd, value = init_params(VALUE_CFG, 1)
  return policy_gd, value_gd, jax.device_get({"policy": policy, "value": value})


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir, tasks):
  from tests.helpers.ppo import export_model, write_jsonl

  root = tmp_path_factory.mktemp("exports")
  return {
      "lm": export_model(root / "lm", tokenizer_dir, seed=3),
      "helpful": export_model(
          root / "helpful",
          tokenizer_dir,
          head="scalar",
          seed=4,
          stats={"mean": 0.2, "std": 1.5, "n": 8},
      ),
      "safety": export_model(root / "safety", tokenizer_dir, head="scalar", seed=5),
      "prompts": write_jsonl(root / "prompts.jsonl", tasks),
  }  # toy tasks: gold metrics


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (run by CI; skip with -m 'not slow')")
