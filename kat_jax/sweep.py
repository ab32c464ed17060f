"""Sweeps: big_vision-style `get_hyper(hyper)` products in config files, run one after another.

A sweep config file defines `get_config(arg)` as usual plus

    def get_hyper(hyper):
      return hyper.product([
          hyper.sweep("config.seed", [0, 1, 2]),
          hyper.chain([{"name": "vanilla", "config.kat.mode": "none"},
                       {"name": "kat", "config.kat.mode": "kat"}]),
      ])

Each point is a dict of "config.a.b" overrides plus an optional "name" (the run's sub-directory
name; by default built from the overrides). Run every point locally, in this process:

    python -m kat_jax.sweep --config configs/arith_compare.py --workdir DIR [--only NAME,...]

A point whose DIR/NAME/summary.json exists is skipped, and an interrupted point resumes from its
last checkpoint, so rerunning the command finishes a sweep. On TPU pods `launch/` runs each point
as its own `python -m kat_jax.main` with the same overrides.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from kat_jax import config as config_lib
from kat_jax import train
from kat_jax.configfile import load_module
from kat_jax.errors import UserError


class hyper:  # noqa: N801  (a namespace, used as `hyper.product(...)` like big_vision's)

  @staticmethod
  def sweep(key: str, values) -> list[dict]:
    return [{key: v} for v in values]

  @staticmethod
  def chain(points) -> list[dict]:
    return [dict(p) for p in points]

  @staticmethod
  def product(lists) -> list[dict]:
    out = []
    for combo in itertools.product(*lists):
      point: dict = {}
      for part in combo:
        point.update(part)
      names = [part["name"] for part in combo if "name" in part]
      if names:
        point["name"] = "_".join(names)
      out.append(point)
    return out


def point_name(point: dict) -> str:
  if "name" in point:
    return str(point["name"])
  return ",".join(f"{k.removeprefix('config.')}={v}" for k, v in point.items())


def apply(config, point: dict):
  """The config with the point's "config.x.y" overrides (unknown keys are errors, as on the CLI)."""
  for key, value in point.items():
    if not key.startswith("config."):
      continue
    *parents, leaf = key.removeprefix("config.").split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"sweep override {key!r}: config has no such setting.")
    node[leaf] = value
  return config


def points(config_path: str, arg: str | None = None) -> list[dict]:
  module = load_module(config_path)
  if not hasattr(module, "get_hyper"):
    raise ValueError(f"{config_path} has no get_hyper(hyper): not a sweep config.")
  pts = module.get_hyper(hyper)
  names = [point_name(p) for p in pts]
  if len(set(names)) != len(names):
    raise ValueError(f"{config_path}: sweep points have duplicate names {names}.")
  return pts


def run_local(config_path: str, workdir: str, arg: str | None = None, only=None) -> dict:
  """Runs every point (see the module docstring); returns {name: summary}."""
  module = load_module(config_path)
  prepare = getattr(module, "prepare", None)  # optional hook: (config, point, workdir) -> config
  summaries = {}
  for point in points(config_path, arg):
    name = point_name(point)
    if only and name not in only:
      continue
    run_dir = Path(workdir) / name
    done = run_dir / "summary.json"
    if done.is_file():
      print(f"[sweep] {name}: done, skipped", flush=True)
      summaries[name] = json.loads(done.read_text())
      continue
    config = apply(module.get_config(arg), point)
    if prepare is not None:
      config = prepare(config, point, Path(workdir))
    config_lib.validate(config, str(run_dir))
    print(f"[sweep] {name}: training in {run_dir}", flush=True)
    summaries[name] = train.train(config, run_dir)
  return summaries


def main(argv=None) -> None:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="sweep config file[:arg]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--only", default="", help="comma-separated point names")
  parser.add_argument("--list", action="store_true", help="print the point names and exit")
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() first (every worker of a pod slice)")
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(":")
  if args.list:
    for p in points(path, arg or None):
      print(point_name(p))
    return
  if args.distributed:
    import jax
    jax.distributed.initialize()
  try:
    run_local(path, args.workdir, arg or None,
              only={s for s in args.only.split(",") if s} or None)
  except (UserError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
