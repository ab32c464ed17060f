"""Config files: a Python file with `get_config(arg)` (ml_collections), loaded by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_module(path: str):
  """The Python file at `path` as a module (configs live outside the package)."""
  if not Path(path).is_file():
    raise FileNotFoundError(f"config file {path!r} does not exist; give the path of a config "
                            "file such as configs/arith.py")
  spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str):
  """`path[:arg]` -> the ConfigDict of `get_config(arg)`, or of `get_config()` without ':' (the
  file's own default), as ml_collections' --config flag calls it."""
  path, *arg = spec.split(":", 1)
  return load_module(path).get_config(*arg)
