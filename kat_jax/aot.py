"""Ahead-of-time compile check: a training step's programs compiled by XLA:TPU on this host.

  python -m kat_jax.aot --config configs/qwen3_opd.py --topology v5e:4x4 [--roofline]
      [--mesh 1,16,1] [--rollout-tensor -1|0|t] [--set loss.chunk=512 ...]

`libtpu` (`pip install libtpu==0.0.42.1`, what `jax[tpu]==0.10.2` pins) compiles for a named TPU
topology without a TPU (v4 / v5p as megacore devices, as a TPU VM runs them). From the models'
config.json files only -- abstract params with the shardings the run would give them, no weights
-- this compiles the fused rollout's prefill, its decode loop at the full batch (both in the
rollout's tensor-parallel layout, kat_jax.sharding.ROLLOUT_RULES, unless --rollout-tensor=-1)
and the OPD update at the full (untrimmed) length, and prints per program the compile time and
the TPU compiler's per-device memory (arguments, outputs, temporaries, aliased, generated code),
the long-lived state the run keeps beside it (training params and optimizer state during the
rollout, the teacher during an update that does not read it), the peak, and the memory plan's
phase figure (kat_jax/memory.py). A program that cannot fit reports the compiler's
RESOURCE_EXHAUSTED line instead. On a mesh whose batch is split, the decode loop's HLO is
checked for the whole batch's logits or per-layer activation all-gathers (`loop_findings`).

--roofline also compiles the loop-free pieces (kat_jax/roofline.py: XLA counts a loop body once)
and prints FLOPs / HBM / ICI bytes and the time per window, rollout, update and step on v4, v5e,
v5p and v6e.

--compaction adds the decode loop at every smaller batch the rollout compacts to.

`train` runs the same check on its own devices before loading weights (config.compile_check:
"auto" = on TPU) and refuses a run that cannot fit (`refuse_if_too_big`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kat_jax import config as config_lib
from kat_jax import lora, memory, opd, rollout, sharding
from kat_jax import roofline as roofline_lib
from kat_jax.configfile import load_config
from kat_jax.models import ConfigError, Transformer

GiB = 2**30


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
  # Long-lived state the run keeps in HBM while this program runs but does not pass to it (the
  # training params and optimizer state during the rollout; the teacher during an update that
  # does not read it): the compiler cannot see it, the device must hold it.
  resident: float = 0.0
  # Argument bytes that are one buffer passed twice: a self-distilled teacher's params are the
  # LoRA student's base (config.shares_base), counted once.
  shared: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)  # op -> count in the TPU HLO
  hlo: str = ""  # the optimized TPU HLO text
  findings: list = dataclasses.field(default_factory=list)  # layout problems (loop_findings)

  @property
  def total(self) -> float:
    """Bytes live at once: arguments + outputs + temporaries - what outputs alias + code."""
    return self.argument + self.output + self.temp - self.alias + self.code - self.shared

  @property
  def peak(self) -> float:
    """The device's peak while this program runs: `total` + the resident state."""
    return self.total + self.resident


def per_device_bytes(tree) -> float:
  """Bytes per device of a tree of arrays / ShapeDtypeStructs with shardings (the largest
  shard, as a device holds it)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return float(total)


def topology_devices(name: str):
  """The abstract devices of a TPU topology such as "v5e:2x2" (needs libtpu, not a TPU);
  "cpu": this host's first CPU device (to check the roofline against measured steps)."""
  if name == "cpu":
    return jax.devices("cpu")[:1]
  from jax.experimental import topologies
  # v4 and v5p chips have two TensorCores that JAX runs as one device ("megacore"), which is
  # how a TPU VM presents them; libtpu's default description splits them (twice the devices,
  # half the HBM each: v4:2x2x2 would be 16 devices of 15.25 GiB instead of 8 of 30.75).
  kw = {"chip_config_name": "megacore"} if name.split(":")[0] in ("v4", "v5p") else {}
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices
  except Exception as e:  # noqa: BLE001 -- libtpu missing or an unknown name: say which
    raise ValueError(f"--topology={name!r}: cannot describe it ({str(e).splitlines()[0][:200]}); "
                     "install libtpu (pip install libtpu==0.0.42.1) and use a name like "
                     "v5e:2x2, v5e:4x4 or v4:2x2x2.") from None


