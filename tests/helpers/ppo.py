"""The PPO-family driver tests' tiny models, fake rollouts and configs (PPO, GRPO / RLOO, ReST,
rejection sampling, LoRA): tests/{unit,integration}/algorithms/test_{ppo,grpo,rest}.py and
tests/{unit,integration}/models/test_lora.py. Their fixtures (`tasks`, `tokenizer_dir`, `tokenizer`,
`models`, `exports`) are in tests/conftest.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import generate, sharding
from rlhf_jax.algorithms import ppo
from rlhf_jax.configs.base import base_config
from rlhf_jax.models import ModelConfig, abstract_model, create_model, split_model
from rlhf_jax.train import checkpoint, create_train_state, state_shardings

TINY = dict(
    vocab_size=384,
    num_layers=2,
    embed_dim=64,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=128,
    max_seq_len=128,
)
MAX_PROMPT_LEN = 96  # the longest toy task prompt is ~80 tokens with this tokenizer


def masked_mean(x, mask):
  mask = np.asarray(mask, bool)
  return np.asarray(x, np.float64)[mask].mean()


# ---------------------------------------------------------------- models and rollouts


_INIT_FNS = {}  # config -> jitted init (the key traced: one compilation per config)


def init_params(cfg, seed):
  if cfg not in _INIT_FNS:
    _INIT_FNS[cfg] = jax.jit(lambda key: split_model(create_model(cfg, key))[1])
  graphdef, _, _ = abstract_model(cfg)
  return graphdef, _INIT_FNS[cfg](jax.random.key(seed))  # = create_model(cfg, seed)


POLICY_CFG = ModelConfig(**TINY)
VALUE_CFG = ModelConfig(**TINY, head="scalar", scalar_head_init_std=1.0)  # O(1) values


def fake_rollout(seed=0, rows=8, prompt_len=8, new_tokens=8):
  """A batch as the driver builds it (generate.full_sequence): prompts of 1..P tokens left-padded,
  responses of 1..N tokens right-padded, so padding sits at both ends of every row."""
  rs = np.random.RandomState(seed)
  prompt_lens = rs.randint(1, prompt_len + 1, rows)
  lengths = rs.randint(1, new_tokens + 1, rows)
  lengths[0], lengths[1] = 1, new_tokens  # the extremes
  prompt_mask = np.arange(prompt_len)[None] >= (prompt_len - prompt_lens)[:, None]
  prompt_tokens = np.where(prompt_mask, rs.randint(3, 384, (rows, prompt_len)), 0).astype(np.int32)
  mask = np.arange(new_tokens)[None] < lengths[:, None]
  tokens = np.where(mask, rs.randint(3, 384, (rows, new_tokens)), 0).astype(np.int32)
  out = generate.GenerateOutput(
      tokens=jnp.asarray(tokens),
      logprobs=jnp.zeros(tokens.shape),
      mask=jnp.asarray(mask),
      lengths=jnp.asarray(lengths, jnp.int32),
  )
  tokens, segment_ids, positions, response_mask = generate.full_sequence(
      prompt_tokens, prompt_mask, out
  )
  return {
      "tokens": tokens,
      "segment_ids": segment_ids,
      "positions": positions,
      "response_mask": response_mask,
  }


def ppo_cfg(**overrides):
  cfg = base_config().ppo
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------- prompts


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


# ---------------------------------------------------------------- driver


def export_model(path, tokenizer_dir, *, head="lm", seed=0, stats=None):
  """A random model exported as the drivers export theirs (a scalar head = a reward model)."""
  cfg = POLICY_CFG if head == "lm" else VALUE_CFG
  _, params = init_params(cfg, seed)
  metadata = {"model": cfg.to_dict(), "tokenizer": str(tokenizer_dir)}
  if head == "scalar":
    metadata["reward"] = {"stats": stats or {"mean": 0.0, "std": 1.0, "n": 1}}
  checkpoint.export_params(path, jax.device_get(params), metadata=metadata)
  return str(path)


# Not (2, 2, 2): there, on the 8 fake CPU devices, XLA deadlocks in the PPO update (2 epochs x 2
# mini-batches of 4 rows of 104 tokens): devices wait in different collectives of one program until
# the rendezvous times out and the process aborts. (4, 1, 2) still shards the batch and the heads.
DRIVER_MESH = (4, 1, 2)


def base_driver_config(algorithm, exports, tokenizer_dir):
  """What every driver test starts from: the tiny LM export, the toy prompts, the driver mesh."""
  c = base_config()
  c.algorithm = algorithm
  c.init_from = exports["lm"]
  c.model.vocab_size = 0
  c.mesh.shape = DRIVER_MESH
  c.optim.update(lr=1e-3, warmup_steps=1)
  c.data.update(source=exports["prompts"], tokenizer=str(tokenizer_dir))
  return c


def driver_config(exports, tokenizer_dir, iterations=3):
  c = base_driver_config("ppo", exports, tokenizer_dir)
  c.train.update(checkpoint_every=1, async_checkpoint=False)
  c.ppo.update(
      iterations=iterations,
      prompts_per_iteration=8,
      minibatches=2,
      epochs=2,
      max_new_tokens=8,
      max_prompt_len=MAX_PROMPT_LEN,
      value_init_from=exports["helpful"],
  )
  c.ppo.reward.helpful = exports["helpful"]
  return c


def rejection_sampling_config(exports, tokenizer_dir, rounds=2):
  c = base_driver_config("rejection_sampling", exports, tokenizer_dir)
  c.data.packing = True
  c.train.update(
      steps=2,
      batch_size=8,
      seq_len=TINY["max_seq_len"],
      checkpoint_every=2,
      eval_every=2,
      eval_batches=1,
      log_every=1,
      async_checkpoint=False,
  )
  c.sample.num_examples = 0
  c.rejection_sampling.update(
      rounds=rounds,
      temperatures=(1.0,) * rounds,
      prompts_per_round=8,
      samples_per_prompt=3,
      max_new_tokens=8,
      max_prompt_len=MAX_PROMPT_LEN,
      batch_prompts=8,
  )
  c.rejection_sampling.reward.helpful = exports["helpful"]
  return c


# ---------------------------------------------------------------- GRPO / RLOO (no critic)


def critic_free_loop(models, cfg, optimizer, estimator):
  """(iterate, fresh_state, shardings, mesh): `ppo.make_iteration` without a critic on one device
  for the tiny policy; fresh_state() is a new train state from the fixture's params."""
  policy_gd, _, params = models
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, abstract, axes = abstract_model(POLICY_CFG)
  psh = {"policy": sharding.param_shardings(abstract, axes, mesh)}
  shardings = state_shardings(optimizer, psh, {"policy": abstract}, mesh)
  fresh_state = lambda: create_train_state(
      {"policy": jax.tree.map(jnp.copy, params["policy"])}, optimizer, shardings, seed=0
  )
  iterate = ppo.make_iteration(
      policy_gd,
      None,
      {},
      POLICY_CFG,
      None,
      optimizer,
      mesh=mesh,
      policy_shardings=psh["policy"],
      shardings=shardings,
      cfg=cfg,
      eos_id=-1,
      pad_id=0,
      estimator=estimator,
  )
  return iterate, fresh_state, shardings, mesh


def group_config(exports, tokenizer_dir, algorithm, iterations=2):
  c = driver_config(exports, tokenizer_dir, iterations=iterations)
  c.algorithm = algorithm
  c.ppo.update(prompts_per_iteration=4, samples_per_prompt=2, value_init_from="")
  c.ppo.kl.beta = 0.04
  return c
