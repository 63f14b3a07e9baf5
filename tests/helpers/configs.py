"""The tiny run configs the driver tests share: the 2 x 2 x 2 mesh (data, fsdp and tensor all
exercised on the 8 fake devices), a short warm-up, evaluation once at the end, and the packed
pairwise data of the preference tests."""

from rlhf_jax.configs.base import base_config

# A 2-layer, width-64 model for the runs that train from scratch (SFT).
TINY_MODEL = dict(
    vocab_size=0,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    max_seq_len=64,
)


def run_config(
    algorithm: str = "sft",
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    log_every: int,
    checkpoint_every: int,
    async_checkpoint: bool,
    warmup_steps: int,
    eval_batches: int = 1,
    lr: float = 3e-3,
):
  """base_config() (every method's block) for `algorithm` on the 2 x 2 x 2 mesh, trained `steps`
  steps and evaluated at the end."""
  c = base_config()
  c.algorithm = algorithm
  c.model.vocab_size = 0  # the tokenizer's
  c.mesh.shape = (2, 2, 2)
  c.optim.update(lr=lr, warmup_steps=warmup_steps)
  c.train.update(
      steps=steps,
      batch_size=batch_size,
      seq_len=seq_len,
      log_every=log_every,
      eval_every=steps,
      eval_batches=eval_batches,
      checkpoint_every=checkpoint_every,
      async_checkpoint=async_checkpoint,
  )
  return c


def pairwise_data(c, source: str, tokenizer: str, kind: str = "pairwise"):
  """Preference records from `source` (a quarter held out), packed, over-long prompts skipped."""
  c.data.update(
      kind=kind,
      source=source,
      tokenizer=tokenizer,
      eval_fraction=0.25,
      packing=True,
      prompt_overflow="skip",
  )
  return c
