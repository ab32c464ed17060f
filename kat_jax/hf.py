"""Hugging Face checkpoints in and out: `load`, `save`, `check_compatible`.

* `load(path)` reads a local HF directory (config.json in the transformers 4.x or 5.x layout, one
  safetensors file or an indexed set of shards), memory-maps every tensor, converts it to kat_jax's
  layout and places it directly on its device / mesh sharding. The model is built abstractly first
  (`nnx.eval_shape`), so no random init is ever materialised.
* `save(model, config, out_dir)` writes a directory that `transformers.AutoModelForCausalLM
  .from_pretrained` loads with no missing or unexpected weights. It is written to a temporary sibling
  directory and renamed at the end, so a crash never leaves a half-written export.
* `check_compatible(student_dir, teacher_dir)`: OPD compares the two models' distributions token by
  token, so they must share one tokenizer; embedding tables padded to different sizes are fine.

The safetensors reader is a few lines of numpy over `np.memmap` (zero-copy views, bf16 through
ml_dtypes) instead of `safetensors.safe_open`, which copies each tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kat_jax import sharding as sharding_lib
from kat_jax import safetensors_io as st
from kat_jax.errors import CheckpointError, ConfigError
from kat_jax.models import LoraConfig, ModelConfig, Transformer
from kat_jax.models.transformer import LoRAParam, init_adapters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
# Tensors some published checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def default_dtype() -> str:
  """float32 on CPU (bf16 is slower on XLA CPU), bfloat16 on accelerators."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# ------------------------------------------------------------------------------ param mapping
# Each kat_jax param corresponds to one HF tensor up to a reshape / transpose. `kind` names it:
#   same       identical layout (embeddings, norms, o bias)
#   transpose  HF Linear (out, in) <-> kat_jax (in, out)
#   heads_in   HF (N*D, E)   <-> (E, N, D)   q/k/v projections
#   heads_out  HF (E, H*D)   <-> (H, D, E)   o projection
#   heads_bias HF (N*D,)     <-> (N, D)      q/k/v bias


def param_map(cfg: ModelConfig) -> dict[tuple, tuple[str, str]]:
  table = {("embed",): ("model.embed_tokens.weight", "same"),
           ("final_norm", "scale"): ("model.norm.weight", "same")}
  if not cfg.tie_embeddings:
    table[("lm_head",)] = ("lm_head.weight", "transpose")
  for i in range(cfg.num_layers):
    hf = f"model.layers.{i}."
    ours = ("layers", i)
    table[ours + ("attn_norm", "scale")] = (hf + "input_layernorm.weight", "same")
    table[ours + ("mlp_norm", "scale")] = (hf + "post_attention_layernorm.weight", "same")
    for name in ("q", "k", "v"):
      table[ours + ("attn", f"{name}_proj")] = (hf + f"self_attn.{name}_proj.weight", "heads_in")
      if cfg.qkv_bias:
        table[ours + ("attn", f"{name}_bias")] = (hf + f"self_attn.{name}_proj.bias", "heads_bias")
    table[ours + ("attn", "o_proj")] = (hf + "self_attn.o_proj.weight", "heads_out")
    if cfg.o_bias:
      table[ours + ("attn", "o_bias")] = (hf + "self_attn.o_proj.bias", "same")
    if cfg.qk_norm:
      table[ours + ("attn", "q_norm", "scale")] = (hf + "self_attn.q_norm.weight", "same")
      table[ours + ("attn", "k_norm", "scale")] = (hf + "self_attn.k_norm.weight", "same")
    for name in ("gate", "up", "down"):
      table[ours + ("mlp", f"{name}_proj")] = (hf + f"mlp.{name}_proj.weight", "transpose")
  return table


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "same":
    return shape
  if kind == "transpose":
    return shape[::-1]
  if kind == "heads_in":
    e, n, d = shape
    return (n * d, e)
  if kind == "heads_out":
    h, d, e = shape
    return (e, h * d)
  if kind == "heads_bias":
    return (shape[0] * shape[1],)
  raise AssertionError(kind)


