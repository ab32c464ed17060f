"""Per-device memory plan of an OPD run, computed before anything loads or compiles.

    python -m kat_jax.memory --config configs/qwen3_opd.py --devices 16 --mesh 1,16,1 \
        --device-memory-gb 16                      # e.g. a TPU v5e-16 slice
    python -m kat_jax.aot --config configs/qwen3_opd.py --topology v5e:4x4
                                                   # the TPU compiler's own figures

Every item is bytes per device on a (data, fsdp, tensor) mesh:
  params        student + teacher, each tensor divided by the mesh axes its logical names map to
                (kat_jax.sharding rules; exact, from the abstract model);
  optimizer     AdamW's two moments (shaped and sharded like the student's params), plus an fp32
                gradient sum with optim.accumulation_steps > 1; a LoRA student's: of its fp32
                adapters only; with master weights (optim.master): fp32, plus the master copy;
  gradients     one tree shaped like the trained params, alive during the update;
  kv caches     both models, [slots/(data*groups), kv_heads/tensor, prompt + max_new_tokens,
                head_dim], slots = rollout.slots or the batch B
                in the rollout's layout (kat_jax.sharding.ROLLOUT_RULES: tensor-parallel groups,
                the batch over the groups), where the teacher lives and the student is copied
                for each rollout;
  rollout       per-token buffers, carried logits and one window's full-vocabulary distributions;
  activations   what the update's backward keeps: per layer a few copies of the attention scores
                (B*H*S^2), of the MLP hidden (B*S*I) and of the residual stream (B*S*E), plus ~3
                copies of the student's [B, T, V] logits (and the teacher's logits for the
                full-vocabulary objectives). The copy counts were fitted to XLA's compiled memory
                analysis (tests check the plan stays within 20% of it on small configs);
  LM head       with FSDP (embed sharded), the update gathers the [V, E] head / embedding to
                every device (one compute-dtype copy alive at a time) and forms its full fp32
                gradient before reduce-scattering it (not for a LoRA student, whose head is
                frozen): V x E x (compute bytes + 4), read off
                XLA:TPU's memory report of Qwen3-1.7B on v5e:4x4 (1.16 GiB f32 + 0.58 GiB bf16
                of its 3.9 GiB of temporaries);
  stacked layers with scan_layers, the scan's [L, ...] copy of the layer params and its gradient.
The peak is params + optimizer + max(rollout phase, update phase).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from kat_jax import config as config_lib
from kat_jax.configfile import load_config
from kat_jax.opd import OptimConfig, uses_master
from kat_jax.hf import read_config
from kat_jax.models import ConfigError, ModelConfig, Transformer
from kat_jax.models.transformer import LoRAParam
from kat_jax.sharding import DEFAULT_RULES, ROLLOUT_RULES, logical_to_spec, rollout_tensor

# Copies kept by the update's backward, fitted on XLA's memory analysis (see module docstring).
# [B, H, S, S] per layer, fp32 whatever the compute dtype (the softmax's exp), plus one cast copy
# for the value matmul when computing in bf16 / fp16 (softmax normalised after that matmul).
SCORE_COPIES = 2.0
MLP_COPIES = 5.0  # [B, S, I] per layer
RESIDUAL_COPIES = 5.5  # [B, S, E] per layer
LOGIT_COPIES = 3.2  # [B, T, V] fp32
GiB = 1024 ** 3


@dataclasses.dataclass
class Plan:
  mesh: tuple[int, int, int]
  items: dict[str, float]  # bytes per device
  rollout_phase: float
  update_phase: float
  peak: float
  device_memory: float | None

  @property
  def fits(self) -> bool:
    return self.device_memory is None or self.peak <= 0.9 * self.device_memory

  def table(self) -> str:
    lines = [f"memory plan per device, mesh (data, fsdp, tensor) = {self.mesh}:"]
    for name, value in self.items.items():
      lines.append(f"  {name:<28} {value / GiB:9.2f} GiB")
    lines.append(f"  {'rollout phase peak':<28} {self.rollout_phase / GiB:9.2f} GiB")
    lines.append(f"  {'update phase peak':<28} {self.update_phase / GiB:9.2f} GiB")
    cap = (f" of {self.device_memory / GiB:.1f} GiB (90% usable)" if self.device_memory
           else " (device memory unknown)")
    lines.append(f"  {'total peak':<28} {self.peak / GiB:9.2f} GiB{cap}")
    return "\n".join(lines)


def _fake_mesh(shape):
  return types.SimpleNamespace(shape=dict(zip(("data", "fsdp", "tensor"), shape)))


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: ModelConfig) -> tuple:
  """(shape, logical names, in a block?) of every param: one abstract build per architecture
  (a plan tries every mesh; building Qwen3-8B abstractly takes ~1 s)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  out = []
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    shape = var.get_value().shape
    out.append((shape, var.get_metadata().get("out_sharding") or (None,) * len(shape),
                path[0] == "layers", isinstance(var, LoRAParam)))
  return tuple(out)


