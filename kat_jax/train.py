"""OPD training with KAT: prompts -> fused rollout -> objective -> optax update, checkpointed.

Determinism: every random draw of step k comes from `fold_in(seed_key, k)`, the prompts of step k
are a pure function of the data position, and the threshold state is part of the checkpoint, so a
run resumed from step N continues bit for bit as if it had never stopped. Orbax keeps the last
`keep_checkpoints` steps; a run that stops on repeated non-finite updates saves nothing more, so
the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kat_jax import evaluate as evaluate_lib
from kat_jax import aot, hf, kat, lora, memory, metrics, opd, rollout, sharding, threshold
from kat_jax import report as dashboard
from kat_jax.config import (eval_config, loss_config, lora_config, rollout_config, shares_base,
                             threshold_config)
from kat_jax.data import benchmarks as bench_lib
from kat_jax.data import sources
from kat_jax.errors import ConfigError, TrainingStopped


@dataclasses.dataclass
class Run:
  """Everything a training run holds besides the per-step state."""
  config: object
  workdir: Path
  student: nnx.Module
  teacher: nnx.Module
  s_cfg: object
  vocab_size: int
  eos_ids: tuple[int, ...]
  pad_id: int
  tokenizer: object
  source: object
  benchmarks: list  # kat_jax.data.benchmarks.Benchmark, loaded at setup
  eval_cfg: object  # kat_jax.evaluate.EvalConfig
  mesh: object  # jax.sharding.Mesh (data, fsdp, tensor)
  # The rollout's layout (kat_jax.sharding.ROLLOUT_RULES on the same devices), where the teacher
  # lives and where the student is copied for each rollout; = mesh / DEFAULT_RULES when
  # mesh.rollout_tensor is -1 (or nothing to split).
  rollout_mesh: object
  rollout_rules: object
  tx: object
  loss_cfg: opd.LossConfig
  rollout_cfg: rollout.RolloutConfig
  threshold_cfg: threshold.ThresholdConfig
  # kat.mode='random': the cut lengths to draw from, converted once (a KAT run's cut lengths can
  # be tens of thousands of entries).
  random_lengths: jax.Array
  # float32 master weights of the trained params (optim.master): the compute dtype the update
  # casts them to, or None (the student's own params are updated).
  master_dtype: str | None = None


def _compile_check(config, shape, device_memory) -> None:
  """The compiler's per-device memory of the rollout and the update, from config.json files and
  abstract params on this run's devices (kat_jax.aot); a ConfigError if a program cannot fit."""
  t0 = time.perf_counter()
  report = aot.check(config, None, shape, devices=jax.devices())
  if _main_process():
    print(f"compile check ({time.perf_counter() - t0:.0f} s), per device, GiB:\n"
          + aot.table(report.results, None, device_memory), flush=True)
  if device_memory:
    aot.refuse_if_too_big(report, device_memory, config)