def _to_ours(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "transpose":
    return x.T
  if kind == "heads_in":
    e, n, d = shape
    return x.reshape(n, d, e).transpose(2, 0, 1)
  if kind == "heads_out":
    h, d, e = shape
    return x.reshape(e, h, d).transpose(1, 2, 0)
  if kind == "heads_bias":
    return x.reshape(shape)
  raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "transpose":
    return x.T
  if kind == "heads_in":
    e, n, d = x.shape
    return x.transpose(1, 2, 0).reshape(n * d, e)
  if kind == "heads_out":
    h, d, e = x.shape
    return x.transpose(2, 0, 1).reshape(e, h * d)
  if kind == "heads_bias":
    return x.reshape(-1)
  raise AssertionError(kind)


# ------------------------------------------------------------------------------------ load


def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """ModelConfig of an HF directory (config.json + generation_config.json when present)."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"model directory {str(path)!r} does not exist; give the path of a "
                          "local Hugging Face model directory (with config.json).")
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"{path} has no config.json: is it a Hugging Face model directory?")
  hf_cfg = json.loads(cfg_file.read_text())
  gen_file = path / "generation_config.json"
  gen_cfg = json.loads(gen_file.read_text()) if gen_file.exists() else None
  return ModelConfig.from_hf(hf_cfg, gen_cfg, **overrides)


def fingerprint(path: str | os.PathLike) -> dict:
  """What identifies a model directory's weights without reading them: its resolved path, and a
  hash of config.json and of each safetensors file's name, size and header (tensor names, shapes,
  dtypes, offsets)."""
  path = Path(path)
  digest = hashlib.sha256((path / "config.json").read_bytes())
  for f in sorted(path.glob("*.safetensors")):
    with open(f, "rb") as fh:
      n = int.from_bytes(fh.read(8), "little")
      digest.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 1 << 24)))
  return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def load(path: str | os.PathLike, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
         *, compute_dtype: str | None = None, rules=sharding_lib.DEFAULT_RULES,
         lora: LoraConfig | None = None, lora_seed: int = 0) -> tuple[Transformer, ModelConfig]:
  """Loads an HF Llama / Qwen2 / Qwen3 directory as a kat_jax `Transformer`.

  dtype: param dtype in memory (default: float32 on CPU, bfloat16 on accelerators);
  compute_dtype: activation dtype (default: = dtype). With `mesh`, each tensor is placed straight
  on its NamedSharding from the params' logical axes and `rules`.
  lora: adapters to add on the loaded base (kat_jax/lora.py), freshly initialised from
  `lora_seed` (B = 0: the model computes what the base does).
  """
  path = Path(path)
  dtype = dtype or default_dtype()
  cfg = read_config(path, param_dtype=dtype, dtype=compute_dtype or dtype)
  if lora is not None and lora.rank:
    cfg = cfg.replace(lora=lora)
  infos = st.index_checkpoint(path)

  table = param_map(cfg)
  expected = {hf_name for hf_name, _ in table.values()}
  ignored = {n for n in infos if n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    ignored.add("lm_head.weight")  # some tied checkpoints store the (identical) head anyway
  missing = sorted(expected - set(infos))
  unexpected = sorted(set(infos) - expected - ignored)
  if missing or unexpected:
    raise CheckpointError(
        f"{path}: checkpoint tensors do not match a {cfg.family} model with this config.json"
        + (f"; missing: {_head(missing)}" if missing else "")
        + (f"; unexpected: {_head(unexpected)}" if unexpected else "") + ".")

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(abs_state))
  adapters = {p for p, v in flat.items() if isinstance(v, LoRAParam)}
  assert set(flat) - adapters == set(table), "kat_jax param map out of sync with the model"

  values = {}
  for our_path, (hf_name, kind) in table.items():
    var = flat[our_path]
    shape = tuple(var.get_value().shape)
    info = infos[hf_name]
    if info.shape != _hf_shape(kind, shape):
      raise CheckpointError(
          f"{path}: tensor {hf_name} has shape {list(info.shape)}, but config.json implies "
          f"{list(_hf_shape(kind, shape))}; the weights and config.json disagree.")
    x = _to_ours(kind, st.read_tensor(info), shape).astype(jnp.dtype(dtype))
    if mesh is not None:
      names = var.get_metadata().get("out_sharding")
      target = sharding_lib.named_sharding(names, shape, mesh, rules)
      # Each process fills only its own devices' shards (the multi-host path as well).
      values[our_path] = jax.make_array_from_callback(shape, target, lambda idx, x=x: x[idx])
    else:
      values[our_path] = jax.device_put(x, jax.devices()[0])
  if adapters:
    where = None if mesh is None else {
        p: sharding_lib.named_sharding(flat[p].get_metadata().get("out_sharding"),
                                       tuple(flat[p].get_value().shape), mesh, rules)
        for p in adapters}
    values.update(init_adapters(cfg, lora_seed, where))
  state = nnx.from_flat_state([(p, flat[p].replace(values[p])) for p in flat])
  model = nnx.merge(graphdef, state)
  if mesh is not None:
    sharding_lib.pin_activations(model, mesh, rules)
  return model, cfg


def _head(names: list[str], n: int = 5) -> str:
  more = f" (+{len(names) - n} more)" if len(names) > n else ""
  return ", ".join(names[:n]) + more


# ------------------------------------------------------------------------------------ save


def _model_tensors(model: Transformer, config: ModelConfig, dtype) -> Iterator[tuple[str, np.ndarray]]:
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for our_path, (hf_name, kind) in param_map(config).items():
    # device_get gathers a sharded array to host (single-process; multi-host gathers first).
    x = np.asarray(jax.device_get(flat[our_path].get_value()))
    yield hf_name, _to_hf(kind, x).astype(dtype)


def save(model: Transformer, config: ModelConfig, out_dir: str | os.PathLike,
         tokenizer_dir: str | os.PathLike | None = None, *, dtype: str | None = None,
         overwrite: bool = False, max_shard_bytes: int = st.DEFAULT_MAX_SHARD_BYTES) -> Path:
  """Writes an HF directory (config, safetensors, generation config, tokenizer) atomically.

  dtype: tensor dtype on disk (default: the dtype of the checkpoint the model was loaded from, so
  load -> save reproduces it bit for bit). Shards above `max_shard_bytes` with an index file.
  """
  out_dir = Path(out_dir)
  shape_fields = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "tie_embeddings", "qkv_bias",
                  "o_bias", "qk_norm")
  for f in shape_fields:
    if getattr(model.cfg, f) != getattr(config, f):
      raise ConfigError(f"save: config.{f}={getattr(config, f)!r} but the model has "
                        f"{getattr(model.cfg, f)!r}; pass the config the model was built with.")
  if model.cfg.lora.rank:  # the weights alone would silently drop the adapters
    raise ConfigError("save: the model has LoRA adapters; write kat_jax.lora.save_merged (merged "
                      "weights) or kat_jax.lora.save_peft (the adapters) instead.")
  if not overwrite:
    check_new_directory(out_dir, "pass overwrite=True to replace it")
  tok_files = []
  if tokenizer_dir is not None:
    tok_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES
                 if (Path(tokenizer_dir) / f).exists()]
    if not tok_files:
      raise CheckpointError(f"tokenizer_dir {str(tokenizer_dir)!r} holds no tokenizer files "
                            f"(looked for {', '.join(TOKENIZER_FILES[:2])}, ...).")
  dtype = dtype or config.checkpoint_dtype
  np_dtype = np.dtype(jnp.dtype(dtype))

  with atomic_directory(out_dir) as tmp:
    st.write_weights(tmp, _model_tensors(model, config, np_dtype), max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(config.to_hf(dtype), indent=2) + "\n")
    write_generation_config(tmp, config)
    for f in tok_files:
      shutil.copy2(f, tmp / f.name)
  return out_dir


def check_new_directory(out_dir: Path, hint: str) -> None:
  """Refuses to write over an existing non-empty directory (or a file): a user's data stays."""
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory or {hint}.")