def _sds(shape, dtype, where: NamedSharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=where)


def abstract_model(cfg, mesh, *, remat=False, attn_chunk=0, scan_layers=False,
                   params_only=False, rules=sharding.DEFAULT_RULES):
  """(graph, abstract state) of a Transformer: ShapeDtypeStructs carrying the run's shardings."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  model.remat, model.attn_chunk, model.scan_layers = remat, attn_chunk, scan_layers
  sharding.pin_activations(model, mesh, rules)
  graph, state = nnx.split(model, nnx.Param) if params_only else nnx.split(model)
  where = sharding.param_shardings(state, mesh, rules)
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return graph, jax.tree.map(
      lambda v, s: v.replace(_sds(v.get_value().shape, v.get_value().dtype, s)), state, where,
      is_leaf=is_var)


def abstract_trained(cfg, mesh, *, master: bool, remat=False, attn_chunk=0, scan_layers=False):
  """(graph, trained, frozen) abstract params of a student in the training layout, as
  kat_jax.lora.split gives them; `master`: the trained params as float32 master weights."""
  graph, state = abstract_model(cfg, mesh, remat=remat, attn_chunk=attn_chunk,
                                scan_layers=scan_layers)
  model = nnx.merge(graph, state)
  graph, trained, frozen = lora.split(model)
  if master:
    trained = jax.tree.map(lambda x: _sds(x.shape, jnp.float32, x.sharding), trained)
  return graph, trained, frozen


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
  ops = {op: hlo.count(f" {op}(") for op in roofline_lib.COLLECTIVES}
  return Compiled(name, time.perf_counter() - t0, m.argument_size_in_bytes,
                  m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes,
                  m.generated_code_size_in_bytes, collectives={k: v for k, v in ops.items() if v},
                  hlo=hlo), exe


def loop_findings(hlo: str, batch: int, window: int, vocab: int, hidden: tuple[int, ...],
                  layers: int) -> list[str]:
  """What a decode loop must not do when its batch is split over devices (the issue-14 design
  check): hold a [B, W, V] buffer (or [W, B, V], or a step's [B, V]) of the *global* batch --
  every device forming the whole batch's logits -- or all-gather [B, T, E] activations of the
  global batch at every layer (weights kept in place, rows brought to them)."""
  found = []
  dims = set(roofline_lib.array_dims(hlo))
  for bad in ((batch, window, vocab), (window, batch, vocab), (batch, vocab)):
    if bad in dims:
      found.append(f"a buffer of shape {list(bad)}: the whole batch's logits on every device")
  gathers = 0
  for line in hlo.splitlines():
    if " all-gather(" in line or " all-gather-start(" in line:
      shape = (roofline_lib.array_dims(line.split("=", 1)[-1]) or [()])[0]
      if len(shape) >= 2 and shape[0] == batch and shape[-1] in hidden:
        gathers += 1
  if gathers >= layers:
    found.append(f"{gathers} all-gathers of [B, T, E] activations of the global batch (B="
                 f"{batch}): one per layer")
  return found


@dataclasses.dataclass
class Report:
  """What `check` compiled: per-program results, the mesh, the rollout layout and, with
  `roofline=True`, per-device costs of the loop-free pieces (kat_jax.roofline)."""
  results: list
  mesh_shape: tuple
  rollout_tensor: int  # 0: the rollout in the training layout
  batch: int
  max_new_tokens: int
  window: int
  costs: dict = dataclasses.field(default_factory=dict)  # piece -> roofline.Cost
  slots: int = 0  # the rollout's decode rows (rollout.slots; 0 = batch)

  def pieces(self) -> dict:
    """Costs per decode window, rollout, update and step (trip counts applied; every row
    generating max_new_tokens: the full-length upper bound)."""
    c = self.costs
    window = c["window"] + c["student step"] * (self.window - 1)
    rollout_cost = c["prefill"] + window * (self.max_new_tokens // self.window)
    update = c["update"]
    return {"decode window": window, "rollout": rollout_cost, "update": update,
            "step": rollout_cost + update}


def _one_step(s_graph, s_params, state, *, cfg, filled=None):
  carry = (state.s_next_BxV, state.s_cache, state.length_B, state.eos_B, state.done_B)
  return rollout.sample_step(nnx.merge(s_graph, s_params), state, carry, 0, cfg, filled)[0]


def _one_window(s_graph, s_params, t_graph, t_params, state, *, cfg, filled=None):
  return rollout.window_step(nnx.merge(s_graph, s_params), nnx.merge(t_graph, t_params), state,
                             cfg, filled)


@dataclasses.dataclass
class _Step:
  """What every program of a step is compiled from: the meshes, configs and abstract inputs."""
  config: object
  train_mesh: object
  mesh: object  # the rollout's (= train_mesh without tensor-parallel groups)
  rules: object
  s_cfg: object
  t_cfg: object
  r_cfg: object
  loss_cfg: object
  vocab: int
  eos: tuple
  pad: int
  student: tuple  # (graph, abstract state) in the rollout layout
  teacher: tuple  # (graph, abstract state) in the rollout layout
  train_student: tuple  # (graph, abstract params) in the training layout
  tx: object
  opt: object  # abstract optimizer state
  train_state: float  # resident during the rollout: optimizer state (+ training params)
  frozen: object = None  # the student's params the update does not train (LoRA: the base)
  master_cast: str | None = None  # master weights: the dtype the update casts them to
  shared: bool = False  # the teacher is the LoRA student's base (config.shares_base)

  def rows(self, *shape):
    """The sharding of a [B, ...] input on the rollout mesh: rows over its batch axes."""
    return sharding.batch_sharding(self.mesh, len(shape))


def _step(config, devices, mesh_shape, rollout_tensor) -> tuple[_Step, tuple, int]:
  m = config.mesh
  shape = mesh_shape or sharding.mesh_shape(m.data, m.fsdp, m.tensor, len(devices))
  train_mesh = sharding.make_mesh(shape, devices=devices)
  # The run's default: bf16 on accelerators, fp32 on CPU (hf.load).
  dtype = config.dtype or ("float32" if devices[0].platform == "cpu" else "bfloat16")
  lora_cfg = config_lib.lora_config(config)
  s_cfg = memory.model_config(config.student, dtype).replace(lora=lora_cfg)
  t_cfg = memory.model_config(config.teacher, dtype)
  shared = config_lib.shares_base(config)
  tp = 0 if shared else sharding.resolve_rollout_tensor(  # a shared base: the training layout
      m.get("rollout_tensor", 0) if rollout_tensor is None else rollout_tensor, train_mesh,
      (s_cfg, t_cfg))
  mesh, rules = train_mesh, sharding.DEFAULT_RULES
  if tp > 1:  # the rollout (and the teacher everywhere) in the tensor-parallel layout
    mesh, rules = sharding.rollout_mesh(train_mesh, tp), sharding.ROLLOUT_RULES
  else:
    tp = 0
  vocab = min(s_cfg.vocab_size, t_cfg.vocab_size)
  eos = tuple(s_cfg.eos_token_ids)
  pad = s_cfg.pad_token_id if s_cfg.pad_token_id is not None else eos[0]
  scan = config.get("scan_layers", False)
  # The training state (train layout): student params (the trained ones: all, float32 master
  # weights of all, or a LoRA student's adapters; and the frozen rest) and optimizer state.
  optim = opd.OptimConfig(**config.optim)
  master = opd.uses_master(optim, dtype, lora_cfg.rank)
  sgp, sp, frozen = abstract_trained(s_cfg, train_mesh, master=master, remat=config.remat,
                                     attn_chunk=config.attn_chunk, scan_layers=scan)
  # The student's params as the rollout reads them (a master's low-precision copy).
  low = jax.tree.map(lambda x: _sds(x.shape, dtype, x.sharding), sp) if master else sp
  tx = opd.make_optimizer(optim)
  opt = jax.tree.map(lambda x, w: _sds(x.shape, x.dtype, w), jax.eval_shape(tx.init, sp),
                     opd.optimizer_shardings(tx, sp))
  step = _Step(
      config, train_mesh, mesh, rules, s_cfg, t_cfg,
      config_lib.rollout_config(config, eos, pad, vocab), config_lib.loss_config(config, vocab),
      vocab, eos, pad, abstract_model(s_cfg, mesh, rules=rules),
      abstract_model(t_cfg, mesh, attn_chunk=config.attn_chunk, scan_layers=scan, rules=rules),
      (sgp, sp), tx, opt,
      # Resident during the rollout: the optimizer state (and master weights), and the training
      # params when the rollout works on a copy of them in its own layout.
      per_device_bytes((opt, sp if master else (), (low, frozen) if tp else ())),
      frozen, dtype if master else None, shared)
  return step, shape, tp


def _prompt_args(st: _Step, b: int) -> tuple:
  """The prefill's abstract inputs for b rows: prompts, starts, probes, key, tau, spike_tau."""
  p, one = st.config.max_prompt_len, NamedSharding(st.mesh, PartitionSpec())
  return (_sds((b, p), jnp.int32, st.rows(b, p)), _sds((b,), jnp.int32, st.rows(b)),
          _sds((b,), jnp.bool_, st.rows(b)), _sds((), jax.random.key(0).dtype, one),
          _sds((), jnp.float32, one), _sds((), jnp.float32, one))


def _rollout_programs(st: _Step, report: Report, roofline: bool, compaction: bool,
                      loop: bool = True):
  """Prefill, the decode loop (full batch, and each compacted batch) and the roofline's
  loop-free rollout pieces. Returns the loop state's abstract shapes (None: no prefill).
  loop=False: the prefill only (its output is the state the other programs take)."""
  config, r_cfg, mesh = st.config, st.r_cfg, st.mesh
  # The decode rows (slots; the rest of the batch is refilled into them) and the longest prompt
  # bucket a run can produce.
  b, p = report.slots or report.batch, config.max_prompt_len
  one = NamedSharding(mesh, PartitionSpec())
  (sg, sa), (tg, ta) = st.student, st.teacher
  prompt_args = _prompt_args(st, b)
  res, exe = _compile("rollout prefill", lambda: rollout.prefill.lower(
      sg, sa, tg, ta, *prompt_args, cfg=r_cfg))
  res.resident = st.train_state
  shared = per_device_bytes(ta) if st.shared else 0.0
  res.shared = shared
  report.results.append(res)
  if exe is None:  # the later programs' shapes come from the prefill's
    return None
  if roofline:
    report.costs["prefill"] = roofline_lib.program_cost(exe)
  shapes = jax.eval_shape(lambda *a: rollout.prefill(*a, cfg=r_cfg), sg, sa, tg, ta,
                          *prompt_args)
  state = _with_shardings(shapes, exe.output_shardings, mesh)
  if not loop:
    return state
  # With fewer slots than rollouts the loop also stops for refills (a traced refill count).
  refill = _sds((), jnp.int32, one) if b < report.batch else None
  res, _ = _compile(f"rollout decode loop (B={b})", lambda: rollout.decode_loop.lower(
      sg, sa, tg, ta, state, _sds((), jnp.int32, one), refill, cfg=r_cfg))
  res.resident, res.shared = st.train_state, shared
  if not res.error and sharding.batch_shards(mesh, st.rules) > 1:
    res.findings = loop_findings(res.hlo, b, r_cfg.window, st.vocab,
                                 (st.s_cfg.hidden_size, st.t_cfg.hidden_size),
                                 min(st.s_cfg.num_layers, st.t_cfg.num_layers))
  report.results.append(res)
  if compaction:
    for n in rollout.compaction_sizes(b, r_cfg.compact_multiple,
                                      sharding.batch_shards(mesh, st.rules))[1:]:
      small = jax.eval_shape(rollout.take_rows, state, _sds((n,), jnp.int32, one))
      # The same layout with fewer rows (compaction sizes are multiples of the batch shards).
      small = jax.tree.map(lambda x, full: _sds(x.shape, x.dtype, full.sharding), small, state)
      piece, _ = _compile(f"rollout decode loop (B={n})", lambda: rollout.decode_loop.lower(
          sg, sa, tg, ta, small, _sds((), jnp.int32, one), cfg=r_cfg))
      piece.resident, piece.hlo = st.train_state, ""  # the text is only read for the full batch
      piece.shared = shared
      report.results.append(piece)
      jax.clear_caches()  # each lowering of an unrolled 8B model holds GiBs of host memory
  if roofline:  # donated state: the caches update in place, as in the loop
    one_step = jax.jit(_one_step, static_argnames=("s_graph", "cfg"), donate_argnames=("state",))
    window = jax.jit(_one_window, static_argnames=("s_graph", "t_graph", "cfg"),
                     donate_argnames=("state",))
    for name, lower in (("student step", lambda: one_step.lower(sg, sa, state, cfg=r_cfg)),
                        ("window", lambda: window.lower(sg, sa, tg, ta, state, cfg=r_cfg))):
      piece, exe = _compile(name, lower)
      if exe is None:
        raise RuntimeError(f"the roofline's {name} program does not compile: {piece.error}")
      report.costs[name] = roofline_lib.program_cost(exe)
  return state


def _eval_program(st: _Step, report: Report) -> None:
  """Evaluation generation (student only, its own batch and lengths), in the rollout's layout;
  the teacher stays loaded beside it."""
  e = config_lib.eval_config(st.config)
  eb, p = e.batch_size, st.config.max_prompt_len
  sg, sa = st.student
  key = _sds((), jax.random.key(0).dtype, NamedSharding(st.mesh, PartitionSpec()))
  res, _ = _compile(f"eval generation (B={eb})", lambda: rollout.generate_jit.lower(
      sg, sa, _sds((eb, p), jnp.int32, st.rows(eb, p)), _sds((eb,), jnp.int32, st.rows(eb)), key,
      max_new_tokens=e.max_new_tokens, eos_ids=st.eos, pad_id=st.pad, vocab_size=st.vocab,
      sampling=rollout.SamplingConfig(e.temperature, e.top_k, e.top_p)))
  res.resident = st.train_state + (0.0 if st.shared else per_device_bytes(st.teacher[1]))
  report.results.append(res)


def _update_programs(st: _Step, report: Report, state, roofline: bool) -> None:
  """The update at the full (untrimmed) length; with `roofline`, its loop-free cost piece."""
  b, p, train_mesh = report.batch, st.config.max_prompt_len, st.train_mesh
  probe = _sds((b,), jnp.bool_, st.rows(b))
  fields = {f: getattr(state, f) for f in rollout.ROW_FIELDS}
  out = jax.eval_shape(lambda r, k, q: rollout.finalize(r, k, q, cfg=st.r_cfg), fields,
                       state.kat, probe)
  (tg, ta), (sgp, sp) = st.teacher, st.train_student

  def program(n_rows, cfg_loss, graph, params, frozen, t_graph=tg):
    def sized(x):  # n_rows rows of a [B, ...] input, batch-sharded on the training mesh
      return _sds((n_rows,) + x.shape[1:], x.dtype, sharding.batch_sharding(train_mesh, x.ndim))

    return lambda: opd.update.lower(
        graph, params, t_graph, ta, st.opt, sized(_sds((b, p), jnp.int32, None)),
        sized(_sds((b,), jnp.int32, None)), jax.tree.map(sized, out), tx=st.tx, cfg=cfg_loss,
        batch_shards=sharding.batch_shards(train_mesh), s_frozen=frozen,
        master_cast=st.master_cast)

  res, _ = _compile("update (full length)", program(b, st.loss_cfg, sgp, sp, st.frozen))
  if st.shared:  # the teacher's params are the student's frozen base, an argument already
    res.shared = per_device_bytes(ta) if st.loss_cfg.objective != "sampled_pg" else 0.0
  elif st.loss_cfg.objective == "sampled_pg":  # the teacher is not an argument (XLA drops it)
    res.resident = per_device_bytes(ta)
  if st.master_cast is not None:  # the student's low-precision copy, kept for the rollout
    res.resident += per_device_bytes(jax.tree.map(
        lambda x: _sds(x.shape, st.master_cast, x.sharding), sp))
  report.results.append(res)
  if roofline:
    # One row per device, no micro-batch loop, no attention / loss chunk loops, no scan over
    # layers: every op counted once is every op run once (cost_analysis counts a loop body
    # once); the update costs batch / that many rows of it.
    n = sharding.batch_shards(train_mesh)
    flat_g, flat_p, frozen = abstract_trained(st.s_cfg, train_mesh, remat=st.config.remat,
                                              master=st.master_cast is not None)
    flat_t = abstract_model(st.t_cfg, st.mesh, rules=st.rules)[0]
    piece, exe = _compile("update cost", program(
        n, dataclasses.replace(st.loss_cfg, microbatches=1, chunk=0), flat_g, flat_p, frozen,
        flat_t))
    if exe is None:
      raise RuntimeError(f"the roofline's update program does not compile: {piece.error}")
    report.costs["update"] = roofline_lib.program_cost(exe) * (b / n)


def check(config, topology: str | None, mesh_shape=None, rollout_tensor=None, update=True,
          roofline=False, compaction=False, devices=None, evaluation=True) -> Report:
  """Compiles prefill, decode loop, eval generation and update of `config` for `topology`.

  rollout_tensor: None = the config's `mesh.rollout_tensor`. roofline: also compile the
  loop-free pieces the roofline needs (one student step, one window, an update of one row per
  device without micro-batches or chunks) and keep their costs. compaction: also the decode
  loop at every smaller batch the rollout compacts to (rollout.compaction_sizes).
  """
  devices = topology_devices(topology) if devices is None else devices
  st, shape, tp = _step(config, devices, mesh_shape, rollout_tensor)
  batch = config.prompts_per_step * config.samples_per_prompt
  report = Report([], shape, tp, batch, st.r_cfg.max_new_tokens, st.r_cfg.window,
                  slots=rollout.resolve_slots(st.r_cfg.slots, batch,
                                              sharding.batch_shards(st.mesh, st.rules)))
  state = _rollout_programs(st, report, roofline, compaction)
  if state is None:
    return report
  if evaluation:
    _eval_program(st, report)
  if update:
    _update_programs(st, report, state, roofline)
  return report


def window_costs(config, topology: str | None, fills, batches=(None,), devices=None) -> dict:
  """Per-device roofline cost of one KAT window of the fused rollout (W student steps + one
  teacher chunk: the window program plus W - 1 student steps, as Report.pieces counts it)
  attending over prompt + `filled` new-token slots (None: the whole buffer), for each (batch,
  filled): {(batch, filled): roofline.Cost}. batch None = the config's slots."""
  devices = topology_devices(topology) if devices is None else devices
  st, shape, tp = _step(config, devices, None, None)
  report = Report([], shape, tp, config.prompts_per_step * config.samples_per_prompt,
                  st.r_cfg.max_new_tokens, st.r_cfg.window)
  window = jax.jit(_one_window, static_argnames=("s_graph", "t_graph", "cfg", "filled"),
                   donate_argnames=("state",))
  step = jax.jit(_one_step, static_argnames=("s_graph", "cfg", "filled"),
                 donate_argnames=("state",))
  (sg, sa), (tg, ta) = st.student, st.teacher
  out = {}
  for b in batches:
    report.slots = b or 0
    state = _rollout_programs(st, report, roofline=False, compaction=False, loop=False)
    if state is None:
      raise RuntimeError(f"the rollout prefill does not compile: {report.results[-1].error}")
    for f in fills:
      # XLA counts the window's W-step student scan once: add W - 1 single steps.
      costs = []
      for name, lower in (("window", lambda: window.lower(sg, sa, tg, ta, state, cfg=st.r_cfg,
                                                          filled=f)),
                          ("student step", lambda: step.lower(sg, sa, state, cfg=st.r_cfg,
                                                              filled=f))):
        piece, exe = _compile(f"{name} (B={b}, filled={f})", lower)
        if exe is None:
          raise RuntimeError(f"the {name} program does not compile: {piece.error}")
        costs.append(roofline_lib.program_cost(exe))
      out[(b, f)] = costs[0] + costs[1] * (st.r_cfg.window - 1)
      jax.clear_caches()
  return out


def refuse_if_too_big(report: Report, device_memory: float, config) -> None:
  """Raises ConfigError naming the first program whose peak exceeds 90% of `device_memory`,
  its largest part, and the knobs that shrink it (for `train`, before any weight loads)."""
  limit = 0.9 * device_memory
  for r in report.results:
    if r.error:
      raise ConfigError(f"the {r.name} program does not compile for these devices: {r.error}")
    if r.peak <= limit:
      continue
    parts = {"arguments": r.argument, "outputs not aliased": r.output - r.alias,
             "temporaries": r.temp, "resident state": r.resident}
    big = max(parts, key=parts.get)
    if r.name.startswith("update"):
      chunk = max(config.loss.chunk // 2, 64) if config.loss.chunk else 256
      knobs = (([] if config.remat else ["--config.remat=True"])
               + [f"--config.loss.chunk={chunk}", "a larger --config.loss.microbatches",
                  "more devices"])
    elif r.name.startswith("eval"):
      knobs = ["a smaller --config.eval.batch_size", "a shorter --config.eval.max_new_tokens",
               "more devices"]
    else:
      knobs = ["fewer rollouts (prompts_per_step x samples_per_prompt)", "a shorter "
               "max_new_tokens / max_prompt_len", "more devices", "--config.mesh.rollout_tensor"
               " (the rollout's tensor-parallel group)"]
    raise ConfigError(
        f"the {r.name} program needs {r.peak / GiB:.2f} GiB per device (XLA's compiled memory, "
        f"largest part {big} {parts[big] / GiB:.2f} GiB) but 90% of the device is "
        f"{limit / GiB:.2f} GiB; try {', '.join(knobs)}.\n" + table(report.results, None, None))


def table(results: list[Compiled], plan, hbm: float | None) -> str:
  """Per program: compile time and per-device GiB from the TPU compiler, the resident state
  beside it, the peak, and the plan's phase."""
  g = lambda x: f"{x / GiB:7.2f}"  # noqa: E731
  lines = [f"{'program':<30} {'compile':>8} {'args':>7} {'out':>7} {'temp':>7} {'alias':>7} "
           f"{'code':>7} {'total':>7} {'+state':>7} {'peak':>7}  plan"]
  for r in results:
    # The plan has a rollout phase (the full batch) and an update phase; evaluation and the
    # compacted loops are neither (they are smaller).
    compacted = r.name.startswith("rollout decode loop") and any(
        q.name.startswith("rollout decode loop") for q in results[:results.index(r)])
    phase = None if plan is None or r.name.startswith("eval") or compacted else (
        plan.update_phase if r.name.startswith("update") else plan.rollout_phase)
    if r.error:
      lines.append(f"{r.name:<30} {r.seconds:7.1f}s  does not compile: {r.error}")
      continue
    fit = "" if hbm is None else f"  ({r.peak / hbm:.0%} of {hbm / GiB:.2f} GiB)"
    lines.append(f"{r.name:<30} {r.seconds:7.1f}s {g(r.argument)} {g(r.output)} {g(r.temp)} "
                 f"{g(r.alias)} {g(r.code)} {g(r.total)} {g(r.resident)} {g(r.peak)} "
                 f"{g(phase) if phase is not None else '      -'}{fit}")
  for r in results:
    for f in r.findings:
      lines.append(f"LAYOUT PROBLEM in {r.name}: {f}")
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
  parser.add_argument("--rollout-tensor", type=int, default=None,
                      help="the rollout layout: -1 = the training layout, 0 = auto tensor-"
                           "parallel groups, t = groups of t (default: the config's)")
  parser.add_argument("--no-update", action="store_true", help="compile the rollout only")
  parser.add_argument("--compaction", action="store_true",
                      help="also the decode loop at every compacted batch size")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set remat=True (repeatable)")
  parser.add_argument("--hbm-gb", type=float, default=0.0,
                      help="per-device HBM for the percentage column (default: the chip's, "
                           "kat_jax.roofline.CHIPS; v5e: 15.75, what its compiler allows)")
  parser.add_argument("--roofline", action="store_true",
                      help="also compile the loop-free pieces and print the time per window, "
                           "update and step on v4 / v5e / v5p / v6e (several minutes more)")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  for item in args.set:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    try:
      node[leaf] = type(node[leaf])(ast.literal_eval(value))
    except (ValueError, SyntaxError):
      node[leaf] = value
  shape = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
  report = check(config, args.topology, shape, args.rollout_tensor, update=not args.no_update,
                 roofline=args.roofline, compaction=args.compaction)
  plan = memory.for_config(config, report.mesh_shape, None, accelerator=True)
  tp = report.rollout_tensor
  layout = f"tensor-parallel groups of {tp}" if tp else "the training layout"
  print(f"{args.topology}, mesh (data, fsdp, tensor) = {report.mesh_shape}, rollout in "
        f"{layout}; per device, GiB:")
  chip = roofline_lib.CHIPS.get(args.topology.split(":")[0])
  hbm = args.hbm_gb * GiB or (chip.usable_hbm if chip else None)
  print(table(report.results, plan, hbm))
  if report.costs:
    print()
    print(roofline_table(report, len(topology_devices(args.topology))))


def roofline_table(report: Report, chips: int) -> str:
  """Per chip kind: roofline seconds per decode window, rollout, update and step (the programs
  compiled for this topology, run at each kind's peak rates), tokens/s and FLOP utilization."""
  pieces = report.pieces()
  g = lambda x: f"{x:9.3g}"  # noqa: E731
  lines = ["per device, from the compiler's cost analysis (loop-free pieces x trip counts):"]
  for name, c in pieces.items():
    lines.append(f"  {name:<14} {c.flops / 1e12:10.2f} TFLOP {c.hbm_bytes / GiB:10.2f} GiB HBM "
                 f"{c.collective_bytes / GiB:9.2f} GiB ICI")
  tokens = report.batch * report.max_new_tokens
  lines.append(f"roofline on {chips} chips of each kind (every row generating "
               f"{report.max_new_tokens} tokens), seconds:")
  lines.append(f"  {'chip':<5} {'window':>9} {'rollout':>9} {'update':>9} {'step':>9} "
               f"{'tokens/s':>9} {'FLOP use':>9}  bound (window / update)")
  for chip in roofline_lib.CHIPS.values():
    t = {k: c.seconds(chip) for k, c in pieces.items()}
    use = pieces["step"].flops / (t["step"] * chip.flops)
    lines.append(f"  {chip.name:<5} {g(t['decode window'])} {g(t['rollout'])} {g(t['update'])} "
                 f"{g(t['step'])} {g(tokens / t['step'])} {use:9.1%}  "
                 f"{pieces['decode window'].bound(chip)} / {pieces['update'].bound(chip)}")
  lines.append("chip peaks: " + "; ".join(
      f"{c.name} {c.flops / 1e12:g} TFLOP/s, {c.hbm_bw / 1e9:g} GB/s HBM, "
      f"{c.ici_link_bw / 1e9:g} GB/s per ICI link" for c in roofline_lib.CHIPS.values()))
  return "\n".join(lines)


if __name__ == "__main__":
  main()
