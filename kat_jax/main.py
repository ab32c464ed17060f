"""Entry point: python -m kat_jax.main --config configs/NAME.py[:arg] --workdir DIR [--config.k=v].

Kept short on purpose (as in nanodo): parse flags, validate, log the devices, dispatch on
`config.mode`. A bad config, checkpoint or model directory exits non-zero with one line naming the
problem -- no traceback -- before anything is loaded or compiled.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")

MODES = ("train", "eval", "export", "sft", "smoke")


def _run(config, workdir: str) -> None:
  mode = config.get("mode", None)
  if mode not in MODES:
    raise ValueError(f"config.mode={mode!r} is not one of {MODES}; set --config.mode.")
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
    from kat_jax import smoke
    smoke.run(config, workdir)
  elif mode == "sft":
    from kat_jax import sft
    sft.train(config, workdir)
  else:
    from kat_jax import config as config_lib
    from kat_jax import train
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
  from kat_jax.hf import CheckpointError
  from kat_jax.models import ConfigError
  from kat_jax.train import TrainingStopped
  try:
    _run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, CheckpointError, TrainingStopped, FileExistsError,
          FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  except ValueError as e:  # raised by config dataclasses; one line, no traceback
    if str(e).startswith(("config.", "kat.", "sampling", "loss.", "optim.", "threshold.",
                            "eval.")):
      sys.exit(f"error: {e}")
    raise


if __name__ == "__main__":
  app.run(main)
