"""Benchmark: the roofline estimate (kat_jax.roofline) against a measured OPD step, on this CPU.

Run:  python bench/roofline_cpu.py          (~2 min on 2 CPU cores)

The TPU estimates of `python -m kat_jax.aot --roofline` cannot be timed here. This checks the
method where it can be: the pair, batch and lengths of bench/opd_step.py (B=32, 32 + 128 tokens,
W=32, KAT off, sampled_pg, fp32) compiled by XLA:CPU into the same loop-free pieces (prefill, one
student step, one window, an unchunked update), their FLOPs and bytes from XLA:CPU's cost
analysis, and this host's measured f32 matmul rate and memory bandwidth as the 'peaks'. It
prints the predicted seconds per rollout, update and step beside the measured step
(bench/opd_step.py's loop, median after warm-up) and their ratio. A roofline is a lower bound:
the ratio says how far the real step is from it (op overhead, cache misses, partial overlap).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu may be installed: this is the CPU check

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kat_jax import aot, hf, roofline  # noqa: E402
from kat_jax.config import defaults  # noqa: E402
from opd_step import B, N, P, bench_kat_jax  # noqa: E402
from rollout import PAIRS, _model  # noqa: E402


def main():
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; JAX {jax.__version__}",
        flush=True)
  spec = PAIRS["small"]
  student, s_cfg = _model(spec["vocab"], 0, **spec["student"])
  teacher, t_cfg = _model(spec["vocab"], 1, **spec["teacher"])
  prompt = jax.random.randint(jax.random.key(0), (B, P), 0, spec["vocab"] - 1, jnp.int32)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(student, s_cfg, Path(tmp) / "s")
    hf.save(teacher, t_cfg, Path(tmp) / "t")
    c = defaults()
    c.student, c.teacher = str(Path(tmp) / "s"), str(Path(tmp) / "t")
    c.dtype = "float32"
    c.prompts_per_step, c.samples_per_prompt = B, 1
    c.max_prompt_len, c.max_new_tokens = P, N
    c.kat.mode, c.kat.window = "none", 32
    c.mesh.data = 1
    report = aot.check(c, "cpu", roofline=True)
    chip = roofline.host_chip()
    print(f"this host: {chip.flops / 1e9:.0f} GFLOP/s (f32 1024^2 matmul), "
          f"{chip.hbm_bw / 1e9:.1f} GB/s (256 MiB scale: read + write)")
    pieces = report.pieces()
    t = {k: v.seconds(chip) for k, v in pieces.items()}
    for name, cost in pieces.items():
      print(f"  {name:<14} {cost.flops / 1e9:9.2f} GFLOP {cost.hbm_bytes / 2**30:8.3f} GiB "
            f"-> {t[name]:.3f} s ({cost.bound(chip)}-bound)")
    fresh, _ = hf.load(Path(tmp) / "s")
    measured, _, _ = bench_kat_jax(fresh, teacher, prompt, "sampled_pg", steps=5)
  print(f"\n| step (B={B}, {P} + {N} tokens) | roofline s | measured s | measured / roofline |")
  print("|---|---|---|---|")
  print(f"| kat_jax sampled_pg, KAT off | {t['step']:.3f} | {measured:.3f} | "
        f"{measured / t['step']:.2f}x |")


if __name__ == "__main__":
  main()
