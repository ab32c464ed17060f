"""Decoder-only transformers (Llama / Qwen2 / Qwen3) in Flax NNX."""

from kat_jax.models.config import ConfigError, LoraConfig, ModelConfig, rope_inv_freq
from kat_jax.models.transformer import KVCache, Transformer

__all__ = ["ConfigError", "KVCache", "LoraConfig", "ModelConfig", "Transformer", "rope_inv_freq"]
