"""Architecture description of a decoder-only LM, read from / written to HF `config.json`.

One frozen (hashable) dataclass covers the Llama, Qwen2 and Qwen3 families; the differences between
them are three switches (`qkv_bias`, `o_bias`, `qk_norm`). Being hashable lets the config sit on an
NNX module as static data, so a jitted function recompiles only when the architecture changes.

Both `config.json` layouts found in the wild are read:
  * transformers 4.x (published Qwen3 / Llama 3 checkpoints): top-level `rope_theta`, `rope_scaling`,
    `torch_dtype`;
  * transformers 5.x: `rope_parameters` (holding `rope_theta` and the scaling keys), `dtype`.
`to_hf()` writes both spellings so that either major version of transformers (and tools that read
4.x configs) loads an export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kat_jax.errors import ConfigError

# Supported architectures -> family. Anything else is refused with a clear error.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCH_OF_FAMILY = {v: k for k, v in ARCHITECTURES.items()}

# RoPE variants implemented in `rope_inv_freq`; others (yarn, dynamic, longrope) are refused.
ROPE_TYPES = ("default", "linear", "llama3")

DTYPES = ("float32", "bfloat16", "float16")

# The projections a LoRA adapter can sit on (PEFT's `target_modules` names for these families).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on a frozen base (kat_jax/lora.py): W x + (alpha / rank) (x A) B, with
  A [in, rank] and B [rank, out].

  rank 0 = no adapters. init: the adapters' A as PEFT's default (`kaiming`: Kaiming-uniform with
  a = sqrt(5), the torch Linear init) or `gaussian` (normal, std 1 / rank); B is zero either way,
  so the adapted model starts equal to the base. Adapters are float32 whatever the base's dtype
  (as PEFT keeps them), cast to the compute dtype in the forward pass.
  """
  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS
  init: str = "kaiming"

  def __post_init__(self):
    if not isinstance(self.rank, (int, np.integer)) or self.rank < 0:
      raise ConfigError(f"lora.rank={self.rank!r} must be an integer >= 0 (0 = no adapters).")
    if self.rank and self.alpha <= 0:
      raise ConfigError(f"lora.alpha={self.alpha} must be > 0 (the scale is alpha / rank).")
    bad = [t for t in self.targets if t not in LORA_TARGETS]
    if bad or (self.rank and not self.targets):
      raise ConfigError(f"lora.targets={list(self.targets)}: use a non-empty subset of "
                        f"{list(LORA_TARGETS)}" + (f" ({bad} unknown)." if bad else "."))
    if self.init not in LORA_INITS:
      raise ConfigError(f"lora.init={self.init!r}; use one of {LORA_INITS}.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def on(self, target: str) -> bool:
    return self.rank > 0 and target in self.targets


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # 'llama' | 'qwen2' | 'qwen3'
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Scaling keys besides rope_theta, e.g. (('factor', 8.0), ('rope_type', 'llama3'), ...); a sorted
  # tuple rather than a dict so the config stays hashable.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
  o_bias: bool = False  # Llama/Qwen3 `attention_bias=True` also biases o_proj
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # dtype the checkpoint was stored in; `hf.save` writes this unless told otherwise.
  checkpoint_dtype: str = "float32"
  # dtype of the params in memory, and of activations / matmuls. Logits are always float32.
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Adapters on the projections (not part of config.json: an export merges or separates them).
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    if self.family not in _ARCH_OF_FAMILY:
      raise ConfigError(f"family={self.family!r} is not supported; use one of "
                        f"{sorted(_ARCH_OF_FAMILY)}.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} must be a multiple of "
                        f"num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
    for name in ("checkpoint_dtype", "param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r}; use one of {DTYPES}.")
    rope_type = self.rope_dict.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
      raise ConfigError(f"rope_scaling rope_type={rope_type!r} is not supported; kat_jax "
                        f"implements {ROPE_TYPES}.")

  @property
  def rope_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling)

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def num_params(self) -> int:
    e, m, h, k, d = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    attn = e * h * d * 2 + e * k * d * 2
    attn += (h * d + 2 * k * d) * self.qkv_bias + e * self.o_bias + 2 * d * self.qk_norm
    layer = attn + 3 * e * m + 2 * e
    embed = self.vocab_size * e * (1 if self.tie_embeddings else 2)
    return self.num_layers * layer + embed + e

  def lora_shapes(self) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection an adapter can sit on."""
    e, m, h, k, d = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    return {"q_proj": (e, h * d), "k_proj": (e, k * d), "v_proj": (e, k * d),
            "o_proj": (h * d, e), "gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e)}

  def num_lora_params(self) -> int:
    """Adapter params: rank x (in + out) per adapted projection and layer."""
    return self.num_layers * sum(self.lora.rank * (i + o) for t, (i, o) in
                                 self.lora_shapes().items() if self.lora.on(t))

  # --------------------------------------------------------------------------- HF conversion

  @classmethod
  def from_hf(cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None,
              **overrides) -> "ModelConfig":
    """Builds a ModelConfig from a parsed config.json (either layout)."""
    archs = hf.get("architectures") or []
    family = None
    for arch in archs:
      family = ARCHITECTURES.get(arch, family)
    if family is None and not archs:
      family = {v: k for k, v in _MODEL_TYPE.items()}.get(hf.get("model_type"))
    if family is None:
      raise ConfigError(
          f"config.json architectures={archs} (model_type={hf.get('model_type')!r}) is not "
          f"supported; kat_jax implements {sorted(ARCHITECTURES)}.")

    def need(key):
      if hf.get(key) is None:
        raise ConfigError(f"config.json has no {key!r}, which a {archs or family} config needs.")
      return hf[key]

    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
      raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}; kat_jax implements the "
                        "SwiGLU MLP with silu only.")
    if hf.get("mlp_bias"):
      raise ConfigError("config.json mlp_bias=true is not supported (no published Llama/Qwen "
                        "checkpoint uses it); set it to false.")
    if hf.get("use_sliding_window"):
      raise ConfigError("config.json use_sliding_window=true is not supported: kat_jax uses full "
                        "attention in every layer; set use_sliding_window to false.")

    # Rope: 5.x nests everything in rope_parameters; 4.x has top-level rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None)
    if theta is None:
      theta = hf.get("rope_theta", 10000.0)
    if not rope and hf.get("rope_scaling"):
      rope = dict(hf["rope_scaling"])
    if "type" in rope and "rope_type" not in rope:  # older spelling of rope_type
      rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    if rope.get("rope_type", "default") == "default":
      rope = {}

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = hf.get("head_dim") or hidden // num_heads
    attention_bias = bool(hf.get("attention_bias", False))

    eos = _as_id_tuple(hf.get("eos_token_id"))
    if generation_config:
      # Instruct checkpoints often list extra stop ids (e.g. <|im_end|>) only here.
      eos = tuple(dict.fromkeys(_as_id_tuple(generation_config.get("eos_token_id")) + eos))
    ckpt_dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    ckpt_dtype = ckpt_dtype.replace("torch.", "")
    if ckpt_dtype not in DTYPES:
      ckpt_dtype = "float32"

    kwargs = dict(
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=hf.get("pad_token_id"),
        checkpoint_dtype=ckpt_dtype,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """config.json contents that transformers 4.x and 5.x both load."""
    dtype = dtype or self.checkpoint_dtype
    rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default", **self.rope_dict}
    eos = list(self.eos_token_ids)
    hf = {
        "architectures": [_ARCH_OF_FAMILY[self.family]],
        "model_type": _MODEL_TYPE[self.family],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings,
        "rope_parameters": rope_parameters,
        # 4.x spelling, for tools that predate rope_parameters.
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_dict or None,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": self.pad_token_id,
        "dtype": dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if self.family == "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None)
    else:
      hf["attention_bias"] = self.o_bias
    if self.family == "qwen3":
      hf.update(use_sliding_window=False, sliding_window=None)
    if self.family == "llama":
      hf["mlp_bias"] = False
    return hf


def _as_id_tuple(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim/2] (float64 numpy; cast by the caller), as transformers does."""
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  rope = config.rope_dict
  rope_type = rope.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / float(rope["factor"])
  elif rope_type == "llama3":
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq
