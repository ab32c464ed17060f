"""The training-adaptive KAT threshold: tau for step k+1 from the window statistics of step k.

Default (`adaptive`): tau = EMA(momentum 0.9) of the 20th percentile of the complete windows' mean
signal at each step; the first observation sets tau directly (no bias towards 0). Ablations: `fixed`
(a constant tau) and `ratio` (EMA of ratio x mean window signal). For the first `warmup_steps`
steps KAT is off -- tau = -inf, so no window is ever low -- while statistics accumulate. tau is a
traced input of the rollout: changing it never recompiles. The state is a tiny pytree saved in the
checkpoint with the rest of the training state.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax.numpy as jnp

MODES = ("adaptive", "fixed", "ratio")


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
  mode: str = "adaptive"
  momentum: float = 0.9
  quantile: float = 0.2  # adaptive: which percentile of the window means
  ratio: float = 0.5  # ratio: tau = ratio * mean window signal
  fixed_tau: float = 0.0  # fixed
  warmup_steps: int = 5

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"threshold.mode={self.mode!r}; use one of {MODES}.")
    if not 0 <= self.momentum < 1 or not 0 <= self.quantile <= 1:
      raise ValueError(f"threshold.momentum={self.momentum} must be in [0, 1) and "
                       f"threshold.quantile={self.quantile} in [0, 1].")
    if self.warmup_steps < 0:
      raise ValueError(f"threshold.warmup_steps={self.warmup_steps} must be >= 0.")


@flax.struct.dataclass
class ThresholdState:
  ema: jnp.ndarray  # float32; meaningless until num_updates > 0
  num_updates: jnp.ndarray  # int32: steps that contributed a statistic


def init() -> ThresholdState:
  return ThresholdState(ema=jnp.zeros((), jnp.float32), num_updates=jnp.zeros((), jnp.int32))


def observe(state: ThresholdState, window_mean_BxN, window_complete_BxN,
            cfg: ThresholdConfig) -> ThresholdState:
  """Folds one step's window statistics into the state (no-op if no window was complete)."""
  if cfg.mode == "fixed":
    return state
  means = jnp.where(window_complete_BxN, window_mean_BxN.astype(jnp.float32), jnp.nan)
  if cfg.mode == "adaptive":
    stat = jnp.nanquantile(means, cfg.quantile)
  else:
    stat = cfg.ratio * jnp.nanmean(means)
  has = jnp.any(window_complete_BxN)
  ema = jnp.where(state.num_updates > 0, cfg.momentum * state.ema + (1 - cfg.momentum) * stat,
                  stat)
  return ThresholdState(ema=jnp.where(has, ema, state.ema),
                        num_updates=state.num_updates + has.astype(jnp.int32))


def tau(state: ThresholdState, step, cfg: ThresholdConfig):
  """The threshold the rollout of training step `step` (0-based) uses."""
  value = jnp.float32(cfg.fixed_tau) if cfg.mode == "fixed" else state.ema
  off = (step < cfg.warmup_steps) | ((state.num_updates == 0) & (cfg.mode != "fixed"))
  return jnp.where(off, -jnp.inf, value).astype(jnp.float32)
