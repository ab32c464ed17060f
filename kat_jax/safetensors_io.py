"""Safetensors files and Hugging Face checkpoint directories, tensor by tensor: headers, zero-copy
reads, the sharded index, and sharded writes that hold at most one shard in host memory. No model
knowledge here (kat_jax.hf maps the tensors to the model's params)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from kat_jax.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: Path
  dtype: str
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in the file
  end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
  """Name -> where each tensor of a .safetensors file lies (the header only is read)."""
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{file} is not a safetensors file ({e}).") from None
  base = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    b, e = info["data_offsets"]
    out[name] = TensorInfo(file, info["dtype"], tuple(info["shape"]), base + b, base + e)
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """A tensor as a read-only numpy memmap of its bytes (zero copy)."""
  if info.dtype not in SAFETENSORS_DTYPES:
    raise CheckpointError(f"{info.file}: dtype {info.dtype} is not supported.")
  dtype = np.dtype(SAFETENSORS_DTYPES[info.dtype])
  count = int(np.prod(info.shape, dtype=np.int64))
  if count == 0:
    return np.zeros(info.shape, dtype)
  # Zero-copy: the OS pages the bytes in when the conversion below touches them.
  return np.memmap(info.file, dtype=dtype, mode="r", offset=info.begin,
                   shape=(count,)).reshape(info.shape)


def index_checkpoint(path: Path) -> dict[str, TensorInfo]:
  """Every tensor of an HF directory: one model.safetensors, or the shards of its index."""
  index = path / "model.safetensors.index.json"
  single = path / "model.safetensors"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    infos = {}
    for name in files:
      if not (path / name).exists():
        raise CheckpointError(f"{index} lists shard {name!r}, which is missing from {path}.")
      infos.update(read_header(path / name))
    return infos
  if single.exists():
    return read_header(single)
  found = sorted(p.name for p in path.iterdir())
  raise CheckpointError(
      f"{path} has neither model.safetensors nor model.safetensors.index.json (found {found}); "
      "save the model with `save_pretrained(..., safe_serialization=True)`.")


def write_file(file: Path, tensors: dict[str, np.ndarray]) -> None:
  """One .safetensors file, with the format=pt metadata transformers requires."""
  from safetensors.numpy import save_file  # writes bf16 through ml_dtypes
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file),
            metadata={"format": "pt"})  # transformers refuses files without format=pt



def write_weights(directory: Path, tensors: Iterator[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> None:
  """model.safetensors, or shards of at most max_shard_bytes and their index, into
  `directory`."""
  # Greedy sharding in param order; shards are written as they fill, so host memory holds at most
  # one shard of converted tensors.
  shards: list[list[str]] = []
  current: dict[str, np.ndarray] = {}
  current_bytes = total = 0
  tmp_names = []

  def flush():
    nonlocal current, current_bytes
    name = f"shard-{len(tmp_names):05d}.tmp"
    write_file(directory / name, current)
    tmp_names.append(name)
    shards.append(list(current))
    current, current_bytes = {}, 0

  for name, x in tensors:
    if current and current_bytes + x.nbytes > max_shard_bytes:
      flush()
    current[name] = x
    current_bytes += x.nbytes
    total += x.nbytes
  if current or not shards:
    flush()

  if len(shards) == 1:
    os.rename(directory / tmp_names[0], directory / "model.safetensors")
    return
  weight_map = {}
  n = len(shards)
  for i, (tmp_name, names) in enumerate(zip(tmp_names, shards)):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.rename(directory / tmp_name, directory / final)
    weight_map.update({k: final for k in names})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
