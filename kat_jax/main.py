"""Entry point: python -m kat_jax.main --config configs/NAME.py[:arg] --workdir DIR [--config.k=v].

Kept short on purpose (as in nanodo): parse flags, validate, log the devices, dispatch on
`config.mode`. A bad config, checkpoint or model directory exits non-zero with one line naming the
problem -- no traceback -- before anything is loaded or compiled.
"""

from __future__ import annotations

import difflib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kat_jax import config as config_lib
from kat_jax import sft, smoke, train
from kat_jax.configfile import load_config
from kat_jax.errors import ConfigError, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")

MODES = ("train", "eval", "export", "sft", "smoke")


def _run(config, workdir: str) -> None:
  mode = config.get("mode", None)
  if mode not in MODES:
    raise ConfigError(f"config.mode={mode!r} is not one of {MODES}; set --config.mode.")
  if config.get("distributed", False):
    # Multi-host (TPU pod slice, GPU cluster): must precede any use of the devices. On TPU VMs
    # and SLURM / Open MPI clusters the coordinator and process ids are found automatically;
    # elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                              ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
    jax.distributed.initialize(**env)
  if jax.process_index() == 0:
    print(f"JAX {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
          f"{jax.process_count()} process(es)", flush=True)
  if mode == "smoke":
    smoke.run(config, workdir)
  elif mode == "sft":
    sft.train(config, workdir)
  else:
    config_lib.validate(config, workdir)
    {"train": train.train, "eval": train.evaluate_mode, "export": train.export}[mode](config,
                                                                                    workdir)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint step at INFO (~180 lines a run): keep the console to the
    # progress bar and the results unless --verbosity / -v asks for more.
    logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    sys.exit("error: --config is required, e.g. --config configs/arith.py")
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required, e.g. --workdir /tmp/kat")
  try:
    _run(_CONFIG.value, _WORKDIR.value)
  except (UserError, FileExistsError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


def preflight(argv: list[str]) -> str | None:
  """What absl / ml_collections would answer with a traceback, as one line: a missing or broken
  config file, an override of a field the config does not have (with the nearest names), or a
  value of the wrong type. None when the command line is fine."""
  spec, overrides = None, []
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value = argv[i + 1]
      overrides.append((key, value))
  if spec is None:
    return None  # main() names the missing flag
  path = spec.split(":", 1)[0]
  try:
    config = load_config(spec)
  except FileNotFoundError as e:
    return str(e)
  except Exception as e:  # noqa: BLE001 -- the user's file: report its error, not ours
    return f"config file {path!r} failed to load: {type(e).__name__}: {e}"
  for key, value in overrides:
    node, walked = config, []
    for name in key.split("."):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if name not in fields:
        near = difflib.get_close_matches(name, fields, n=3)
        where = "config" + "".join(f".{w}" for w in walked)
        hint = f"; did you mean {', '.join(f'--{where}.{n}' for n in near)}?" if near else (
            f"; {where} has: {', '.join(sorted(fields))}.")
        return f"--config.{key}: {where} has no field {name!r}{hint}"
      node = node[name]
      walked.append(name)
    want = type(node)
    if want in (int, float) and value:
      try:  # as absl parses them: float("inf") is a float, int("0x10", 0) an int
        float(value) if want is float else int(value, 0)
      except ValueError:
        return f"--config.{key}={value}: expected {want.__name__} (the default is {node!r})."
  return None


def run_cli(argv: list[str]) -> None:
  problem = preflight(argv[1:])
  if problem:
    sys.exit(f"error: {problem}")
  app.run(main, argv)


if __name__ == "__main__":
  run_cli(sys.argv)
