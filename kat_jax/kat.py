"""KAT: the KL Agreement Trap detector, in-loop (jax, per window) and offline (numpy, per trace).

The rule, per row, over consecutive non-overlapping windows of W generated tokens:
  * a window is *complete* if the row generated all W tokens and had not ended (EOS) by its last;
  * it is *low* if complete and mean(signal over the window) < tau; with the spike gate, it also
    needs a spike -- a token whose signal exceeds `spike_tau` -- in an *earlier* window of the row
    (so the slip token itself, usually the one high-KL token, stays in the loss);
  * `low_run` counts consecutive low windows; the row is terminated at the end of the first window
    where low_run >= K (patience) and at least `min_len` tokens have been generated;
  * onset = first token of that low run; detection = the token count at termination; the loss keeps
    tokens [0, cut) with cut = onset (default), detection, or `onset_floor` = max(onset, min_len).
Why a floor is an option: a row that is low from its start is only detected at min_len, and its
low run then reaches back to token 0 -- the onset cut trains it on nothing. `onset_floor` keeps
the first min_len tokens (where KAT may not act) in the loss. Which is better is an empirical
question (the truncation-policy experiments); the default stays the paper's onset cut.
State is O(1) per row and the work O(1) per token: a window mean, a counter, two flags.

Signals: `kl` (default) is the full-vocabulary KL(student || teacher) per token, never negative.
`logratio` is log p_s(y) - log p_t(y) of the sampled token, an unbiased estimate of the same KL
that is often negative on healthy tokens (the teacher more confident than the student), so its low
windows mostly hit correct rollouts (measured on the arithmetic task: docs/results.md, the
detector table's `logratio` rows).

Ablations through the same config: mode `none` (vanilla OPD), `fixed` (truncate every rollout at
`fixed_len` tokens, as in Early Stopping Rollout), and post-hoc `random_truncation` to a given length
distribution (rows run to the end; only the loss is cut).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.errors import ConfigError

MODES = ("none", "kat", "fixed", "random")
SIGNALS = ("kl", "logratio")
CUTS = ("onset", "detection", "onset_floor")


@dataclasses.dataclass(frozen=True)
class KATConfig:
  """Static detector settings (tau and spike_tau are traced inputs, so changing them never recompiles)."""
  mode: str = "kat"  # none | kat | fixed | random (random: loop runs as `none`, cut post hoc)
  signal: str = "kl"  # kl | logratio
  window: int = 32  # W: tokens per window; also the teacher's chunk length in the rollout
  patience: int = 4  # K consecutive low windows
  min_len: int = 256  # no termination before this many generated tokens
  cut: str = "onset"  # onset | detection | onset_floor (onset, never before min_len)
  spike_gate: bool = False
  fixed_len: int = 0  # mode=fixed: truncation length N

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"kat.mode={self.mode!r}; use one of {MODES}.")
    if self.signal not in SIGNALS:
      raise ConfigError(f"kat.signal={self.signal!r}; use one of {SIGNALS}.")
    if self.cut not in CUTS:
      raise ConfigError(f"kat.cut={self.cut!r}; use one of {CUTS}.")
    if self.window < 1 or self.patience < 1 or self.min_len < 0:
      raise ConfigError(f"kat.window={self.window}, kat.patience={self.patience} must be >= 1 and "
                        f"kat.min_len={self.min_len} >= 0.")
    if self.mode == "fixed" and self.fixed_len < 1:
      raise ConfigError(f"kat.mode='fixed' needs kat.fixed_len >= 1 (got {self.fixed_len}).")


@flax.struct.dataclass
class KATState:
  low_run_B: jax.Array  # int32: consecutive low windows ending at the last processed window
  spiked_B: jax.Array  # bool: a spike was seen in an already processed window
  terminated_B: jax.Array  # bool
  detect_B: jax.Array  # int32: generated tokens when terminated (-1 if not)
  onset_B: jax.Array  # int32: first token of the triggering low run (-1 if not)


def init_state(batch_size: int) -> KATState:
  zeros = jnp.zeros((batch_size,), jnp.int32)
  false = jnp.zeros((batch_size,), jnp.bool_)
  return KATState(low_run_B=zeros, spiked_B=false, terminated_B=false,
                  detect_B=zeros - 1, onset_B=zeros - 1)


def window_complete(length_B, eos_B, end):
  """The row generated every token of the window ending at `end` and had not ended by EOS."""
  return (length_B >= end) & ~eos_B


def window_update(state: KATState, signal_BxW, length_B, eos_B, start, tau, spike_tau,
                  cfg: KATConfig) -> tuple[KATState, jax.Array]:
  """Processes window [start, start + W) of every row; returns (state, fire_B).

  start: the window's first token index, one for all rows ([]) or per row ([B]: slot refill).
  signal_BxW: per-token signal (values past a row's length are ignored); length_B: tokens the row
  has generated so far (<= start + W); eos_B: the row has ended with EOS.
  """
  w = cfg.window
  end = start + w
  if cfg.mode == "fixed":
    # Truncated iff the row has produced a token past N; decided at window granularity.
    fire = (length_B > cfg.fixed_len) & ~state.terminated_B
    onset = jnp.full_like(state.onset_B, cfg.fixed_len)
    return state.replace(
        terminated_B=state.terminated_B | fire,
        detect_B=jnp.where(fire, end, state.detect_B),
        onset_B=jnp.where(fire, onset, state.onset_B)), fire
  if cfg.mode in ("none", "random"):
    return state, jnp.zeros_like(state.terminated_B)

  signal_BxW = signal_BxW.astype(jnp.float32)
  complete = window_complete(length_B, eos_B, end)
  mean_B = jnp.sum(signal_BxW, axis=-1) / w
  low = complete & (mean_B < tau)
  if cfg.spike_gate:
    low = low & state.spiked_B
  low_run = jnp.where(low, state.low_run_B + 1, 0)
  fire = low & (low_run >= cfg.patience) & (end >= cfg.min_len) & ~state.terminated_B
  valid_BxW = jnp.reshape(start, (-1, 1)) + jnp.arange(w)[None, :] < length_B[:, None]
  spike = jnp.any(valid_BxW & (signal_BxW > spike_tau), axis=-1)
  return state.replace(
      low_run_B=low_run,
      spiked_B=state.spiked_B | spike,
      terminated_B=state.terminated_B | fire,
      detect_B=jnp.where(fire, end, state.detect_B),
      onset_B=jnp.where(fire, end - low_run * w, state.onset_B)), fire


def trained_length(state: KATState, length_B, cfg: KATConfig):
  """Tokens of each row that the loss keeps."""
  cut = state.onset_B
  if cfg.mode == "kat" and cfg.cut == "detection":
    cut = state.detect_B
  elif cfg.mode == "kat" and cfg.cut == "onset_floor":
    cut = jnp.maximum(state.onset_B, cfg.min_len)
  return jnp.where(state.terminated_B, jnp.minimum(length_B, cut), length_B)


def random_truncation(key, length_B, target_lengths_N):
  """Ablation: cut each row at a length drawn from an empirical distribution (e.g. KAT's trained
  lengths), independent of its content. Returns (trained_len_B, truncated_B)."""
  idx = jax.random.randint(key, length_B.shape, 0, target_lengths_N.shape[0])
  cut = target_lengths_N[idx].astype(length_B.dtype)
  return jnp.minimum(length_B, cut), cut < length_B


# ------------------------------------------------------------------------ offline reference


def detect_offline(signal_BxT, length_B, eos_B, tau: float, spike_tau: float,
                   cfg: KATConfig) -> dict[str, np.ndarray]:
  """The same rule over whole traces, in plain numpy loops: a reference and a post-hoc tool.

  Feed it the signal of rollouts that ran uncut; it reports where KAT would have stopped them.
  """
  signal_BxT = np.asarray(signal_BxT, np.float32)
  b, t = signal_BxT.shape
  w = cfg.window
  out = dict(terminated=np.zeros(b, bool), detect=np.full(b, -1, np.int32),
             onset=np.full(b, -1, np.int32), trained_len=np.asarray(length_B, np.int32).copy())
  for r in range(b):
    length, eos = int(length_B[r]), bool(eos_B[r])
    if cfg.mode == "fixed":
      if length > cfg.fixed_len:
        end = -(-(cfg.fixed_len + 1) // w) * w  # first window end past N
        out["terminated"][r], out["detect"][r], out["onset"][r] = True, end, cfg.fixed_len
        out["trained_len"][r] = cfg.fixed_len
      continue
    if cfg.mode != "kat":
      continue
    low_run, spiked = 0, False
    for start in range(0, t - w + 1, w):
      end = start + w
      if end > length or (end == length and eos):
        break  # incomplete window: the row has stopped
      window = signal_BxT[r, start:end]
      low = float(np.sum(window, dtype=np.float32) / np.float32(w)) < tau
      low = low and (spiked or not cfg.spike_gate)
      low_run = low_run + 1 if low else 0
      spiked = spiked or bool(np.any(window > spike_tau))
      if low and low_run >= cfg.patience and end >= cfg.min_len:
        onset = end - low_run * w
        cut = {"onset": onset, "detection": end, "onset_floor": max(onset, cfg.min_len)}[cfg.cut]
        out["terminated"][r], out["detect"][r], out["onset"][r] = True, end, onset
        out["trained_len"][r] = min(length, cut)
        break
  return out
