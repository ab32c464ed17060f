"""LoRA students: low-rank adapters on a frozen base, trained, checkpointed and exported.

An adapted projection computes W x + (alpha / r) (x A) B (kat_jax/models/transformer.py:
`_project`); A [in, r] and B [r, out] are `LoRAParam`s (a Param subclass) in float32, B = 0 at
the start. Training differentiates and optimises the `LoRAParam`s only (`split` hands the update
the adapters and the frozen rest separately), so the optimizer state is adapter-sized and the base
stays bit-identical. The fused rollout decodes with the adapted student as it is: two rank-r
matmuls per projection and token, and no merged copy of the weights in memory.

Why not qwix's LoRA provider (what Tunix uses): it finds the projections by intercepting
`jax.lax.dot_general` / `jnp.einsum` calls inside a wrapped module method and creates the adapter
params lazily, on the first traced call. Our projections are `jnp.matmul`s of weights reshaped to
2-D (kat_jax/models/transformer.py: `_dense`, ~3x faster backward on XLA CPU), the fused rollout
runs the model's `decode` inside a `lax.while_loop` on `nnx.split` state, and the update may run
the blocks as a `lax.scan` over stacked params: params created during tracing have no place in
either. Adapters declared with the model, with logical axis names, also shard by the same rules
as the base (kat_jax/sharding.py) and convert to PEFT's layout by the same maps as the weights.

Exports (`save_merged`, `save_peft`): the merged weights W + (alpha / r) A B as an ordinary HF
directory, and a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base, DIR)` loads onto the base. The merged weights are stored
in the base's dtype: a bf16 base rounds W + (alpha / r) A B to bf16, where small adapter updates
are a few ulps -- the PEFT directory (float32 adapters) is the exact artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from kat_jax import hf
from kat_jax import safetensors_io as st
from kat_jax.models import LoraConfig, ModelConfig, Transformer
from kat_jax.models.config import LORA_TARGETS
from kat_jax.models.transformer import LoRAParam

# Where each target sits in a block, and its HF module path.
_MODULE = {"q_proj": ("attn", "self_attn"), "k_proj": ("attn", "self_attn"),
           "v_proj": ("attn", "self_attn"), "o_proj": ("attn", "self_attn"),
           "gate_proj": ("mlp", "mlp"), "up_proj": ("mlp", "mlp"), "down_proj": ("mlp", "mlp")}


def parse_targets(value) -> tuple[str, ...]:
  """'all' or 'q_proj,v_proj' (a config string) or a sequence -> a tuple of targets."""
  if isinstance(value, str):
    value = LORA_TARGETS if value.strip() == "all" else [t.strip() for t in value.split(",")
                                                           if t.strip()]
  return tuple(value)


def trainable(cfg: ModelConfig):
  """The nnx filter of what an update trains: the adapters of a LoRA student, else every Param."""
  return LoRAParam if cfg.lora.rank else nnx.Param


def split(model: Transformer):
  """(graph, trained params, frozen rest) of a student: `nnx.merge(graph, trained, frozen)`
  rebuilds it. For full fine-tuning the rest is empty."""
  return nnx.split(model, trainable(model.cfg), ...)


def _pairs(model: Transformer):
  """(layer, target, A [in, r] float32, B [r, out] float32) of every adapter, on the host."""
  for i, layer in enumerate(model.layers):
    for target, (where, _) in _MODULE.items():
      module = getattr(layer, where)
      a = getattr(module, f"{target}_lora_a", None)
      if a is None:
        continue
      b = getattr(module, f"{target}_lora_b")
      a_np = np.asarray(jax.device_get(a.get_value()), np.float32)
      b_np = np.asarray(jax.device_get(b.get_value()), np.float32)
      r = a_np.shape[-1]
      yield i, target, a_np.reshape(-1, r), b_np.reshape(r, -1)


def _plain(model: Transformer, state) -> Transformer:
  """An adapter-free Transformer of `model`'s architecture over `state` (its params without
  adapters), with `model`'s runtime settings (remat, chunks, scan, activation shardings)."""
  plain_cfg = model.cfg.replace(lora=LoraConfig())
  graph, _ = nnx.split(nnx.eval_shape(lambda: Transformer(plain_cfg, rngs=nnx.Rngs(0))))
  plain = nnx.merge(graph, state)
  for attr in ("remat", "attn_chunk", "scan_layers", "act_sharding", "cache_sharding"):
    setattr(plain, attr, getattr(model, attr))
  return plain


def merged(model: Transformer) -> Transformer:
  """A plain (adapter-free) Transformer holding W + (alpha / r) A B, merged in float32 and stored
  in the base's param dtype. The unadapted params are shared with `model`, not copied."""
  base = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))))
  scale = model.cfg.lora.scale
  for i, target, a, b in _pairs(model):
    where = _MODULE[target][0]
    var = base[("layers", i, where, target)]
    w = np.asarray(jax.device_get(var.get_value()), np.float32)
    w = w + scale * (a @ b).reshape(w.shape)
    old = var.get_value()
    new = w.astype(old.dtype)  # ml_dtypes: numpy casts to bfloat16 too
    if isinstance(old, jax.Array):  # else host arrays (an export gathers the params first)
      new = jax.device_put(new, old.sharding)
    base[("layers", i, where, target)] = var.replace(new)
  return _plain(model, nnx.from_flat_state(list(base.items())))


def base_view(model: Transformer) -> Transformer:
  """The base model with the adapters off: a plain Transformer over the *same* arrays (no copy),
  the teacher of a self-distillation whose student is the teacher plus adapters."""
  return _plain(model, nnx.state(model, nnx.Not(LoRAParam)))


def save_merged(model: Transformer, config: ModelConfig, out_dir, tokenizer_dir=None, **kw) -> Path:
  """The adapted model as an ordinary HF directory (merged weights; `transformers` loads it)."""
  plain = model if not model.cfg.lora.rank else merged(model)
  return hf.save(plain, config.replace(lora=LoraConfig()), out_dir, tokenizer_dir, **kw)


def peft_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """PEFT's adapter tensors: lora_A.weight [r, in] and lora_B.weight [out, r] per projection.

  Our A [*in, r] and B [r, *out] flatten their multi-axis sides heads-major -- q/k/v outputs
  (n, d), o_proj inputs (h, d) -- which is the feature order of HF's weights (hf.param_map's
  `heads_in` / `heads_out`), so every target converts by one transpose.
  """
  out = {}
  for i, target, a, b in _pairs(model):
    name = f"base_model.model.model.layers.{i}.{_MODULE[target][1]}.{target}"
    out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return out


def save_peft(model: Transformer, out_dir, base_model: str | os.PathLike = "",
              overwrite: bool = False) -> Path:
  """A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors (float32).
  An existing non-empty `out_dir` is refused unless `overwrite`."""
  lora = model.cfg.lora
  if not lora.rank:
    raise ValueError("save_peft: the model has no adapters (lora.rank=0).")
  out_dir = Path(out_dir)
  if not overwrite:
    hf.check_new_directory(out_dir, "pass overwrite=True to replace it")
  tensors = peft_tensors(model)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
      "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
      "target_modules": sorted(lora.targets), "fan_in_fan_out": False, "use_rslora": False,
      "init_lora_weights": True if lora.init == "kaiming" else "gaussian",
      "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
  }
  with hf.atomic_directory(out_dir) as tmp:
    st.write_file(tmp / "adapter_model.safetensors", tensors)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return out_dir
