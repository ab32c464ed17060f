"""Ahead-of-time compile check: a training step's programs compiled by XLA:TPU on this host.

  python -m kat_jax.aot --config configs/qwen3_opd.py --topology v5e:4x4 [--mesh 1,16,1]

`libtpu` (`pip install libtpu==0.0.42.1`, what `jax[tpu]==0.10.2` pins) compiles for a named TPU
topology without a TPU. From the models' config.json files only -- abstract params with the
shardings the run would give them, no weights -- this compiles the fused rollout's prefill, its
decode loop at the full batch, and the OPD update at the full (untrimmed) length, and prints per
program the compile time and the TPU compiler's per-device memory (arguments, outputs,
temporaries, aliased, generated code) beside the memory plan's phase figure (kat_jax/memory.py).
A program that cannot fit reports the compiler's RESOURCE_EXHAUSTED line instead.

Not yet (issue 14): the decode loop at each compaction size, evaluation generation, FLOPs / HBM
bytes with while-loop trip counts, the collectives of the loop body, the roofline, and using the
compiler's numbers in `memory` / `train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kat_jax import config as config_lib
from kat_jax import memory, opd, rollout, sharding
from kat_jax.models import Transformer

GiB = 2**30
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass
class Compiled:
  """One program's compile result (per device); `error` is set instead when it did not compile."""
  name: str
  seconds: float
  argument: float = 0.0
  output: float = 0.0
  temp: float = 0.0
  alias: float = 0.0
  code: float = 0.0
  error: str = ""
  collectives: dict = dataclasses.field(default_factory=dict)  # op -> count in the TPU HLO

  @property
  def total(self) -> float:
    """Bytes live at once: arguments + outputs + temporaries - what outputs alias + code."""
    return self.argument + self.output + self.temp - self.alias + self.code


def topology_devices(name: str):
  """The abstract devices of a TPU topology such as "v5e:2x2" (needs libtpu, not a TPU)."""
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # noqa: BLE001 -- libtpu missing or an unknown name: say which
    raise ValueError(f"--topology={name!r}: cannot describe it ({str(e).splitlines()[0][:200]}); "
                     "install libtpu (pip install libtpu==0.0.42.1) and use a name like "
                     "v5e:2x2, v5e:4x4 or v4:2x2x2.") from None


def _sds(shape, dtype, where: NamedSharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=where)


def abstract_model(cfg, mesh, *, remat=False, attn_chunk=0, params_only=False):
  """(graph, abstract state) of a Transformer: ShapeDtypeStructs carrying the run's shardings."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  model.remat, model.attn_chunk = remat, attn_chunk
  model.act_sharding = sharding.batch_sharding(mesh, 3)
  graph, state = nnx.split(model, nnx.Param) if params_only else nnx.split(model)
  where = sharding.param_shardings(state, mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return graph, jax.tree.map(
      lambda v, s: v.replace(_sds(v.get_value().shape, v.get_value().dtype, s)), state, where,
      is_leaf=is_var)


def _with_shardings(shapes, shardings, mesh):
  """Shapes with the compiler's output shardings; what it left off the mesh (scalars such as
  optimizer counts) replicated over it, as `sharding.onto_mesh` places them in a run."""
  one = NamedSharding(mesh, PartitionSpec())

  def place(x, s):
    on_mesh = isinstance(s, NamedSharding) and s.mesh == mesh
    return _sds(x.shape, x.dtype, s if on_mesh else one)

  return jax.tree.map(place, shapes, shardings)


def _compile(name: str, lowered_fn) -> tuple[Compiled, object]:
  t0 = time.perf_counter()
  try:
    exe = lowered_fn().compile()
  except Exception as e:  # noqa: BLE001 -- XlaRuntimeError: report the compiler's own line
    text = str(e)
    line = next((l for l in text.splitlines() if "RESOURCE_EXHAUSTED" in l), text.splitlines()[0])
    return Compiled(name, time.perf_counter() - t0, error=line.strip()[:300]), None
  m = exe.memory_analysis()
  hlo = exe.as_text()
  ops = {op: hlo.count(f" {op}(") for op in COLLECTIVES}
  return Compiled(name, time.perf_counter() - t0, m.argument_size_in_bytes,
                  m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes,
                  m.generated_code_size_in_bytes, collectives={k: v for k, v in ops.items() if v}
                  ), exe


def check(config, topology: str, mesh_shape=None) -> tuple[list[Compiled], tuple]:
  """Compiles prefill, decode loop and update of `config` for `topology`; returns the results
  and the mesh shape used."""
  devices = topology_devices(topology)
  m = config.mesh
  shape = mesh_shape or sharding.mesh_shape(m.data, m.fsdp, m.tensor, len(devices))
  mesh = sharding.make_mesh(shape, devices=devices)
  dtype = config.dtype or "bfloat16"
  s_cfg = memory.model_config(config.student, dtype)
  t_cfg = memory.model_config(config.teacher, dtype)
  vocab = min(s_cfg.vocab_size, t_cfg.vocab_size)
  eos = tuple(s_cfg.eos_token_ids)
  pad = s_cfg.pad_token_id if s_cfg.pad_token_id is not None else eos[0]
  r_cfg = config_lib.rollout_config(config, eos, pad, vocab)
  b = config.prompts_per_step * config.samples_per_prompt
  p = config.max_prompt_len  # the longest prompt bucket a run can produce
  rows = lambda *s: sharding.batch_sharding(mesh, len(s))  # noqa: E731
  one = NamedSharding(mesh, PartitionSpec())
  sg, sa = abstract_model(s_cfg, mesh)
  tg, ta = abstract_model(t_cfg, mesh, attn_chunk=config.attn_chunk)
  prompt = _sds((b, p), jnp.int32, rows(b, p))
  start, probe = _sds((b,), jnp.int32, rows(b)), _sds((b,), jnp.bool_, rows(b))
  key = _sds((), jax.random.key(0).dtype, one)
  scalar = _sds((), jnp.float32, one)
  results = []
  res, exe = _compile("rollout prefill", lambda: rollout._prefill.lower(
      sg, sa, tg, ta, prompt, start, probe, key, scalar, scalar, cfg=r_cfg))
  results.append(res)
  if exe is not None:
    shapes = jax.eval_shape(lambda *a: rollout._prefill(*a, cfg=r_cfg), sg, sa, tg, ta, prompt,
                            start, probe, key, scalar, scalar)
    state = _with_shardings(shapes, exe.output_shardings, mesh)
    res, _ = _compile(f"rollout decode loop (B={b})", lambda: rollout._decode_loop.lower(
        sg, sa, tg, ta, state, _sds((), jnp.int32, one), cfg=r_cfg))
    results.append(res)
    fields = {f: getattr(state, f) for f in rollout._ROW_FIELDS}
    out = jax.eval_shape(lambda r, k, q: rollout._finalize(r, k, q, cfg=r_cfg), fields,
                         state.kat, probe)
    result = jax.tree.map(lambda x: _sds(x.shape, x.dtype, rows(*x.shape)), out)
  else:  # the update's rollout-result shapes come from the prefill's: stop here
    return results, shape
  sgp, sp = abstract_model(s_cfg, mesh, remat=config.remat, attn_chunk=config.attn_chunk,
                           params_only=True)
  tx = opd.make_optimizer(opd.OptimConfig(**config.optim))
  init = jax.jit(tx.init).lower(sp).compile()
  opt = _with_shardings(jax.eval_shape(tx.init, sp), init.output_shardings, mesh)
  res, _ = _compile("update (full length)", lambda: opd.update.lower(
      sgp, sp, tg, ta, opt, prompt, start, result, tx=tx,
      cfg=config_lib.loss_config(config, vocab), batch_shards=sharding.batch_shards(mesh)))
  results.append(res)
  return results, shape


def table(results: list[Compiled], plan, hbm: float | None) -> str:
  """Per program: compile time and per-device GiB from the TPU compiler, and the plan's phase."""
  g = lambda x: f"{x / GiB:7.2f}"  # noqa: E731
  lines = [f"{'program':<30} {'compile':>8} {'args':>7} {'out':>7} {'temp':>7} {'alias':>7} "
           f"{'code':>7} {'total':>7}  plan"]
  for r in results:
    phase = plan.update_phase if r.name.startswith("update") else plan.rollout_phase
    if r.error:
      lines.append(f"{r.name:<30} {r.seconds:7.1f}s  does not compile: {r.error}")
      continue
    fit = "" if hbm is None else f"  ({r.total / hbm:.0%} of {hbm / GiB:.2f} GiB)"
    lines.append(f"{r.name:<30} {r.seconds:7.1f}s {g(r.argument)} {g(r.output)} {g(r.temp)} "
                 f"{g(r.alias)} {g(r.code)} {g(r.total)} {g(phase)}{fit}")
  lines.append("collectives in each program's HLO (op: count): " + "; ".join(
      f"{r.name}: {', '.join(f'{k} {v}' for k, v in r.collectives.items()) or 'none'}"
      for r in results if not r.error))
  return "\n".join(lines)


def main(argv=None) -> None:
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server to ask here
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another check may be running
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file[:arg]")
  parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v4:2x2x2")
  parser.add_argument("--mesh", default="", help="data,fsdp,tensor (default: the config's)")
  parser.add_argument("--hbm-gb", type=float, default=0.0,
                      help="per-device HBM for the percentage column (e.g. 15.75 for v5e)")
  args = parser.parse_args(argv)
  from kat_jax.sweep import load_module
  path, _, arg = args.config.partition(":")
  config = load_module(path).get_config(arg or None)
  shape = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
  results, shape = check(config, args.topology, shape)
  plan = memory.for_config(config, shape, None, accelerator=True)
  print(f"{args.topology}, mesh (data, fsdp, tensor) = {shape}; per device, GiB:")
  print(table(results, plan, args.hbm_gb * GiB or None))


if __name__ == "__main__":
  main()
