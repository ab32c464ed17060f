"""Benchmark: seconds per OPD step of each variant of configs/arith_compare.py, measured cleanly.

Run:  python bench/variant_step_time.py        (~4 min on 2 CPU cores; run nothing else meanwhile)

Seed 0, 100 steps per variant, no evaluation, one process (compiles shared), two repetitions; prints
the median step time over steps 11-100 of each run and its ratio to vanilla OPD. The `random`
variant reads its cut lengths from a finished sweep's s0_plain run (--sweep DIR), or skips.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kat_jax import configfile, sweep, train  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sweep", default="", help="sweep dir with s0_plain (for `random`)")
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  root = Path(__file__).resolve().parents[1]
  module = configfile.load_module(str(root / "configs" / "arith_compare.py"))
  times: dict[str, list[float]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for rep in range(2):
      for variant in module.VARIANTS:
        if variant.get("match") and not (Path(args.sweep) / "s0_plain").is_dir():
          continue
        config = sweep.apply(module.get_config(), {**variant, "config.seed": 0})
        config.steps = config.optim.total_steps = args.steps
        config.eval_size, config.export, config.checkpoint_every = 0, False, 10 * args.steps
        config.log_rollouts = False
        if variant.get("match"):
          config = module.prepare(config, variant, Path(args.sweep))
        workdir = Path(tmp) / f"{rep}_{variant['name']}"
        train.train(config, workdir)
        steps = [json.loads(line)["step_time"] for line in open(workdir / "metrics.jsonl")
                 if '"step_time"' in line][10:]
        times.setdefault(variant["name"], []).append(statistics.median(steps))
  base = statistics.mean(times["vanilla"])
  print("\n| variant | s / step (two runs) | vs vanilla |\n|---|---|---|")
  for name, ts in times.items():
    print(f"| {name} | {' / '.join(f'{t:.3f}' for t in ts)} | {statistics.mean(ts) / base:.2f}x |")


if __name__ == "__main__":
  main()
