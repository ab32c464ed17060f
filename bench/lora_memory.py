"""Benchmark: per-device memory of LoRA and of fp32 master weights, from the TPU compiler.

Run:  python bench/lora_memory.py                 (v5e:2x2; 19 min here beside a training job)
      python bench/lora_memory.py --layers 2 --topology v5e:4x4

configs/qwen3_opd.py (bf16, FSDP, remat, scanned layers, micro-batches) with the Qwen3-1.7B
student / Qwen3-8B teacher widths cut to --layers layers (each layer adds the same again; the LM
head and embeddings are whole), 8 rollouts of 1024 tokens, compiled ahead of time for a TPU
topology on this CPU (kat_jax.aot, libtpu). Rows, all in one process:
  full, master off   full fine-tuning updating the bf16 params directly (the baseline);
  full, fp32 master  the default for a bf16 student (optim.master='auto');
  LoRA r=16          adapters on every projection of the frozen bf16 student;
  LoRA r=16, shared  the student *is* the teacher's checkpoint plus adapters (self-distillation):
                     one copy of the 8B base for both.
Per row: the update's arguments and peak and the rollout's peak per device (GiB), with ratios to
the baseline, and the memory plan's (kat_jax.memory) figures beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from kat_jax import aot, memory  # noqa: E402
from kat_jax.configfile import load_config  # noqa: E402

GiB = 2**30


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--rank", type=int, default=16)
  args = parser.parse_args(argv)
  tmp = Path(tempfile.mkdtemp())
  student = memory.write_known_config(tmp / "student", "Qwen3-1.7B", args.layers)
  teacher = memory.write_known_config(tmp / "teacher", "Qwen3-8B", args.layers)
  rows = [("full, master off", {"optim.master": "off"}), ("full, fp32 master", {}),
          (f"LoRA r={args.rank}", {"lora.rank": args.rank}),
          (f"LoRA r={args.rank}, shared 8B base", {"lora.rank": args.rank, "student": teacher})]
  results = []
  for name, edits in rows:
    cfg = load_config("configs/qwen3_opd.py")
    cfg.student, cfg.teacher = student, teacher
    cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens = 4, 2, 1024
    cfg.loss.microbatches = 2
    for key, value in edits.items():
      *groups, field = key.split(".")
      node = cfg
      for g in groups:
        node = node[g]
      node[field] = value
    report = aot.check(cfg, args.topology, evaluation=False)
    plan = memory.for_config(cfg, report.mesh_shape, None, accelerator=True)
    by = {r.name.split(" (")[0]: r for r in report.results}
    if any(r.error for r in report.results):
      sys.exit(f"{name}: does not compile: {[r.error for r in report.results if r.error]}")
    update = by["update"]
    rollout_peak = max(by["rollout prefill"].peak, by["rollout decode loop"].peak)
    results.append((name, update.argument - update.shared, update.peak, rollout_peak,
                    plan.update_phase, plan.rollout_phase, report.mesh_shape))
    print(f"{name}: compiled", flush=True)
  base = results[0]
  print(f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.topology}, mesh {base[6]}, Qwen3-1.7B / 8B widths x {args.layers} layer(s), "
        "GiB per device\n")
  print("| student | update args | ratio | update peak | ratio | rollout peak | ratio | "
        "plan update / rollout |")
  print("|---|---|---|---|---|---|---|---|")
  for name, args_b, upd, roll, p_upd, p_roll, _ in results:
    print(f"| {name} | {args_b / GiB:.2f} | {args_b / base[1]:.2f} | {upd / GiB:.2f} | "
          f"{upd / base[2]:.2f} | {roll / GiB:.2f} | {roll / base[3]:.2f} | "
          f"{p_upd / GiB:.2f} / {p_roll / GiB:.2f} |")


if __name__ == "__main__":
  main()