def _tokenizer(model_dir: Path):
  from tokenizers import Tokenizer
  return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def setup(config, workdir, with_teacher: bool = True) -> Run:
  """Models, tokenizer, data and the static configs; `with_teacher=False` for evaluation only."""
  dtype = config.dtype or None
  shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  if with_teacher:
    # The per-device memory plan, before any weight loads or anything compiles: a run that
    # cannot fit stops here with a mesh that does (kat_jax/memory.py).
    gb = config.device_memory_gb
    plan = memory.check(config, shape, jax.device_count(),
                        gb * memory.GiB if gb else memory.device_memory_bytes(),
                        accelerator=jax.default_backend() != "cpu")
    if _main_process():
      print(plan.table(), flush=True)
    check = config.get("compile_check", "auto")
    if check == "on" or (check == "auto" and jax.default_backend() == "tpu"):
      _compile_check(config, shape, gb * memory.GiB if gb else memory.device_memory_bytes())
  mesh = sharding.make_mesh(shape)
  if with_teacher:  # the shared vocabulary and EOS ids, checked before any weight loads
    compat = hf.check_compatible(config.student, config.teacher)
  # The rollout's tensor-parallel layout, from the models' config.json (no weights read yet).
  cfgs = [hf.read_config(config.student)] + ([hf.read_config(config.teacher)]
                                             if with_teacher else [])
  # A self-distilled teacher is the student's own base: both stay in the training layout.
  tp = 0 if shares_base(config) else sharding.resolve_rollout_tensor(
      config.mesh.rollout_tensor, mesh, cfgs)
  r_mesh, r_rules = ((sharding.rollout_mesh(mesh, tp), sharding.ROLLOUT_RULES) if tp > 1
                     else (mesh, sharding.DEFAULT_RULES))
  # Each tensor goes straight to its place on the mesh. The teacher holds params only (no
  # optimizer state, nothing kept for a backward pass) in the rollout's layout, which also
  # serves its scoring in the update.
  lora_cfg = lora_config(config)
  student, s_cfg = hf.load(config.student, dtype=dtype, mesh=mesh, lora=lora_cfg,
                           lora_seed=config.seed)
  student.remat, student.attn_chunk = config.remat, config.attn_chunk
  student.scan_layers = config.scan_layers
  tokenizer = _tokenizer(Path(config.student))
  if with_teacher and shares_base(config):
    # Self-distillation: the teacher is the student's frozen base with the adapters off -- the
    # same arrays, one copy in memory (in the training layout, where the student lives).
    teacher = lora.base_view(student)
  elif with_teacher:
    teacher, _ = hf.load(config.teacher, dtype=dtype, mesh=r_mesh, rules=r_rules)
    teacher.attn_chunk, teacher.scan_layers = config.attn_chunk, config.scan_layers
  if with_teacher:
    vocab_size, eos_ids = compat.vocab_size, compat.eos_token_ids
  else:
    # Sample only ids the tokenizer has (checkpoints often pad the embedding past it).
    teacher, eos_ids = None, tuple(s_cfg.eos_token_ids)
    vocab_size = min(s_cfg.vocab_size, max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1)
  pad_id = s_cfg.pad_token_id if s_cfg.pad_token_id is not None else eos_ids[0]
  # Benchmarks load before anything compiles: a missing file or set fails fast.
  train_eval = config.mode == "eval" or (config.mode == "train" and config.eval_size > 0)
  try:
    if not train_eval:
      benches = []
    elif not config.eval.benchmarks:
      benches = [bench_lib.heldout(config.data, config.eval_size, config.student)]
    else:
      benches = [bench_lib.load(spec, limit=config.eval_size, model_dir=config.student,
                                use_chat_template=config.eval.chat_template,
                                arith_seed=config.data.seed, arith_ops=config.data.n_ops)
                 for spec in bench_lib.parse_specs(config.eval.benchmarks)]
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.eval.benchmarks={config.eval.benchmarks!r}: {e}") from None
  return Run(
      config=config, workdir=Path(workdir), student=student, teacher=teacher, s_cfg=s_cfg,
      vocab_size=vocab_size, eos_ids=eos_ids, pad_id=pad_id,
      tokenizer=tokenizer,
      source=sources.from_config(config.data, "train", config.student,
                                 holdout=not config.eval.benchmarks),
      benchmarks=benches,
      eval_cfg=eval_config(config), mesh=mesh, rollout_mesh=r_mesh, rollout_rules=r_rules,
      tx=opd.make_optimizer(opd.OptimConfig(**config.optim)),
      master_dtype=(student.cfg.param_dtype if opd.uses_master(
          opd.OptimConfig(**config.optim), student.cfg.param_dtype, lora_cfg.rank) else None),
      loss_cfg=loss_config(config, vocab_size),
      rollout_cfg=rollout_config(config, eos_ids, pad_id, vocab_size),
      threshold_cfg=threshold_config(config),
      random_lengths=jnp.asarray(config.kat.random_lengths, jnp.int32))


def _encode(run: Run, prompts: list[str]):
  """Left-padded prompts and pad counts, batch-sharded over the mesh (every process encodes the
  same global batch -- a pure function of the data position -- and keeps its devices' rows)."""
  ids = [run.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
  longest = max(len(i) for i in ids)
  if longest > run.config.max_prompt_len:
    raise ConfigError(f"config.max_prompt_len={run.config.max_prompt_len}: a prompt of the data "
                      f"has {longest} tokens ({prompts[int(np.argmax([len(i) for i in ids]))][:60]!r}"
                      "...); raise max_prompt_len (the memory plan uses it) or shorten the data.")
  # Power-of-two buckets (few compiles), never past the planned max_prompt_len.
  length = min(rollout.bucket_length(longest), run.config.max_prompt_len)
  prompt, start = rollout.pad_prompts(ids, run.pad_id, length)
  return sharding.put_batch(prompt, run.mesh), sharding.put_batch(start, run.mesh)


def _main_process() -> bool:
  """Only process 0 writes logs, reports and exports; checkpoints are written by all."""
  return jax.process_index() == 0


def rollout_student(run: Run):
  """The student in the rollout's layout: a resharded copy (freed with its last reference), or
  the student itself when the two layouts are one."""
  if run.rollout_mesh is run.mesh:
    return run.student
  return sharding.relayout(run.student, run.rollout_mesh, run.rollout_rules)


def evaluate(run: Run, key) -> dict:
  """The eval report (kat_jax.evaluate) of the current student on the run's benchmarks."""
  return evaluate_lib.evaluate(rollout_student(run), run.tokenizer, run.benchmarks,
                               run.eval_cfg, key, eos_ids=run.eos_ids, pad_id=run.pad_id,
                               vocab_size=run.vocab_size, seed=run.config.seed)


def trained_params(run: Run, master=None):
  """What the optimizer updates and a checkpoint holds: the float32 master weights when the run
  keeps them, else the student's trained params (all of them, or a LoRA student's adapters)."""
  return master if master is not None else nnx.state(run.student, lora.trainable(run.student.cfg))


def init_master(run: Run):
  """A float32 copy of the student's trained params (optim.master), or None."""
  if run.master_dtype is None:
    return None
  return _cast(nnx.state(run.student, lora.trainable(run.student.cfg)), "float32")


_cast = jax.jit(opd.cast_params, static_argnames="dtype")


def _state_tree(run: Run, opt_state, th_state, master=None):
  return dict(params=trained_params(run, master), opt_state=opt_state, threshold=th_state)


def _checkpoint_meta(config) -> dict:
  """What a checkpoint's params are (checked on resume before anything loads): the adapters'
  shape and, since a LoRA checkpoint holds no base, which base they sit on; whether the params
  are float32 master weights."""
  lora_cfg = lora_config(config)
  meta = {"lora": {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
                   "targets": sorted(lora_cfg.targets) if lora_cfg.rank else []},
          "master": opd.uses_master(opd.OptimConfig(**config.optim),
                                    config.dtype or hf.default_dtype(), lora_cfg.rank)}
  if lora_cfg.rank:
    meta["base"] = hf.fingerprint(config.student)
  return meta


def _manager(run: Run, create: bool = True):
  return _checkpoints(run.workdir, run.config.keep_checkpoints, create)


def _checkpoints(workdir, keep: int, create: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager((Path(workdir) / "checkpoints").resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                    create=create))


def check_resume(config, workdir, data: bool = True) -> int | None:
  """The step a run in `workdir` resumes from (None: a fresh run), checked against the config
  before anything loads: the checkpoint's params must be what config.lora says (full params or
  adapters of that shape), and (`data`, training) the data stream must continue where the
  checkpoint left it."""
  ckpts = Path(workdir) / "checkpoints"
  if not ckpts.is_dir():
    return None
  manager = _checkpoints(workdir, config.keep_checkpoints, create=False)
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  # Checkpoints from before LoRA hold full params (rank 0); from before master weights, the
  # student's own params.
  want = _checkpoint_meta(config)
  saved = meta.get("lora", {"rank": 0})
  if saved.get("rank", 0) != want["lora"]["rank"] or (want["lora"]["rank"]
                                                       and saved != want["lora"]):
    raise ConfigError(
        f"config.lora={want['lora']}: the checkpoint at step {step} in {ckpts} was written with "
        f"lora={saved} (its params are "
        f"{'adapters of that shape' if saved.get('rank') else 'full'}); resume with the same "
        "config.lora, or start a new --workdir.")
  if "base" in meta and want.get("base") != meta["base"]:
    raise ConfigError(
        f"config.student={config.student!r}: the adapters in {ckpts} were trained on another base "
        f"({meta['base']['path']}); give that student, or start a new --workdir.")
  if meta.get("master", want["master"]) != want["master"]:
    raise ConfigError(
        f"config.optim.master={config.optim.master!r} (dtype {config.dtype or 'default'!r}): the "
        f"checkpoint at step {step} in {ckpts} {'holds' if meta['master'] else 'has no'} float32 "
        "master weights; resume with the settings it was written with (optim.master / dtype), "
        "or start a new --workdir.")
  position = meta.get("data_position")
  if data and position is not None and position != step * config.prompts_per_step:
    raise ConfigError(
        f"config.prompts_per_step={config.prompts_per_step}: the checkpoint at step {step} in "
        f"{ckpts} has consumed {position} prompts ({position // max(step, 1)} per step); "
        f"resuming with {config.prompts_per_step} per step would skip or repeat data. Resume "
        f"with prompts_per_step={position // max(step, 1)}, or start a new --workdir.")
  return step


def _restore(run: Run, manager, step, opt_state, th_state, master=None):
  """(opt_state, threshold state, master or None, meta) of checkpoint `step`; the student's
  params (the cast of a master) are updated in place."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          _state_tree(run, opt_state, th_state, master))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  params = restored["state"]["params"]
  if master is not None:
    nnx.update(run.student, _cast(params, run.master_dtype))
  else:
    nnx.update(run.student, params)
  return (restored["state"]["opt_state"], restored["state"]["threshold"],
          params if master is not None else None, restored["meta"])


def _load_latest(config, workdir) -> tuple[Run, int | None, object]:
  """The student (no teacher) with its params from the latest checkpoint in workdir (if any),
  and the checkpoint's float32 master weights (None if the run keeps none)."""
  run = setup(config, workdir, with_teacher=False)
  if not (run.workdir / "checkpoints").is_dir():
    return run, None, None
  manager = _manager(run, create=False)
  step = manager.latest_step()
  if step is not None:
    master = init_master(run)
    *_, master, _ = _restore(run, manager, step,
                             opd.init_optimizer(run.tx, trained_params(run, master)),
                             sharding.onto_mesh(threshold.init(), run.mesh), master)
  else:
    master = None
  return run, step, master


def export(config, workdir) -> Path:
  """mode=export: the latest checkpoint's student as a Hugging Face directory, DIR/export."""
  check_resume(config, workdir, data=False)  # a checkpoint of other adapters: a clear error
  run, step, master = _load_latest(config, workdir)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}; train first "
                            "(mode=train) with the same --workdir.")
  out = _export(run, run.workdir / "export", master)
  if _main_process():
    print(f"exported step {step} to {out}")
  return out


