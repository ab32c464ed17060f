"""The training-adaptive KAT threshold: tau for step k+1 from the window statistics of step k.

Default (`adaptive`): tau = EMA(momentum 0.9) of the 20th percentile of the complete windows' mean
signal at each step; the first observation sets tau directly (no bias towards 0). Ablations: `fixed`
(a constant tau) and `ratio` (EMA of ratio x mean window signal). For the first `warmup_steps`
steps KAT is off -- tau = -inf, so no window is ever low -- while statistics accumulate. tau is a
traced input of the rollout: changing it never recompiles. The state is a tiny pytree saved in the
checkpoint with the rest of the training state.

Censoring. Once KAT stops a row, the windows it would have produced -- the persistent low-signal
tail that triggered the stop -- never exist. A percentile of the windows that *were* produced is
therefore biased upward, and the bias feeds itself: a higher tau cuts more rows, which hides more
low windows (simulated in tests/test_threshold.py: tau settles ~1.3x above the uncut percentile,
and loop-free rows start being cut). Each step a random `probe_fraction` of the rollouts are
*probes*: KAT decides where their loss is cut exactly as for any row, but never stops their
generation, so what a stopped row hides is seen on the probes KAT flagged. Estimators
(`estimator`), each a weighted sample of window means:
  * `probe` (default): every complete window (weight 1), plus the windows the probes KAT flagged
    produced after their detection, weighted up by (stopped rows) / (flagged probes): flagged
    probes are a random sample of the flagged rows, so they stand in for the stopped rows' hidden
    tails, length included. Unbiased by design; costs the probes' tails. A step with stopped rows
    but no flagged probe falls back to `censored` (reported as `tau_imputed`): likely when traps
    are rare -- but then the imputed windows, a stopped row's tail each, are few too.
  * `censored`: every complete window, plus each stopped row's unseen windows (to the buffer
    end) at the value of its last window -- a low one. Free; exact when a trapped row would have
    stayed low to the end (a loop), biased *downward* when it would have ended sooner -- a bias
    that damps itself (a lower tau cuts fewer rows).
  * `observed`: the complete windows alone (the biased estimate, kept as an ablation).
The statistic is a weighted inverted-CDF quantile (numpy's `quantile(..., weights=...,
method="inverted_cdf")`) or, for `ratio`, a weighted mean. Whatever the estimator, the probes' own
statistic is reported every step (`tau_probe`) so drift is visible beside tau.

Robustness: a step whose statistic is not finite (a NaN / inf window mean, e.g. from a broken
teacher) or whose update was skipped leaves the state unchanged and is counted (`tau_rejected`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.errors import ConfigError

MODES = ("adaptive", "fixed", "ratio")
ESTIMATORS = ("probe", "censored", "observed")


@dataclasses.dataclass(frozen=True)
class ThresholdConfig:
  mode: str = "adaptive"
  momentum: float = 0.9
  quantile: float = 0.2  # adaptive: which percentile of the window means
  ratio: float = 0.5  # ratio: tau = ratio * mean window signal
  fixed_tau: float = 0.0  # fixed
  warmup_steps: int = 5
  estimator: str = "probe"  # probe | censored | observed (see the module docstring)
  # Share of each step's rollouts that KAT never stops (at least one row when > 0); 0 = none.
  probe_fraction: float = 0.125

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"threshold.mode={self.mode!r}; use one of {MODES}.")
    if self.estimator not in ESTIMATORS:
      raise ConfigError(f"threshold.estimator={self.estimator!r}; use one of {ESTIMATORS}.")
    if not 0 <= self.momentum < 1 or not 0 <= self.quantile <= 1:
      raise ConfigError(f"threshold.momentum={self.momentum} must be in [0, 1) and "
                       f"threshold.quantile={self.quantile} in [0, 1].")
    if self.warmup_steps < 0:
      raise ConfigError(f"threshold.warmup_steps={self.warmup_steps} must be >= 0.")
    if not 0 <= self.probe_fraction <= 1:
      raise ConfigError(f"threshold.probe_fraction={self.probe_fraction} must be in [0, 1].")


@flax.struct.dataclass
class ThresholdState:
  ema: jnp.ndarray  # float32; meaningless until num_updates > 0
  num_updates: jnp.ndarray  # int32: steps that contributed a statistic


@flax.struct.dataclass
class Windows:
  """One step's KAT windows as the rollout recorded them (N = buffer length / W windows)."""
  mean_BxN: jax.Array  # mean signal of each window (0 where the row had stopped)
  complete_BxN: jax.Array  # bool: the row generated the whole window and had not ended before
  probe_B: jax.Array  # bool: rows whose generation KAT never stops
  terminated_B: jax.Array  # bool: KAT fired on the row (a probe kept generating)
  detect_window_B: jax.Array  # int32: windows the row had produced when KAT fired (-1 if not)


def init() -> ThresholdState:
  return ThresholdState(ema=jnp.zeros((), jnp.float32), num_updates=jnp.zeros((), jnp.int32))


def num_probes(batch: int, cfg: ThresholdConfig, kat_mode: str) -> int:
  """Probe rows per step: only an adaptive threshold under KAT needs (and pays for) them."""
  if kat_mode != "kat" or cfg.mode == "fixed" or cfg.probe_fraction == 0:
    return 0
  return min(batch, max(1, round(cfg.probe_fraction * batch)))


