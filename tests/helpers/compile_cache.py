"""JAX's persistent compilation cache for tests that compile the same programs more than once."""

import contextlib

import jax


@contextlib.contextmanager
def persistent_compilation_cache(directory):
  """JAX's persistent compilation cache in `directory` (every program, however fast it
  compiled) while the block runs; the previous settings after it. Worker processes started with
  JAX_COMPILATION_CACHE_DIR=directory then load what this process compiled."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    cc.reset_cache()
