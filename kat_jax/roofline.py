"""Roofline time estimates from the compiler's own counts: FLOPs, HBM bytes and collectives.

A compiled program's `cost_analysis()` gives its FLOPs and HBM bytes per device; its optimized
HLO names every collective with its shape and replica groups. With a chip's peak rates:

  time = max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth) + collective bytes / ICI bandwidth

compute and memory traffic overlap (the roofline), collectives are added (XLA overlaps little of
them in a decode step; an upper bound where it does). A collective over a group of n devices
moves, per device, (n - 1) / n of the full array for an all-gather or a reduce-scatter, and twice
that for an all-reduce (reduce-scatter + all-gather), at one ICI link's bidirectional bandwidth
(a ring along one torus axis: the pessimistic end, as a group spans a single axis).

How XLA counts loops (measured with libtpu 0.0.42.1: a 10-step `lax.scan`, `fori_loop` or
`while_loop` of one matmul reports the FLOPs of ONE matmul): a loop body is counted once. So
kat_jax.aot compiles loop-free pieces for costing -- one student decode step, one KAT window
(whose W-step student scan counts one step), the prefill, an update over one row per device
without micro-batches or chunks -- and multiplies by the trip counts itself.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip peak rates; every figure from the public page in `source`."""
  name: str
  flops: float  # dense bf16 FLOP/s
  hbm_bw: float  # bytes/s
  ici_link_bw: float  # bytes/s, one link, both directions
  hbm: float  # bytes per chip, as published
  usable_hbm: float  # bytes one device's programs may use, per libtpu's compiler
  source: str


_CLOUD = "https://cloud.google.com/tpu/docs/"
_BOOK = "https://jax-ml.github.io/scaling-book/tpus/ (ICI per link)"
CHIPS = {
    # usable_hbm: what libtpu 0.0.42.1 lets one device's programs use ("exceeds available HBM
    # (30.75G)" in its RESOURCE_EXHAUSTED line), v4 / v5p as megacore devices (one per chip).
    "v4": Chip("v4", 275e12, 1200e9, 9e10, 32 * GiB, 30.75 * GiB, _CLOUD + "v4; " + _BOOK),
    "v5e": Chip("v5e", 197e12, 819e9, 1e11, 16 * GiB, 15.75 * GiB, _CLOUD + "v5e; " + _BOOK),
    "v5p": Chip("v5p", 459e12, 2765e9, 2e11, 95 * GiB, 95.74 * GiB, _CLOUD + "v5p; " + _BOOK),
    "v6e": Chip("v6e", 918e12, 1640e9, 2e11, 32 * GiB, 31.25 * GiB, _CLOUD + "v6e; " + _BOOK),
}


@dataclasses.dataclass
class Cost:
  """Per-device work of a program (or a sum of programs): FLOPs, HBM bytes, and collective
  bytes as (bytes moved per device, kind) pairs."""
  flops: float = 0.0
  hbm_bytes: float = 0.0
  collective_bytes: float = 0.0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes,
                self.collective_bytes + other.collective_bytes)

  def __mul__(self, k: float) -> "Cost":
    return Cost(self.flops * k, self.hbm_bytes * k, self.collective_bytes * k)

  __rmul__ = __mul__

  def __sub__(self, other: "Cost") -> "Cost":
    return self + other * -1.0

  def seconds(self, chip: Chip) -> float:
    """Roofline time on `chip` (see the module docstring)."""
    return (max(self.flops / chip.flops, self.hbm_bytes / chip.hbm_bw)
            + self.collective_bytes / chip.ici_link_bw)

  def bound(self, chip: Chip) -> str:
    parts = {"compute": self.flops / chip.flops, "HBM": self.hbm_bytes / chip.hbm_bw,
             "ICI": self.collective_bytes / chip.ici_link_bw}
    return max(parts, key=parts.get)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def array_dims(text: str) -> list[tuple[int, ...]]:
  """The dimensions of every array shape written in an HLO text, in order."""
  return [tuple(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(text)]


def _array_bytes(text: str) -> int:
  """Bytes of every array shape in `text` (a tuple result counts each element)."""
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d],
                                                      dtype=np.int64))
  return total


def _group_size(line: str) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form: [groups, size]<=[n]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)  # explicit: {{0,1,..},{..}}
  if m:
    return len([x for x in m.group(1).split(",") if x])
  return 2  # collective-permute: pairs


def collective_bytes(hlo: str) -> float:
  """Bytes each device moves over ICI for the collectives in an optimized HLO text (each op
  counted once, as written; loop bodies once)."""
  total = 0.0
  for line in hlo.splitlines():
    op = next((o for o in COLLECTIVES if f" {o}(" in line or f" {o}-start(" in line), None)
    if op is None or "=" not in line:
      continue
    result = line.split("=", 1)[1].split(op, 1)[0]  # the result shape(s), before the op name
    size, n = _array_bytes(result), _group_size(line)
    if n <= 1:
      continue
    if op == "all-gather":
      total += size * (n - 1) / n
    elif op == "reduce-scatter":
      total += size * (n - 1)  # the result is one shard of n
    elif op == "all-reduce":
      total += 2 * size * (n - 1) / n
    else:  # all-to-all, collective-permute: each device sends about its array once
      total += size * (n - 1) / n if op == "all-to-all" else size
  return total


def program_cost(executable) -> Cost:
  """FLOPs and HBM bytes from the compiler's cost analysis, collectives from its HLO."""
  c = executable.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return Cost(float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0)),
              collective_bytes(executable.as_text()))


def host_chip(seconds: float = 1.0) -> Chip:
  """This machine as a 'chip': its measured f32 matmul rate and memory bandwidth (no ICI)."""
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB: far past the caches
  cp = jax.jit(lambda x: x * 1.0001)

  def rate(fn, arg):
    fn(arg).block_until_ready()
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
      fn(arg).block_until_ready()
      runs += 1
    return runs / (time.perf_counter() - t0)

  flops = 2 * n**3 * rate(mm, a)
  bw = 2 * big.nbytes * rate(cp, big)  # read + write
  return Chip("this host", flops, bw, float("inf"), 0.0, 0.0, "measured")