def param_bytes(cfg: ModelConfig, mesh_shape, dtype_bytes: int, rules=DEFAULT_RULES,
                layers_only: bool = False, part: str = "all") -> float:
  """Per-device bytes of a model's params on the mesh (exact: logical names of each tensor);
  layers_only: the blocks' params alone (what a scan over layers stacks). part: 'all', 'base'
  (without LoRA adapters) or 'lora' (the adapters alone). Adapters are float32 whatever
  `dtype_bytes` (kat_jax/lora.py)."""
  mesh = _fake_mesh(mesh_shape)
  total = 0.0
  for shape, names, in_block, adapter in _param_shapes(cfg):
    if (layers_only and not in_block) or (part == "base" and adapter) or (
        part == "lora" and not adapter):
      continue
    spec = logical_to_spec(names, shape, mesh, rules)
    shards = 1
    for axes in spec:
      for a in (axes,) if isinstance(axes, str) else (axes or ()):
        shards *= mesh.shape[a]
    total += np.prod(shape) * (4 if adapter else dtype_bytes) / shards
  return float(total)


def _split(n: int, ways: int) -> float:
  """Per-device share of a dimension of size n split `ways` ways (replicated if it does not divide,
  as the sharding rules do)."""
  return n / ways if ways > 1 and n % ways == 0 else n