def evaluate_mode(config, workdir) -> dict:
  """mode=eval: the latest checkpoint in workdir (or the HF directory config.student if there is
  none) on config.eval.benchmarks; writes DIR/eval.json and prints the table."""
  check_resume(config, workdir, data=False)
  run, step, _ = _load_latest(config, workdir)
  report = evaluate(run, jax.random.fold_in(jax.random.key(config.seed), 2**31))
  report = dict(model=config.student if step is None else str(run.workdir / "checkpoints"),
                step=step, **report)
  if _main_process():
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nkat_jax eval of {report['model']}"
          + (f" (step {step})" if step is not None else ""))
    print(evaluate_lib.format_table(report))
  return report


@dataclasses.dataclass
class TrainState:
  """What a step changes besides the student's params (updated in place on `run.student`)."""
  opt_state: object
  th_state: object  # kat_jax.threshold.ThresholdState: the adaptive tau's statistics
  skips: int = 0  # consecutive non-finite (skipped) updates
  master: object = None  # float32 master weights of the trained params (optim.master), or None


def _rows_to(run: Run, mesh, rules):
  """[B, ...] rows into `mesh` / `rules`' batch sharding (between the training and rollout
  layouts; cheap next to a rollout); identity when the two layouts are one."""
  if run.rollout_mesh is run.mesh:
    return lambda tree: tree
  return lambda tree: sharding.reshard(
      tree, jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim, rules), tree))