def probe_mask(batch: int, n: int, seed: int, step: int) -> np.ndarray:
  """bool[batch]: `n` rows drawn uniformly at random, a pure function of (seed, step) -- the same
  on every process and after a resume. Random rows, so no data order can bias the sample."""
  mask = np.zeros(batch, bool)
  mask[np.random.default_rng([seed, step, 0x7072]).permutation(batch)[:n]] = True
  return mask


def weighted_quantile(values_M, weights_M, q):
  """The smallest value whose cumulative weight share reaches q (the inverted CDF)."""
  order = jnp.argsort(values_M)
  v, cw = values_M[order], jnp.cumsum(weights_M[order])
  idx = jnp.searchsorted(cw, q * cw[-1], side="left")
  return v[jnp.clip(idx, 0, v.shape[0] - 1)]


def _statistic(values_BxN, weights_BxN, cfg: ThresholdConfig):
  """The weighted sample's statistic; NaN for an empty sample."""
  w = weights_BxN.reshape(-1).astype(jnp.float32)
  # Weight-0 entries go to the end of the sort and cannot be picked (nor poison it if NaN).
  x = jnp.where(w > 0, values_BxN.reshape(-1), jnp.inf)
  if cfg.mode == "adaptive":
    stat = weighted_quantile(x, w, cfg.quantile)
  else:
    stat = cfg.ratio * jnp.sum(jnp.where(w > 0, x * w, 0.0)) / jnp.sum(w)
  return jnp.where(jnp.sum(w) > 0, stat, jnp.nan)


def _censored(mean_BxN, stopped_B, stopped_at_B):
  """Weights and values that count a stopped row's unseen windows at its last window's value."""
  n = mean_BxN.shape[1]
  last = jnp.clip(stopped_at_B - 1, 0, n - 1)
  last_B = jnp.take_along_axis(mean_BxN, last[:, None], axis=1)[:, 0]
  unseen = stopped_B[:, None] & (jnp.arange(n)[None, :] >= stopped_at_B[:, None])
  return unseen, jnp.where(unseen, last_B[:, None], mean_BxN)


@functools.partial(jax.jit, static_argnames=("cfg",))
def observe(state: ThresholdState, windows: Windows, cfg: ThresholdConfig, accept=True
            ) -> tuple[ThresholdState, dict]:
  """Folds one step's windows into the state; returns (state, metrics).

  accept: False for a step whose update was skipped (its statistics are not trusted either).
  metrics: `tau_probe` -- this step's statistic from the probes' windows alone (NaN without
  probes); `tau_rejected` -- 1 if the step had a sample but left the state unchanged, because a
  sampled window or the statistic was not finite, or `accept` was False; `tau_imputed` -- 1 if
  the step imputed stopped rows' hidden windows (`censored`, or `probe` without a flagged probe).
  """
  mean = windows.mean_BxN.astype(jnp.float32)
  complete = windows.complete_BxN.astype(jnp.float32)
  probe = windows.probe_B
  probe_stat = _statistic(mean, complete * probe[:, None], cfg)
  if cfg.mode == "fixed":
    zero = jnp.zeros((), jnp.int32)
    return state, dict(tau_probe=probe_stat, tau_rejected=zero, tau_imputed=zero)
  # A row cut only in the loss (random truncation: no detection point) hid no window.
  stopped = windows.terminated_B & ~probe & (windows.detect_window_B >= 0)
  unseen, imputed = _censored(mean, stopped, windows.detect_window_B)
  if cfg.estimator == "observed":
    weights, values, imputing = complete, mean, jnp.zeros((), jnp.bool_)
  elif cfg.estimator == "censored":
    weights, values, imputing = complete + unseen, imputed, jnp.any(stopped)
  else:
    flagged = windows.terminated_B & probe & (windows.detect_window_B >= 0)
    after_BxN = flagged[:, None] & (jnp.arange(mean.shape[1])[None, :]
                                    >= windows.detect_window_B[:, None])
    n_flagged = jnp.sum(flagged)
    scale = jnp.sum(stopped) / jnp.maximum(n_flagged, 1)
    probe_w = complete + scale * complete * after_BxN
    # No flagged probe to learn the hidden tails from: impute them as `censored` does.
    use_probes = (n_flagged > 0) | ~jnp.any(stopped)
    weights = jnp.where(use_probes, probe_w, complete + unseen)
    values = jnp.where(use_probes, mean, imputed)
    imputing = ~use_probes
  sample = weights > 0
  has = jnp.any(sample)
  stat = _statistic(values, weights, cfg)
  finite = jnp.all(jnp.where(sample, jnp.isfinite(values), True)) & jnp.isfinite(stat)
  take = has & finite & jnp.asarray(accept)
  ema = jnp.where(state.num_updates > 0, cfg.momentum * state.ema + (1 - cfg.momentum) * stat,
                  stat)
  new = ThresholdState(ema=jnp.where(take, ema, state.ema),
                       num_updates=state.num_updates + take.astype(jnp.int32))
  return new, dict(tau_probe=probe_stat, tau_rejected=(has & ~take).astype(jnp.int32),
                   tau_imputed=imputing.astype(jnp.int32))


def tau(state: ThresholdState, step, cfg: ThresholdConfig):
  """The threshold the rollout of training step `step` (0-based) uses."""
  value = jnp.float32(cfg.fixed_tau) if cfg.mode == "fixed" else state.ema
  # A non-finite EMA (a checkpoint from before non-finite statistics were rejected) turns KAT off
  # rather than silently never firing.
  off = (step < cfg.warmup_steps) | (
      ((state.num_updates == 0) | ~jnp.isfinite(state.ema)) & (cfg.mode != "fixed"))
  return jnp.where(off, -jnp.inf, value).astype(jnp.float32)
