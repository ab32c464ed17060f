"""kat_jax: on-policy distillation with KL Agreement Trap Termination, in JAX / Flax NNX."""

__version__ = "0.1.0"