def train_step(run: Run, state: TrainState, step: int, key):
  """One OPD step: the step's prompts -> fused student + teacher rollout with KAT (in the
  rollout layout) -> [the random-truncation ablation] -> the optax update on the trimmed batch
  -> the threshold's statistics. Returns (state, the rollout result on the host, the update and
  threshold metrics as floats, tau as a float, each rollout's (prompt, answer))."""
  config = run.config
  per_step = config.prompts_per_step * config.samples_per_prompt
  step_key = jax.random.fold_in(key, step)
  problems = run.source.batch(step * config.prompts_per_step, config.prompts_per_step)
  rows = [pa for pa in problems for _ in range(config.samples_per_prompt)]
  prompt, start = _encode(run, [p for p, _ in rows])
  if config.kat.mode == "horizon":  # TOPD / POPD: the step's horizon is the traced threshold
    tau = jnp.float32(kat.horizon_at(step, run.rollout_cfg.kat, config.max_new_tokens))
  else:
    tau = threshold.tau(state.th_state, step, run.threshold_cfg)
  s_graph, s_now, s_frozen = lora.split(run.student)
  t_graph, t_params = nnx.split(run.teacher)
  # Rollouts KAT never stops, so the adaptive tau sees uncensored windows (kat_jax/threshold.py).
  probes = threshold.num_probes(per_step, run.threshold_cfg, config.kat.mode)
  probe_B = sharding.put_batch(threshold.probe_mask(per_step, probes, config.seed, step),
                               run.rollout_mesh, run.rollout_rules)
  to_rollout = _rows_to(run, run.rollout_mesh, run.rollout_rules)
  result = rollout.rollout(rollout_student(run), run.teacher, *to_rollout((prompt, start)),
                           jax.random.fold_in(step_key, 0), run.rollout_cfg,
                           tau=tau, spike_tau=config.kat.spike_tau, probe_B=probe_B,
                           batch_multiple=sharding.batch_shards(run.rollout_mesh,
                                                                run.rollout_rules))
  result = _rows_to(run, run.mesh, sharding.DEFAULT_RULES)(result)
  if config.kat.mode == "random":
    result = rollout.apply_random_truncation(result, jax.random.fold_in(step_key, 1),
                                             run.random_lengths)
  new_params, opt_state, m = opd.update(
      s_graph, trained_params(run, state.master), t_graph, t_params, state.opt_state, prompt,
      start, opd.trim(result, config.kat.window, config.loss.chunk) if config.loss.trim else result,
      tx=run.tx, cfg=run.loss_cfg, batch_shards=sharding.batch_shards(run.mesh),
      s_frozen=s_frozen, master_cast=run.master_dtype)
  del s_now  # the student's trained params, replaced below (donated when they are the ones updated)
  master = None
  if run.master_dtype is not None:  # the rollout and the forward use the low-precision copy
    master = new_params
    nnx.update(run.student, _cast(new_params, run.master_dtype))
  else:
    nnx.update(run.student, new_params)
  # A skipped (non-finite) update's rollout does not feed the threshold either.
  th_state, th_m = threshold.observe(state.th_state, result.windows(config.kat.window),
                                     run.threshold_cfg, accept=~m["skipped"])
  res = sharding.to_host(result)  # gathered across processes on a multi-host mesh
  m = {k: float(v) for k, v in sharding.to_host({**m, **th_m}).items()}
  skips = state.skips + 1 if m["skipped"] else 0
  return (TrainState(opt_state, th_state, skips, master), res, m, float(sharding.to_host(tau)),
          rows)


