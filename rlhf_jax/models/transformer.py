"""The decoder-only transformer (Llama family and GPT-2 family) with an LM or a scalar head.

Used functionally: `graphdef, params = split_model(model)` once; inside jitted code
`apply(graphdef, params, tokens, ...)` merges and runs it. Layers are stacked on a leading `layers`
axis and run with `lax.scan` (or unrolled, by config): the parameter layout is the same either way.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Block, Norm, attention_mask, dense, param, rope_angles

Array = jax.Array
Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class KVCache(NamedTuple):
  """Decoding state. k, v: [L, B, KV, S, D] (stacked), or tuples of L arrays [B, KV, S, D] (per
  layer: for the unrolled layers of `hidden_states(..., layers=...)`); segment_ids: [B, S]
  (0 = empty/pad slot); end: scalar int32, the number of slots written so far (the next write
  goes there)."""

  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]
  segment_ids: Array
  end: Array


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, per_layer: bool = False
) -> KVCache:
  """An empty cache of `max_len` slots; `per_layer`: k, v as tuples of per-layer arrays."""
  dtype = dtype or cfg.dtype
  if per_layer:
    shape = (batch, cfg.kv_heads, max_len, cfg.dim_per_head)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  else:
    shape = (cfg.num_layers, batch, cfg.kv_heads, max_len, cfg.dim_per_head)
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  return KVCache(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class Transformer(nnx.Module):
  """Decoder LM. `__call__(tokens [B,T], positions [B,T], segment_ids [B,T], cache=None)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = param(
        rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), std=cfg.init_std, dtype=pd
    )
    if cfg.family == "gpt2":
      self.pos_embed = param(
          rngs,
          (cfg.max_seq_len, cfg.embed_dim),
          ("positions", "embed"),
          std=cfg.init_std / 2,
          dtype=pd,
      )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"},
    )
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(cfg)
    if cfg.head == "scalar":
      self.score = param(rngs, (cfg.embed_dim,), ("embed",), std=cfg.scalar_head_init_std, dtype=pd)
    elif not cfg.tie_embeddings:
      self.lm_head = param(
          rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, dtype=pd
      )

  def hidden_states(
      self,
      tokens: Array,
      positions: Array,
      segment_ids: Array,
      cache: KVCache | None = None,
      layers: Sequence[Params] | None = None,
      branch_ids: Array | None = None,
  ) -> tuple[Array, KVCache | None]:
    """Final-norm hidden states [B, T, E] (and the updated cache).

    branch_ids: [B, T] int, rows with shared prefixes (`layers.attention_mask`); no cache.

    layers: the blocks' params split per layer (`unstack_layers`): the layers then run unrolled
    on them instead of on slices of the stacked params, and a cache must be per layer
    (`init_cache(..., per_layer=True)`); the decode loop's layout. A per-layer cache needs
    `layers`."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    # Gather from a table replicated over `vocab` (still sharded over `embed`): a gather from a
    # vocab-sharded table makes XLA rematerialise the whole table on every device.
    table = sharding.constrain(self.embed[...], (None, "embed"))
    x = jnp.take(table, tokens, axis=0).astype(dt)
    if cfg.family == "gpt2":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))

    t = tokens.shape[1]
    if cache is None:
      write_at = None
      q_slots = jnp.arange(t)
      mask = attention_mask(q_slots, segment_ids, segment_ids, branch_ids)
    else:
      if branch_ids is not None:
        raise ValueError("branch_ids (shared-prefix rows) are for forwards without a KV cache")
      write_at = cache.end
      k_segments = jax.lax.dynamic_update_slice(
          cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.end)
      )
      q_slots = cache.end + jnp.arange(t)
      mask = attention_mask(q_slots, segment_ids, k_segments)

    # Once per forward, for every layer (a table's gather without a cache: `rope_angles`).
    rope = rope_angles(cfg, positions, table=cache is None) if cfg.family == "llama" else None
    block_def, block_params = nnx.split(self.blocks)

    def layer(x, layer_params, kv, index):  # index None: kv is this layer's own cache
      block = nnx.merge(block_def, layer_params)
      return block(x, rope, mask, None if kv is None else (*kv, index), write_at)

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])

    kv = None if cache is None else (cache.k, cache.v)
    per_layer = cache is not None and isinstance(cache.k, (tuple, list))
    if per_layer != (layers is not None and cache is not None):
      raise ValueError(
          "a per-layer KV cache goes with per-layer params (`layers=`) and a stacked "
          "cache with stacked ones"
      )
    if layers is not None:
      if len(layers) != cfg.num_layers:
        raise ValueError(f"layers has {len(layers)} entries, the model {cfg.num_layers} layers")
      ks, vs = [], []
      for i, layer_params in enumerate(layers):
        x, new_kv = layer(x, layer_params, None if kv is None else (kv[0][i], kv[1][i]), None)
        if new_kv is not None:
          ks.append(new_kv[0])
          vs.append(new_kv[1])
      kv = None if kv is None else (tuple(ks), tuple(vs))
    elif cfg.scan_layers:
      # The stacked cache is a carry (updated in place), not a per-layer input/output.
      def body(carry, xs):
        x, kv = carry
        layer_params, index = xs
        return layer(x, layer_params, kv, index), None

      (x, kv), _ = jax.lax.scan(body, (x, kv), (block_params, jnp.arange(cfg.num_layers)))
    else:
      for i in range(cfg.num_layers):
        x, kv = layer(x, jax.tree.map(lambda a: a[i], block_params), kv, i)

    x = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(kv[0], kv[1], k_segments, cache.end + t)
    return x, new_cache

  def head(self, x: Array) -> Array:
    """LM logits [B, T, V] float32, or scalar scores [B, T] float32."""
    dt = jnp.dtype(self.cfg.dtype)
    if self.cfg.head == "scalar":
      return jnp.einsum("bte,e->bt", x, self.score[...].astype(dt)).astype(jnp.float32)
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = dense(x, w.astype(dt))  # one [B*T, E] x [E, V] matmul: see `dense`
    return sharding.constrain(logits, ("batch", "length", "vocab")).astype(jnp.float32)

  def __call__(
      self, tokens: Array, positions: Array, segment_ids: Array, cache: KVCache | None = None
  ) -> tuple[Array, KVCache | None]:
    """tokens, positions, segment_ids: [B, T] int (segment 0 = padding).

    Returns (logits [B, T, V] or scores [B, T], float32; the updated cache or None). Logits at
    position t predict token t+1.
    """
    x, cache = self.hidden_states(tokens, positions, segment_ids, cache)
    return self.head(x), cache


def create_model(cfg: ModelConfig, seed: int | jax.Array = 0) -> Transformer:
  key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
  if cfg.lora_rank:  # adapters draw from their own stream: the base params are the seed's
    return Transformer(cfg, rngs=nnx.Rngs(params=key, lora=jax.random.fold_in(key, 0x10A)))
  return Transformer(cfg, rngs=nnx.Rngs(params=key))


def split_model(model: Transformer) -> tuple[nnx.GraphDef, Params]:
  """(static graph definition, parameters as a plain nested dict of arrays)."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params, Params]:
  """(graphdef, abstract params [ShapeDtypeStruct], logical axes per param) without allocating."""
  model = nnx.eval_shape(lambda: create_model(cfg, 0))
  graphdef, state = nnx.split(model, nnx.Param)
  # PartitionSpec (of logical names) is a pytree leaf, unlike a plain tuple.
  axes = jax.tree.map(
      lambda v: P(*v.get_metadata()["axes"]), state, is_leaf=lambda v: isinstance(v, nnx.Variable)
  )
  shapes = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
      state,
      is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
  return graphdef, nnx.to_pure_dict(shapes), nnx.to_pure_dict(axes)


def apply(
    graphdef: nnx.GraphDef,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    cache: KVCache | None = None,
    layers: Sequence[Params] | None = None,
    branch_ids: Array | None = None,
):
  """Pure forward: see `Transformer.__call__` (and `hidden_states` for `layers`, `branch_ids`)."""
  model = nnx.merge(graphdef, params)
  x, cache = model.hidden_states(tokens, positions, segment_ids, cache, layers, branch_ids)
  return model.head(x), cache


def group_rows(x: Array, group: int, suffix_len: int) -> Array:
  """Rows in groups of `group` that share all but their last `suffix_len` columns -> one row per
  group holding the shared prefix once, then each row's suffix: [G*K, P+N, ...] -> [G, P+K*N, ...].
  """
  gk, s = x.shape[:2]
  g, p = gk // group, s - suffix_len
  x = x.reshape((g, group, s) + x.shape[2:])
  rest = x[:, :, p:].reshape((g, group * suffix_len) + x.shape[3:])
  return jnp.concatenate([x[:, 0, :p], rest], axis=1)


def ungroup_rows(y: Array, group: int, suffix_len: int) -> Array:
  """The inverse of `group_rows` (the prefix repeated in each row): [G, P+K*N, ...] ->
  [G*K, P+N, ...]."""
  g, n = y.shape[:2]
  p = n - group * suffix_len
  prefix = jnp.broadcast_to(y[:, None, :p], (g, group, p) + y.shape[2:])
  rest = y[:, p:].reshape((g, group, suffix_len) + y.shape[2:])
  return jnp.concatenate([prefix, rest], axis=2).reshape((g * group, p + suffix_len) + y.shape[2:])


def apply_shared_prefix(
    graphdef: nnx.GraphDef,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    *,
    group: int,
    suffix_len: int,
    head_from: int = 0,
) -> tuple[Array, Array]:
  """`apply_with_hidden` on rows that come in groups of `group` sharing all but their last
  `suffix_len` columns (K samples of one prompt: PPO's and GRPO's rollouts), running each group's
  prefix once: one row [prefix, suffix_1, ..., suffix_K] per group, each suffix attending to the
  prefix and itself only (`branch_ids`). tokens, positions, segment_ids: [G*K, P+N]. Returns
  (head output, final-norm hidden states [G*K, P+N, E]) in the rows' own layout, equal to what
  `apply_with_hidden` gives them, for (G*P + G*K*N) / (G*K*(P+N)) of the layers' work; the head runs
  on the rows' layout (columns `head_from`.., as `apply_with_hidden`). Callers make sure the
  prefixes are equal (they are not checked here)."""
  gk, s = tokens.shape
  if gk % group or not 0 < suffix_len < s:
    raise ValueError(
        f"apply_shared_prefix: {gk} rows of {s} columns do not split into groups of "
        f"{group} with {suffix_len}-column suffixes"
    )
  grouped = lambda x: group_rows(x, group, suffix_len)
  branch = jnp.concatenate(
      [
          jnp.zeros((s - suffix_len,), jnp.int32),
          jnp.repeat(jnp.arange(1, group + 1, dtype=jnp.int32), suffix_len),
      ]
  )
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden_states(
      grouped(tokens),
      grouped(positions),
      grouped(segment_ids),
      branch_ids=jnp.broadcast_to(branch, (gk // group, branch.size)),
  )
  hidden = ungroup_rows(hidden, group, suffix_len)
  return model.head(hidden[:, head_from:]), hidden


def apply_rows(
    graphdef: nnx.GraphDef,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    share: tuple[int, int] | None = None,
    *,
    head_from: int = 0,
) -> tuple[Array, Array]:
  """(head output on columns `head_from`.., final-norm hidden states [B, S, E]) of [B, S] rows:
  `apply_with_hidden`, or with share = (group, suffix_len) `apply_shared_prefix` (each group's
  common prefix run once)."""
  if share is None:
    return apply_with_hidden(graphdef, params, tokens, positions, segment_ids, head_from=head_from)
  return apply_shared_prefix(
      graphdef,
      params,
      tokens,
      positions,
      segment_ids,
      group=share[0],
      suffix_len=share[1],
      head_from=head_from,
  )


def apply_at(
    graphdef: nnx.GraphDef,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    index: Array,
    branch_ids: Array | None = None,
) -> Array:
  """The head's output at the slots `index` [B, M] only: [B, M, V] logits (or [B, M] scores).
  The layers run on every slot; the head (for an LM: the vocabulary projection, and whatever the
  caller does with the logits) only on the M slots gathered."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden_states(tokens, positions, segment_ids, branch_ids=branch_ids)
  picked = jnp.take_along_axis(hidden, index[..., None].astype(jnp.int32), axis=1)
  return model.head(sharding.constrain(picked, ("batch", "length", "act_embed")))


def unstack_layers(params: Params) -> list[Params]:
  """The blocks' stacked params [L, ...] as L per-layer trees.

  For loops that run the model many times on the same weights (the decode loop): the layer scan
  slices each layer's weights out of the stacked arrays at every step, and XLA (CPU and GPU)
  materialises those slices, so every decoding step reads each weight three times instead of once.
  Slicing once, before the loop, costs one copy of the block weights for the loop's duration.
  """
  blocks = params["blocks"]
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(num_layers)]


def apply_with_hidden(
    graphdef: nnx.GraphDef,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    *,
    head_from: int = 0,
) -> tuple[Array, Array]:
  """One forward pass -> (head output as `apply` on columns `head_from`.. [B, T - head_from, ...],
  final-norm hidden states [B, T, E]): for a second head on the same trunk (PPO's value head on
  the policy), or an LM head on only the columns whose logits are used (a rollout's response:
  the vocabulary projection and log-softmax are ~10% of a small model's work per column)."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden_states(tokens, positions, segment_ids)
  return model.head(hidden[:, head_from:]), hidden


def positions_from_mask(mask: Array) -> Array:
  """Positions [B, T] for a left- or right-padded batch: count of real tokens before t."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask
