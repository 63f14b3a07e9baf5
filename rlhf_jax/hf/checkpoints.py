"""Hugging Face checkpoints <-> our params: `config.json` + safetensors, nothing else.

Supported: Llama, Qwen2, Mistral (our family "llama"; Qwen2 = llama + q/k/v biases) and GPT-2, as
`...ForCausalLM` / `GPT2LMHeadModel` (head "lm") or `...ForSequenceClassification` with one label
(head "scalar": a reward or value model). Weights are read from safetensors only: PyTorch `.bin`
files are pickles, which can run code when loaded, so they are refused; so is `trust_remote_code`.

`load_hf` creates every parameter directly in its target sharding: each device's shard is read from
the safetensors file (`get_slice`, memory-mapped) by a `jax.make_array_from_callback` callback, so no
host ever materialises a whole sharded model. HF tensors map onto our stacked layout by a reshape
and a transpose (`_Layout`): q_proj [H*D, E] -> q [E, H, D]; GPT-2's fused Conv1D c_attn [E, 3*H*D]
-> q, k, v [E, H, D]; our layers are stacked on a leading axis, HF's are named `layers.{i}`.
`export_hf` writes the inverse, atomically; load -> export -> load is bit-exact.

The config.json mapping lives in `rlhf_jax.hf.config` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 -- registers bfloat16 with numpy: safetensors can then read bf16
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax import sharding
from rlhf_jax.data import files as file_io
from rlhf_jax.errors import ConfigError, ConfigPathError
from rlhf_jax.hf.config import ARCHITECTURES, config_from_hf, config_to_hf
from rlhf_jax.models import ModelConfig, abstract_model, lora

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "import_hf",
    "load_hf",
    "load_hf_tokenizer",
    "read_hf_config",
]

# Buffers some checkpoints carry that are not parameters (recomputed by every implementation).
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|(^|\.)attn\.(bias|masked_bias))$")


# --- tensor layouts -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one of our params (per layer) comes from an HF tensor.

  The HF tensor, each dim d reshaped to `split[d]`, indexed at `select` ((split dim, index) pairs,
  those dims dropped) and transposed by `perm` is our per-layer array. Stacked params read
  `name.format(i=layer)` for every layer.
  """

  path: tuple[str, ...]
  name: str
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  select: tuple[tuple[int, int], ...] = ()

  @property
  def stacked(self) -> bool:
    return self.path[0] == "blocks"

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.split)


def _layouts(cfg: ModelConfig, prefix: str) -> list[_Layout]:
  """Every parameter of `cfg`'s model and where it lives in an HF checkpoint."""
  e, h, kv, d, m, v = (
      cfg.embed_dim,
      cfg.num_heads,
      cfg.kv_heads,
      cfg.dim_per_head,
      cfg.mlp_dim,
      cfg.vocab_size,
  )
  L = lambda path, name, split, perm, select=(): _Layout(
      tuple(path.split(".")), name, split, perm, select
  )
  vec = lambda path, name, n: L(path, name, ((n,),), (0,))
  if cfg.family == "gpt2":
    p = prefix + "h.{i}."
    out = [
        L("embed", prefix + "wte.weight", ((v,), (e,)), (0, 1)),
        L("pos_embed", prefix + "wpe.weight", ((cfg.max_seq_len,), (e,)), (0, 1)),
    ]
    for norm, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out += [
          vec(f"blocks.{norm}.scale", p + hf + ".weight", e),
          vec(f"blocks.{norm}.bias", p + hf + ".bias", e),
      ]
    for part, name in enumerate("qkv"):  # Conv1D [in, out]; out = (q | k | v), each [H, D]
      out += [
          L(
              f"blocks.attn.{name}",
              p + "attn.c_attn.weight",
              ((e,), (3, h, d)),
              (0, 1, 2),
              ((1, part),),
          ),
          L(f"blocks.attn.{name}_bias", p + "attn.c_attn.bias", ((3, h, d),), (0, 1), ((0, part),)),
      ]
    out += [
        L("blocks.attn.o", p + "attn.c_proj.weight", ((h, d), (e,)), (0, 1, 2)),
        vec("blocks.attn.o_bias", p + "attn.c_proj.bias", e),
        L("blocks.mlp.up", p + "mlp.c_fc.weight", ((e,), (m,)), (0, 1)),
        vec("blocks.mlp.up_bias", p + "mlp.c_fc.bias", m),
        L("blocks.mlp.down", p + "mlp.c_proj.weight", ((m,), (e,)), (0, 1)),
        vec("blocks.mlp.down_bias", p + "mlp.c_proj.bias", e),
        vec("final_norm.scale", prefix + "ln_f.weight", e),
        vec("final_norm.bias", prefix + "ln_f.bias", e),
    ]
  else:
    p = prefix + "layers.{i}."
    out = [
        L("embed", prefix + "embed_tokens.weight", ((v,), (e,)), (0, 1)),
        vec("blocks.attn_norm.scale", p + "input_layernorm.weight", e),
        vec("blocks.mlp_norm.scale", p + "post_attention_layernorm.weight", e),
    ]
    for name, heads in (("q", h), ("k", kv), ("v", kv)):  # Linear [out, in]
      out.append(
          L(
              f"blocks.attn.{name}",
              p + f"self_attn.{name}_proj.weight",
              ((heads, d), (e,)),
              (2, 0, 1),
          )
      )
      if cfg.qkv_bias:
        out.append(
            L(f"blocks.attn.{name}_bias", p + f"self_attn.{name}_proj.bias", ((heads, d),), (0, 1))
        )
    out += [
        L("blocks.attn.o", p + "self_attn.o_proj.weight", ((e,), (h, d)), (1, 2, 0)),
        L("blocks.mlp.gate", p + "mlp.gate_proj.weight", ((m,), (e,)), (1, 0)),
        L("blocks.mlp.up", p + "mlp.up_proj.weight", ((m,), (e,)), (1, 0)),
        L("blocks.mlp.down", p + "mlp.down_proj.weight", ((e,), (m,)), (1, 0)),
        vec("final_norm.scale", prefix + "norm.weight", e),
    ]
  if cfg.head == "scalar":  # score.weight [num_labels=1, E]
    out.append(L("score", "score.weight", ((1,), (e,)), (0,), ((0, 0),)))
  elif not cfg.tie_embeddings:
    out.append(L("lm_head", "lm_head.weight", ((v,), (e,)), (1, 0)))
  return out


def _hf_names(layout: _Layout, num_layers: int) -> list[str]:
  return [layout.name.format(i=i) for i in range(num_layers)] if layout.stacked else [layout.name]


def _read_block(reader, name: str, layout: _Layout, index: tuple[slice, ...]) -> np.ndarray:
  """The part `index` (of our per-layer array) of HF tensor `name`, reading only what it needs.

  Per HF dim, the split dims before the first one indexed by a range are single indices and the
  ones after it are read whole, so the HF slice is one contiguous range per dim.
  """
  flat = [s for split in layout.split for s in split]
  per_dim = [None] * len(flat)
  selected = dict(layout.select)
  for k, i in selected.items():
    per_dim[k] = slice(i, i + 1)
  free = [k for k in range(len(flat)) if k not in selected]
  for j, s in enumerate(index):
    per_dim[free[layout.perm[j]]] = s
  hf_index, block_shape, local, k = [], [], [], 0
  for split in layout.split:
    dims = per_dim[k : k + len(split)]
    strides = [math.prod(split[i + 1 :]) for i in range(len(split))]
    first = next((i for i, s in enumerate(dims) if s.stop - s.start > 1), len(split) - 1)
    start = sum(s.start * st for s, st in zip(dims[: first + 1], strides))
    hf_index.append(slice(start, start + (dims[first].stop - dims[first].start) * strides[first]))
    block_shape += [1] * first + [dims[first].stop - dims[first].start] + list(split[first + 1 :])
    local += [slice(None)] * (first + 1) + dims[first + 1 :]
    k += len(split)
  block = _read_slice(reader, name, tuple(hf_index)).reshape(block_shape)[tuple(local)]
  block = block.reshape([n for i, n in enumerate(block.shape) if i not in selected])
  return np.transpose(block, layout.perm)


def _read_slice(reader, name: str, index: tuple[slice, ...]) -> np.ndarray:
  return reader(name)[index]


# --- loading --------------------------------------------------------------------------------------


def _weight_files(model_dir: Path) -> dict[str, Path]:
  """HF tensor name -> safetensors file, from model.safetensors or its sharded index."""
  if (model_dir / "model.safetensors").is_file():
    weights = model_dir / "model.safetensors"
    with file_io.reading(weights, fix="download it again"), safe_open(weights, "numpy") as f:
      return {name: weights for name in f.keys()}
  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    weight_map = file_io.read_json(index, fix="download it again")["weight_map"]
    missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
    if missing:
      raise ConfigPathError(
          f"{index} lists shard files that are not in {model_dir}: {missing}; " "download them too"
      )
    return {name: model_dir / f for name, f in weight_map.items()}
  pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
      p.name for p in model_dir.glob("*.pt*")
  )
  if pickles:
    raise ConfigError(
        f"{model_dir} has only PyTorch pickle weights ({', '.join(pickles)}); they are not loaded "
        "because unpickling can run arbitrary code. Convert them to safetensors once, in an "
        "environment you trust: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
        "safe_serialization=True)"
    )
  raise ConfigPathError(
      f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
      "download the checkpoint's safetensors weights into it"
  )


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` of a local HF checkpoint directory (never downloads)."""
  model_dir = Path(model_dir)
  if not (model_dir / "config.json").is_file():
    raise ConfigPathError(
        f"{model_dir} is not a local HF checkpoint directory (no config.json); download one with "
        "`hf download <repo_id> --local-dir DIR` and pass DIR"
    )
  return file_io.read_json(
      model_dir / "config.json", fix="download the checkpoint's config.json again"
  )


def _read_model_config(model_dir: Path) -> tuple[dict[str, Any], ModelConfig]:
  """(config.json, its ModelConfig); an unsupported config raises ConfigError naming the file."""
  hf_config = read_hf_config(model_dir)
  try:
    return hf_config, config_from_hf(hf_config)
  except ValueError as e:  # names the field; the user also needs the file
    raise ConfigError(f"{model_dir / 'config.json'}: {e}") from None


def load_hf(
    model_dir: str | os.PathLike,
    *,
    mesh=None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    head: str = "lm",
):
  """Loads a local HF checkpoint into our model, each param created in its `mesh` sharding.

  mesh: a `sharding.make_mesh` mesh (None: one device). dtype / param_dtype: compute and storage
  dtypes (the checkpoint's values are cast to param_dtype). head: "lm" for a causal LM, "scalar"
  for a `...ForSequenceClassification` checkpoint with num_labels = 1.

  Returns (graphdef, params, ModelConfig). Raises `ConfigError` (a ValueError) for an unsupported
  config, a missing, unexpected or wrongly shaped tensor (named, with expected and found shapes), or
  `.bin` weights; `ConfigPathError` (a FileNotFoundError) without config.json or safetensors.
  """
  model_dir = Path(model_dir)
  hf_config, cfg = _read_model_config(model_dir)
  cfg = cfg.replace(head=head, dtype=dtype, param_dtype=param_dtype)
  architectures = hf_config.get("architectures") or []
  classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
  if architectures and classifier != (head == "scalar"):
    raise ConfigError(
        f"{model_dir} holds a {architectures[0]}: load it with head="
        f"{'scalar' if classifier else 'lm'!r}, not head={head!r}"
    )
  if head == "scalar":
    num_labels = (
        len(hf_config["id2label"]) if hf_config.get("id2label") else hf_config.get("num_labels", 2)
    )  # transformers' default is 2 labels
    if num_labels != 1:
      raise ConfigError(
          f"{model_dir}: num_labels={num_labels}, but a scalar head (reward or value "
          "model) needs a ...ForSequenceClassification checkpoint with num_labels=1"
      )
  files = _weight_files(model_dir)
  family_prefix = "transformer." if cfg.family == "gpt2" else "model."
  embed = "wte.weight" if cfg.family == "gpt2" else "embed_tokens.weight"
  prefix = family_prefix if family_prefix + embed in files or embed not in files else ""
  layouts = _layouts(cfg, prefix)

  mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  graphdef, abstract, axes = abstract_model(cfg)
  shardings = sharding.param_shardings(abstract, axes, mesh)

  with ExitStack() as stack:
    handles = {}
    for f in sorted(set(files.values())):
      with file_io.reading(f, fix="download it again"):
        handles[f] = stack.enter_context(safe_open(f, framework="numpy"))
    slices = {}
    reader = lambda name: slices.setdefault(name, handles[files[name]].get_slice(name))
    expected = {n: lay.hf_shape for lay in layouts for n in _hf_names(lay, cfg.num_layers)}
    _check_tensors(model_dir, cfg, files, expected, reader)

    def make(layout: _Layout):
      node = abstract
      for key in layout.path:
        node = node[key]
      shape, target = node.shape, jnp.dtype(param_dtype)
      names = _hf_names(layout, cfg.num_layers)

      def callback(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
        if not layout.stacked:
          return _read_block(reader, names[0], layout, index).astype(target)
        return np.stack(
            [
                _read_block(reader, names[i], layout, index[1:]).astype(target)
                for i in range(*index[0].indices(shape[0]))
            ]
        )

      node_sharding = shardings
      for key in layout.path:
        node_sharding = node_sharding[key]
      return jax.make_array_from_callback(shape, node_sharding, callback)

    params: dict = {}
    for layout in layouts:
      node = params
      for key in layout.path[:-1]:
        node = node.setdefault(key, {})
      node[layout.path[-1]] = make(layout)
  return graphdef, params, cfg


def _check_tensors(
    model_dir,
    cfg: ModelConfig,
    files: Mapping[str, Path],
    expected: Mapping[str, tuple[int, ...]],
    reader,
) -> None:
  missing = [n for n in expected if n not in files]
  if missing:
    raise ConfigError(
        f"{model_dir}: missing tensor(s) {missing[:5]}; expected shape "
        f"{list(expected[missing[0]])} for {missing[0]!r}: the weights are incomplete "
        "or not those config.json describes; download the checkpoint again"
    )
  ignorable = lambda n: _IGNORABLE.search(n) or (n == "lm_head.weight" and cfg.tie_embeddings)
  unexpected = sorted(n for n in files if n not in expected and not ignorable(n))
  if unexpected:
    raise ConfigError(
        f"{model_dir}: unexpected tensor(s) {unexpected[:5]} for a {cfg.family} model "
        f"with head={cfg.head!r} and tie_word_embeddings={cfg.tie_embeddings}"
    )
  for name, shape in expected.items():
    found = tuple(reader(name).get_shape())
    if found != shape:
      raise ConfigError(
          f"{model_dir}: tensor {name!r} has shape {list(found)}, expected "
          f"{list(shape)} from config.json; config.json and the weights disagree"
      )
    if reader(name).get_dtype() not in ("F32", "F16", "BF16", "F64"):
      raise ConfigError(
          f"{model_dir}: tensor {name!r} has dtype {reader(name).get_dtype()}, "
          "expected a floating-point type"
      )


# --- export ---------------------------------------------------------------------------------------


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: gather to every host
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_hf(
    params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype: str | None = None,
    model_type: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
  """Writes `params` as an HF checkpoint directory: config.json, model.safetensors (or shards
  model-0000k-of-0000n.safetensors + model.safetensors.index.json above `max_shard_bytes`) and,
  with `tokenizer`, its files (bos/eos/pad ids then go into config.json).

  params: our param tree (jax arrays of any sharding, or numpy). dtype: storage dtype of the
  written tensors (None: cfg.param_dtype); a LoRA model is merged first (`lora.merge_lora`). model_type: see `config_to_hf` (pass "mistral" to
  label a Mistral as such). A scalar head becomes `...ForSequenceClassification` (num_labels 1),
  which needs the tokenizer's pad_token_id. Written to a temporary directory and renamed, so a
  failure leaves no half-written export; an existing `out_dir` is replaced only with `overwrite`.
  Multi-host: every process calls this; process 0 writes. Returns the absolute path.
  """
  out_dir = Path(os.path.abspath(out_dir))
  if out_dir.exists() and not overwrite:
    raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
  params, cfg = lora.merge_lora(params, cfg)  # a LoRA model is written as its merged plain model
  target = jnp.dtype(dtype or cfg.param_dtype)
  if target.name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r} must be float32, bfloat16 or float16")
  hf_config = config_to_hf(cfg, model_type=model_type)
  hf_config["dtype"] = hf_config["torch_dtype"] = target.name  # transformers 5 and 4 names
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    hf_config[key] = getattr(tokenizer, key, None)
  if cfg.head == "scalar":
    _check_score_padding(hf_config)

  layouts = _layouts(cfg, "transformer." if cfg.family == "gpt2" else "model.")
  leaves = _checked_leaves(params, cfg, layouts)
  shards = _plan_shards(layouts, cfg.num_layers, target.itemsize, max_shard_bytes)
  write = jax.process_index() == 0
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    if write:
      tmp.mkdir(parents=True)
    host: dict[tuple[str, ...], np.ndarray] = {}  # gathered params of the current group only
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
      file = (
          "model.safetensors"
          if len(shards) == 1
          else (f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors")
      )
      tensors = {}
      for name, group, layer in shard:
        for path in [p for p in host if p not in {lay.path for lay in group}]:
          del host[path]
        for layout in group:
          if layout.path not in host:
            host[layout.path] = _to_host(leaves[layout.path])
        tensors[name] = _hf_tensor(group, layer, host, target)
        weight_map[name] = file
        total += tensors[name].nbytes
      if write:
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
    if write:
      if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
      if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
      (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
      _replace_dir(tmp, out_dir)
  finally:
    if write and tmp.exists():
      shutil.rmtree(tmp)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"export_hf {out_dir}")
  return out_dir


def _checked_leaves(params, cfg: ModelConfig, layouts: list[_Layout]) -> dict:
  """Our param path -> array, checked against the shapes `cfg` implies."""
  _, abstract, _ = abstract_model(cfg)
  leaves = {}
  for layout in layouts:
    node, want = params, abstract
    for key in layout.path:
      if not isinstance(node, Mapping) or key not in node:
        raise ValueError(
            f"params have no {'.'.join(layout.path)}, which {cfg.family} "
            f"(head={cfg.head!r}, tie_embeddings={cfg.tie_embeddings}) needs"
        )
      node, want = node[key], want[key]
    if tuple(node.shape) != want.shape:
      raise ValueError(
          f"param {'.'.join(layout.path)} has shape {tuple(node.shape)}, expected "
          f"{want.shape} from the model config"
      )
    leaves[layout.path] = node
  return leaves


def _plan_shards(layouts: list[_Layout], num_layers: int, itemsize: int, max_shard_bytes: int):
  """[[(HF name, layouts filling it, layer), ...] per file]. Tensors come param by param (all
  layers of q_proj, then of k_proj, ...) so each of our stacked params is gathered once."""
  groups: dict[str, list[_Layout]] = {}  # GPT-2's c_attn is filled from three of our params
  for layout in layouts:
    groups.setdefault(layout.name, []).append(layout)
  shards, size = [[]], 0
  for name, group in groups.items():
    for layer in range(num_layers if group[0].stacked else 1):
      nbytes = math.prod(group[0].hf_shape) * itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards, size = shards + [[]], 0
      shards[-1].append((name.format(i=layer), group, layer))
      size += nbytes
  return shards


def _hf_tensor(group: list[_Layout], layer: int, host: Mapping, dtype) -> np.ndarray:
  """One HF tensor from our (host) params: the inverse of `_read_block`."""
  flat = [s for split in group[0].split for s in split]
  out = np.zeros(flat, dtype)
  for layout in group:
    value = host[layout.path][layer] if layout.stacked else host[layout.path]
    index = [slice(None)] * len(flat)
    for k, i in layout.select:
      index[k] = i
    # value = transpose(hf[index], perm), so hf[index] = transpose(value, perm^-1).
    out[tuple(index)] = np.transpose(value, np.argsort(layout.perm)).astype(dtype)
  return out.reshape(group[0].hf_shape)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
  """Renames the finished `tmp` to `out_dir`; an old `out_dir` is removed only after that."""
  if not out_dir.exists():
    tmp.rename(out_dir)
    return
  old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
  out_dir.rename(old)
  tmp.rename(out_dir)
  shutil.rmtree(old)


def _check_score_padding(hf_config: dict) -> None:
  """HF scores a sequence at its rightmost token != pad_token_id; ours at its last real token."""
  pad, eos = hf_config["pad_token_id"], hf_config["eos_token_id"]
  if pad is None:
    raise ValueError(
        "exporting a scalar head (ForSequenceClassification) needs pad_token_id: pass "
        "the tokenizer, with a pad token"
    )
  if pad == eos or (isinstance(eos, list) and pad in eos):
    raise ValueError(
        f"pad_token_id = eos_token_id = {pad}: HF's ForSequenceClassification scores the rightmost "
        "token that is not the pad token, so it would skip the EOS our reward model scores at. "
        "Use a tokenizer with a pad token distinct from EOS"
    )


# --- tokenizers and our own params exports --------------------------------------------------------


def load_hf_tokenizer(model_dir: str | os.PathLike):
  """The checkpoint's tokenizer (local files only, no remote code), with a pad token: EOS when the
  tokenizer has none (usual for Llama and GPT-2). A chat template, if any, is checked as
  `data.check_chat_template` does."""
  from rlhf_jax.data.tokenizer import load_tokenizer  # imports transformers: only when needed

  tokenizer = load_tokenizer(model_dir)
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise ConfigError(
          f"tokenizer in {model_dir} has neither a pad nor an eos token; add a "
          "pad_token to its tokenizer_config.json"
      )
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def import_hf(
    model_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    *,
    head: str = "lm",
    mesh=None,
    param_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
  """Converts an HF checkpoint into our params export (what `config.init_from` reads), with its
  tokenizer (pad token ensured) in `export_dir/tokenizer`, named by the metadata."""
  from rlhf_jax.train import checkpoint

  vocab_size = _read_model_config(Path(model_dir))[1].vocab_size
  tokenizer = load_hf_tokenizer(model_dir)  # checked before the (slow) weights are read
  if len(tokenizer) > vocab_size:  # ids past the embedding table would be out of range
    raise ConfigError(
        f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but config.json "
        f"vocab_size is {vocab_size}; the tokenizer files do not belong to these "
        "weights: use the tokenizer the checkpoint was trained with"
    )
  _, params, cfg = load_hf(model_dir, mesh=mesh, param_dtype=param_dtype, head=head)
  export_dir = Path(os.path.abspath(export_dir))
  metadata = {
      "model": cfg.to_dict(),
      "tokenizer": str(export_dir / "tokenizer"),
      "hf_source": str(Path(os.path.abspath(model_dir))),
  }
  checkpoint.export_params(export_dir, params, metadata=metadata, overwrite=overwrite)
  if jax.process_index() == 0:
    tokenizer.save_pretrained(str(export_dir / "tokenizer"))
  return export_dir
