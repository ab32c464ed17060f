"""Entry point: python -m kat_jax.main --config configs/NAME.py[:arg] --workdir DIR [--config.k=v].

Kept short on purpose (as in nanodo): parse flags, log the devices, dispatch on `config.mode`.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")

MODES = ("smoke", "sft")


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    sys.exit("error: --config is required, e.g. --config configs/smoke.py")
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required, e.g. --workdir /tmp/kat")
  mode = config.get("mode", None)
  if mode not in MODES:
    sys.exit(f"error: config.mode={mode!r} is not one of {MODES}; set --config.mode.")
  logging.info("JAX %s, %d %s device(s), %d process(es)", jax.__version__, jax.device_count(),
               jax.default_backend(), jax.process_count())
  if mode == "smoke":
    from kat_jax import smoke
    smoke.run(config, _WORKDIR.value)
  elif mode == "sft":
    from kat_jax import sft
    sft.train(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