def train(config, workdir) -> dict:
  """The main job: `train_step` for config.steps steps, with evaluation before / during / after,
  logging (kat_jax.metrics) and checkpoints. Returns the final summary (also printed)."""
  check_resume(config, workdir)
  run = setup(config, workdir)
  main = _main_process()
  run.workdir.mkdir(parents=True, exist_ok=True)
  if main:
    (run.workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  # Optimizer moments follow the params' shardings; scalars (step counts, the KAT threshold)
  # are replicated over the mesh, and checkpoints restore them that way.
  master = init_master(run)
  opt_state = opd.init_optimizer(run.tx, trained_params(run, master))
  th_state = sharding.onto_mesh(threshold.init(), run.mesh)
  manager = _manager(run)
  start_step, meta = 0, {"consecutive_skips": 0}
  latest = manager.latest_step()
  if latest is not None:
    opt_state, th_state, master, meta = _restore(run, manager, latest, opt_state, th_state, master)
    start_step = latest
    if main:
      print(f"resumed from {run.workdir / 'checkpoints'} at step {latest}", flush=True)
  state = TrainState(opt_state, th_state, int(meta.get("consecutive_skips", 0)), master)

  key = jax.random.key(config.seed)
  logger = metrics.Logger(run.workdir, main, config.log_rollouts, config.log_samples > 0)
  eval_key = jax.random.fold_in(key, 2**31)  # the same draws before and after: a paired comparison
  before = (evaluate(run, eval_key)
            if start_step == 0 and run.benchmarks and config.eval_before else None)
  if before:
    logger.log(0, {f"eval/{k}": v for k, v in evaluate_lib.flat_metrics(before).items()})
    if main:  # written now, so that a run stopped mid-way and resumed still reports it
      (run.workdir / "eval_before.json").write_text(json.dumps(before, indent=2) + "\n")
  elif start_step and (run.workdir / "eval_before.json").is_file():
    before = json.loads((run.workdir / "eval_before.json").read_text())
  # The run's token and row counts so far travel in the checkpoint, so a resumed run's summary
  # covers every step (a checkpoint written before they did: from the resumed step on, and the
  # summary says so in `counted_from_step`).
  totals = metrics.Totals(**meta.get("totals", {}))
  counted_from = start_step if start_step and "totals" not in meta else 0
  progress = metrics.progress(config.steps, start_step) if main else None
  for step in range(start_step, config.steps):
    t0 = time.perf_counter()
    state, res, m, tau, rows = train_step(run, state, step, key)
    rec, counts, loop_B = metrics.step_record(res, m, tau, config.max_new_tokens,
                                              time.perf_counter() - t0)
    totals.add(counts)
    if state.skips >= config.max_consecutive_skips:
      raise TrainingStopped(
          f"step {step + 1}: {state.skips} consecutive non-finite updates (loss {m['loss']}); "
          f"stopped without saving. The last good checkpoint is step {manager.latest_step()} in "
          f"{run.workdir / 'checkpoints'}; lower optim.learning_rate or check the models.")
    if config.eval_every and (step + 1) % config.eval_every == 0 and run.benchmarks:
      report = evaluate(run, jax.random.fold_in(jax.random.fold_in(key, step), 2))
      rec.update({f"eval/{k}": v for k, v in evaluate_lib.flat_metrics(report).items()})
    logger.log(step + 1, rec)
    logger.log_rollouts(step + 1, res, loop_B)
    if main and config.log_samples and (step == start_step or step + 1 == config.steps
                                        or (step + 1) % config.log_samples_every == 0):
      logger.log_samples(step + 1, metrics.sample_rows(
          res, loop_B, [p for p, _ in rows], [a for _, a in rows],
          lambda ids: run.tokenizer.decode(ids, skip_special_tokens=False), config.log_samples,
          config.data.extract))
    if progress:
      progress.update(1)
      progress.set_postfix(loss=f"{rec['loss']:.3f}", kl=f"{rec['kl']:.3f}",
                           trap=f"{rec['trap_rate']:.2f}", tau=f"{rec['tau']:.3g}")
    if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
      manager.save(step + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state_tree(run, state.opt_state, state.th_state,
                                                  state.master)),
          meta=ocp.args.JsonSave({"consecutive_skips": state.skips,
                                  "totals": dataclasses.asdict(totals),
                                  "data_position": (step + 1) * config.prompts_per_step,
                                  **_checkpoint_meta(config)})))
  manager.wait_until_finished()
  if progress:
    progress.close()
  after = evaluate(run, eval_key) if run.benchmarks else None
  if after:
    logger.log(config.steps, {f"final/{k}": v
                              for k, v in evaluate_lib.flat_metrics(after).items()})
  logger.close()
  if after and main:  # eval_before.json was written when it was evaluated
    (run.workdir / "eval_after.json").write_text(json.dumps(after, indent=2) + "\n")
  summary = totals.summary(config.steps, run.eval_cfg.k, before, after)
  if counted_from:
    summary["counted_from_step"] = counted_from + 1
  if config.export:
    _export(run, run.workdir / "export", state.master)
    summary["export"] = str(run.workdir / "export")
    if run.student.cfg.lora.rank:
      summary["export_adapter"] = str(run.workdir / "export_adapter")
  if main:
    (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics.print_table(summary, counted_from)
    print(f"dashboard: {dashboard.build(run.workdir)}")
  return summary


def _export(run: Run, out: Path, master=None) -> Path:
  """The student as an HF directory; params are gathered from every process, process 0 writes.

  A LoRA student: `out` holds the merged weights, and `out`_adapter the PEFT adapter directory
  (kat_jax/lora.py). With master weights, the export is made from the float32 master (cast to
  the checkpoint's dtype once, not twice)."""
  if master is not None:
    nnx.update(run.student, master)
  state = sharding.to_host(nnx.state(run.student))
  if _main_process():
    nnx.update(run.student, state)
    lora.save_merged(run.student, run.s_cfg, out, tokenizer_dir=run.config.student,
                     overwrite=True)
    if run.student.cfg.lora.rank:
      lora.save_peft(run.student, out.with_name(out.name + "_adapter"),
                     base_model=Path(run.config.student).resolve(), overwrite=True)
  return out