@contextlib.contextmanager
def atomic_directory(out_dir: Path):
  """Yields a temporary sibling of `out_dir` to fill. On success it takes out_dir's place (an old
  out_dir is removed only once the new one is complete); on any error it is deleted, so a crash
  never leaves a half-written model directory."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    yield tmp
    if out_dir.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.rename(out_dir, old / "x")
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_generation_config(directory: Path, config: ModelConfig) -> None:
  eos = list(config.eos_token_ids)
  gen = {"bos_token_id": config.bos_token_id,
         "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
         "pad_token_id": config.pad_token_id}
  (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ------------------------------------------------------------------------- compatibility


@dataclasses.dataclass(frozen=True)
class Compatibility:
  vocab_size: int  # tokenizer vocabulary (max id + 1): slice both models' logits to this
  student_vocab_size: int  # embedding rows, possibly padded beyond vocab_size
  teacher_vocab_size: int
  eos_token_ids: tuple[int, ...]


def _tokenizer_description(path: Path) -> dict[str, Any]:
  """What decides tokenization: vocab, merges, added tokens, special tokens."""
  desc: dict[str, Any] = {}
  tok_json = path / "tokenizer.json"
  if tok_json.exists():
    tok = json.loads(tok_json.read_text())
    model = tok.get("model") or {}
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
      vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    desc["vocab"] = dict(vocab)
    desc["merges"] = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    desc["model type"] = model.get("type")
    desc["added"] = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
  elif (path / "vocab.json").exists():
    desc["vocab"] = json.loads((path / "vocab.json").read_text())
    merges = path / "merges.txt"
    desc["merges"] = merges.read_text().splitlines() if merges.exists() else []
    added = path / "added_tokens.json"
    desc["added"] = json.loads(added.read_text()) if added.exists() else {}
  else:
    raise CheckpointError(f"{path} has no tokenizer.json (nor vocab.json); OPD needs the "
                          "tokenizer to check that student and teacher share it: save it with "
                          "`tokenizer.save_pretrained(dir)`.")
  tc = path / "tokenizer_config.json"
  special = {}
  if tc.exists():
    tcfg = json.loads(tc.read_text())
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
      value = tcfg.get(key)
      special[key] = value.get("content") if isinstance(value, dict) else value
  desc["special tokens"] = special
  return desc


def check_compatible(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike
                     ) -> Compatibility:
  """Raises CheckpointError naming what differs unless student and teacher share a tokenizer."""
  student_dir, teacher_dir = Path(student_dir), Path(teacher_dir)
  s_cfg, t_cfg = read_config(student_dir), read_config(teacher_dir)
  s_tok, t_tok = _tokenizer_description(student_dir), _tokenizer_description(teacher_dir)
  problems = []
  for key in ("model type", "vocab", "merges", "added", "special tokens"):
    a, b = s_tok.get(key), t_tok.get(key)
    if a != b:
      problems.append(f"{key} differ{'s' if key.endswith('type') else ''}: "
                      + _describe_difference(a, b))
  if set(s_cfg.eos_token_ids) != set(t_cfg.eos_token_ids):
    problems.append(f"EOS ids differ: student {list(s_cfg.eos_token_ids)} vs teacher "
                    f"{list(t_cfg.eos_token_ids)}")
  ids = list(s_tok["vocab"].values()) + list(s_tok["added"].values())
  vocab_size = max(ids) + 1 if ids else 0
  for who, cfg in (("student", s_cfg), ("teacher", t_cfg)):
    if cfg.vocab_size < vocab_size:
      problems.append(f"{who} embedding has {cfg.vocab_size} rows but the tokenizer has "
                      f"{vocab_size} ids")
  if problems:
    raise CheckpointError(f"student {student_dir} and teacher {teacher_dir} cannot be distilled "
                          "together (OPD needs one tokenizer): " + "; ".join(problems) + ".")
  return Compatibility(vocab_size, s_cfg.vocab_size, t_cfg.vocab_size, s_cfg.eos_token_ids)


def _describe_difference(a, b) -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    examples = ", ".join(f"{k!r}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff[:3])
    return f"{len(diff)} entries, e.g. {examples}"
  if isinstance(a, list) and isinstance(b, list):
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"lengths {len(a)} vs {len(b)}, first difference at entry {first}"
  return f"{a!r} vs {b!r}"