def rollout_shape(mesh_shape, tensor: int) -> tuple[int, int, int]:
  """The rollout mesh of `sharding.rollout_mesh`: (data, groups, tensor); `mesh_shape` itself
  for tensor 0 (the rollout in the training layout)."""
  if not tensor:
    return tuple(mesh_shape)
  data = mesh_shape[0]
  return (data, int(np.prod(mesh_shape)) // (data * tensor), tensor)


def plan(student: ModelConfig, teacher: ModelConfig, mesh_shape, *, batch: int, prompt_len: int,
         max_new_tokens: int, window: int, vocab: int, param_bytes_s: int = 4,
         param_bytes_t: int = 4, compute_bytes: int = 4, objective: str = "sampled_pg",
         remat: bool = False, microbatches: int = 1, loss_chunk: int = 0, attn_chunk: int = 0,
         accumulation_steps: int = 1, rollout_tensor_parallel: int = 0,
         scan_layers: bool = False, device_memory: float | None = None,
         slots: int = 0, master: bool = False, shared_base: bool = False) -> Plan:
  """rollout_tensor_parallel: the rollout's tensor-parallel degree (resolved, as
  sharding.resolve_rollout_tensor gives it); 0 = the rollout in the training layout.
  slots: the rollout's decode rows (rollout.slots; 0 = batch): the KV caches and the loop's
  buffers hold `slots` rows, the finished rollouts wait in [batch, T] result buffers.
  A student with LoRA adapters (student.lora.rank) trains them alone: its optimizer state and
  gradients are adapter-sized (float32). master: float32 master weights of the student's params
  (optim.master), with float32 moments and gradients. shared_base: the teacher is the LoRA
  student's own base (self-distillation), no second copy."""
  data, fsdp, tensor = mesh_shape
  master = master and not student.lora.rank  # adapters are float32: no master copy
  b = batch / (data * fsdp)  # rows per device in the update
  tp = rollout_tensor_parallel if rollout_tensor_parallel > 1 else 0
  r_shape = rollout_shape(mesh_shape, tp)
  r_rules = ROLLOUT_RULES if tp else DEFAULT_RULES
  b_r = (slots or batch) / (r_shape[0] * r_shape[1])  # decode rows per device in the rollout
  t = -(-max_new_tokens // window) * window
  s_len = prompt_len + t
  items = {}
  items["student params"] = param_bytes(student, mesh_shape, param_bytes_s)
  if tp:  # a copy in the rollout's layout, alive during the rollout only
    items["student params (rollout copy)"] = param_bytes(student, r_shape, param_bytes_s, r_rules)
  # The trained params: a LoRA student's float32 adapters, else all of the student's params (in
  # float32 when master weights are kept: the master, its moments and its gradient).
  if student.lora.rank:
    trained = param_bytes(student, mesh_shape, param_bytes_s, part="lora")
  else:
    trained = items["student params"] * (4 / param_bytes_s if master else 1)
  if master:
    items["master weights (fp32)"] = trained
  items["teacher params"] = (0.0 if shared_base
                             else param_bytes(teacher, r_shape, param_bytes_t, r_rules))
  items["optimizer (AdamW)"] = 2 * trained
  if accumulation_steps > 1:  # opd.token_weighted_accumulation: an fp32 gradient sum
    fp32 = master or student.lora.rank  # the trained params are float32 already
    items["optimizer (AdamW)"] += trained * (1 if fp32 else 4 / param_bytes_s)
  items["gradients"] = trained
  for name, c in (("student", student), ("teacher", teacher)):
    items[f"{name} kv cache"] = (c.num_layers * 2 * b_r * _split(c.num_kv_heads, r_shape[2])
                                 * s_len * c.head_dim * compute_bytes)
  v_r = _split(vocab, r_shape[2])
  # Per token: tokens, three log-probs, KL, top-k overlap, and the windows' statistics.
  items["rollout buffers"] = b_r * (7 * t * 4 + 2 * v_r * 4 + 6 * window * v_r * 4)
  if slots and slots < batch:  # the parked results of every rollout of the step
    items["rollout buffers"] += batch / (r_shape[0] * r_shape[1]) * 7 * t * 4
  v = _split(vocab, tensor)
  c = student
  h, i, e = _split(c.num_heads, tensor), _split(c.intermediate_size, tensor), c.hidden_size
  score_bytes = SCORE_COPIES * 4 + (compute_bytes if compute_bytes < 4 else 0)
  scores = score_bytes * b * h * s_len * s_len  # one layer's, unchunked
  if attn_chunk and attn_chunk < s_len:
    # Query chunks under jax.checkpoint: one chunk's scores live at a time, in any layer.
    once, scores = score_bytes * b * h * attn_chunk * s_len, 0.0
  else:
    once = 0.0
  per_layer = scores + compute_bytes * b * (MLP_COPIES * s_len * i + RESIDUAL_COPIES * s_len * e)
  if remat:  # jax.checkpoint per block: each layer keeps its input; one layer's internals live
    layers = c.num_layers * b * s_len * e * compute_bytes + per_layer + once
  else:
    layers = c.num_layers * per_layer + once
  positions = min(loss_chunk, t) if loss_chunk else t  # loss.chunk: one chunk's logits at a time
  logits = LOGIT_COPIES * b * positions * v * 4
  if objective != "sampled_pg":  # the teacher's logits (no gradient) and their log-softmax
    logits += 2 * b * positions * v * 4
  # Micro-batches run one after another: one chunk's activations live at a time (each chunk's
  # gradient is added into the running sum in place).
  items["activations (update)"] = (layers + logits) / microbatches
  frozen_head = bool(student.lora.rank)  # a LoRA student's head gets no gradient
  if fsdp > 1 and e % fsdp == 0:  # see the module docstring (LM head)
    items["LM head gathered (update)"] = _split(c.vocab_size, tensor) * e * (
        compute_bytes + (0 if frozen_head else 4))
  if scan_layers:  # the stacked block params and their gradient (a LoRA student's: adapters')
    stacked = param_bytes(student, mesh_shape, param_bytes_s, layers_only=True)
    items["stacked layers (scan)"] = stacked + (
        param_bytes(student, mesh_shape, param_bytes_s, layers_only=True, part="lora")
        if student.lora.rank else stacked)
    if objective != "sampled_pg":  # the teacher's scoring forward stacks its blocks too
      items["stacked layers (scan)"] += param_bytes(teacher, r_shape, param_bytes_t, r_rules,
                                                    layers_only=True)
  batch_in = b * (prompt_len + 10 * t) * 4  # prompts and the rollout's per-token outputs
  resident = (items["student params"] + items["teacher params"] + items["optimizer (AdamW)"]
              + items.get("master weights (fp32)", 0.0))
  rollout_phase = (items["student kv cache"] + items["teacher kv cache"] + items["rollout buffers"]
                   + items.get("student params (rollout copy)", 0.0))
  if master:  # the update's forward reads the master cast to bf16
    items["master cast (update)"] = items["student params"]
  update_phase = (items["gradients"] + items["activations (update)"] + batch_in
                  + items.get("master cast (update)", 0.0)
                  + items.get("LM head gathered (update)", 0.0)
                  + items.get("stacked layers (scan)", 0.0))
  peak = resident + max(rollout_phase, update_phase)
  return Plan(tuple(mesh_shape), items, resident + rollout_phase, resident + update_phase, peak,
              device_memory)


def meshes(n_devices: int):
  """Every (data, fsdp, tensor) with product n_devices."""
  for d in range(1, n_devices + 1):
    for f in range(1, n_devices // d + 1):
      if n_devices % (d * f) == 0:
        yield (d, f, n_devices // (d * f))


def device_memory_bytes() -> float | None:
  """The first device's memory limit when the backend reports one (GPU / TPU), else None."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


# Published architectures (their config.json numbers), so a plan can be made on a machine that
# has not downloaded the weights: a model path whose last component names one of these is used
# when the directory does not exist.
KNOWN = {
    "Qwen3-0.6B": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       intermediate_size=3072, tie_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                       intermediate_size=6144, tie_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                     intermediate_size=9728, tie_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                     intermediate_size=12288, tie_embeddings=False),
    "Qwen3-14B": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8,
                      intermediate_size=17408, tie_embeddings=False),
    "Qwen3-32B": dict(hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                      intermediate_size=25600, tie_embeddings=False),
}


def model_config(path: str, dtype: str) -> ModelConfig:
  if Path(path).is_dir():
    return read_config(Path(path), param_dtype=dtype, dtype=dtype)
  name = Path(path).name
  if name not in KNOWN:
    raise FileNotFoundError(f"{path!r} is not a model directory and not a known architecture "
                            f"({', '.join(KNOWN)}); give a local Hugging Face directory.")
  return ModelConfig(family="qwen3", vocab_size=151936, head_dim=128, qk_norm=True,
                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                     eos_token_ids=(151645,), pad_token_id=151643, param_dtype=dtype, dtype=dtype,
                     **KNOWN[name])


def write_known_config(out_dir, name: str, layers: int | None = None) -> str:
  """A model directory holding only the config.json of a KNOWN architecture (optionally cut to
  `layers` blocks): what the memory plan and the compile check read, no weights."""
  cfg = model_config(name, "bfloat16")
  if layers is not None:
    cfg = cfg.replace(num_layers=layers)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True)
  (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
  return str(out_dir)


def for_config(config, mesh_shape, device_memory: float | None, accelerator: bool) -> Plan:
  """The plan of a training config (reads both models' config.json only, or KNOWN)."""
  dtype = config.dtype or ("bfloat16" if accelerator else "float32")
  nbytes = 2 if dtype in ("bfloat16", "float16") else 4
  lora = config_lib.lora_config(config)
  s = model_config(config.student, dtype).replace(lora=lora)
  t = model_config(config.teacher, dtype)
  # Auto (0) is 1 on accelerators; on CPU the update picks its chunks from each step's trimmed,
  # bucketed shapes, which can hold more tokens than a chunk of the full length would -- so the
  # plan counts the whole batch at once, an upper bound for any chunking.
  microbatches = config.loss.microbatches or 1
  n = int(np.prod(mesh_shape))
  tp = config.mesh.get("rollout_tensor", 0)
  # A self-distilled teacher shares the student's base: both stay in the training layout.
  tp = 0 if tp == -1 or config_lib.shares_base(config) else (
      tp or rollout_tensor(n, mesh_shape[0], (s, t)))
  return plan(s, t, mesh_shape, batch=config.prompts_per_step * config.samples_per_prompt,
              prompt_len=config.max_prompt_len, max_new_tokens=config.max_new_tokens,
              window=config.kat.window, vocab=min(s.vocab_size, t.vocab_size),
              param_bytes_s=nbytes, param_bytes_t=nbytes, compute_bytes=nbytes,
              objective=config.loss.objective, remat=config.remat,
              microbatches=microbatches, loss_chunk=config.loss.chunk,
              attn_chunk=config.attn_chunk,
              accumulation_steps=config.optim.accumulation_steps, rollout_tensor_parallel=tp,
              scan_layers=config.get("scan_layers", False), device_memory=device_memory,
              slots=config.rollout.slots,
              master=uses_master(OptimConfig(**config.optim), dtype, lora.rank),
              shared_base=config_lib.shares_base(config))


def plans(config, n_devices: int, device_memory: float | None, accelerator: bool):
  """The plan of every mesh of n_devices the batch can be split over (validate's rule)."""
  batch = config.prompts_per_step * config.samples_per_prompt
  for shape in meshes(n_devices):
    if batch % (shape[0] * shape[1] * max(config.loss.microbatches, 1)) == 0:
      yield for_config(config, shape, device_memory, accelerator)


def check(config, mesh_shape, n_devices: int, device_memory: float | None,
          accelerator: bool) -> Plan:
  """The plan, or a ConfigError naming a mesh that fits (or what else to change)."""
  p = for_config(config, mesh_shape, device_memory, accelerator)
  if p.fits:
    return p
  # The fitting mesh with the most data parallelism, then FSDP.
  better = max((q for q in plans(config, n_devices, device_memory, accelerator) if q.fits),
               key=lambda q: q.mesh[:2], default=None)
  need = f"needs {p.peak / GiB:.1f} GiB per device but the devices have {device_memory / GiB:.1f}"
  if better is not None:
    d, f, t = better.mesh
    fix = (f"use --config.mesh.data={d} --config.mesh.fsdp={f} --config.mesh.tensor={t} "
           f"(peak {better.peak / GiB:.1f} GiB)")
  else:
    fix = ("no (data, fsdp, tensor) mesh of these devices fits: "
           + ("" if config.remat else "set --config.remat=True, ")
           + "lower prompts_per_step / samples_per_prompt / max_new_tokens, or use more devices")
  raise ConfigError(f"config.mesh={tuple(p.mesh)}: the run {need}; {fix}.\n{p.table()}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Per-device memory plan of a training config.")
  parser.add_argument("--config", required=True, help="config file[:arg]")
  parser.add_argument("--devices", type=int, required=True)
  parser.add_argument("--mesh", default="", help="data,fsdp,tensor (default: best that fits)")
  parser.add_argument("--device-memory-gb", type=float, required=True)
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  config.dtype = args.dtype
  mem = args.device_memory_gb * GiB
  if args.mesh:
    shown = [for_config(config, tuple(int(x) for x in args.mesh.split(",")), mem, True)]
  else:
    shown = [p for p in plans(config, args.devices, mem, True) if p.fits]
  for p in shown:
    print(p.table() + ("" if p.fits else "\n  -> does NOT fit") + "\n")
  if not shown:
    print(f"no mesh of {args.devices} devices fits {args.device_memory_gb} GiB per device.")


if __name__ == "__main__":
  main()
