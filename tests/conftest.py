"""Test harness: 8 fake CPU devices so every sharding path runs without accelerators."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.compile_cache import persistent_compilation_cache  # noqa: E402

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
  from tests.test_reward_model import WORDS

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


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (run by CI; skip with -m 'not slow')")
