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

Truncation policies (`mode`), one switch each, the same rollout and the same loss otherwise; each
rival as its paper or reference code defines it (the source is named in its bullet):
  * `none` -- vanilla OPD: every token trained with weight 1.
  * `kat` -- the rule above (plain; `spike_gate`; `cut='onset_floor'` keeps the first min_len).
  * `fixed` -- ESR (arXiv 2605.27028): generation stops after `fixed_len` tokens (paper: N = 100).
  * `horizon` -- TOPD / POPD (arXiv 2605.31490): generation stops at a horizon H_k of training
    step k, H_k = min(max_new_tokens, horizon_start + horizon_step * floor(k / horizon_every)).
    horizon_step = 0 is TOPD (a fixed fraction of the budget, 0.10-0.25 there); > 0 is POPD's
    growing horizon (its H0, dH, dk are not public: knobs). The horizon reaches the rollout as its
    traced threshold input (the `tau` argument), so a schedule never recompiles.
  * `topk` -- Prune-OPD (arXiv 2605.07804, the authors' verl code): per token, the share of the
    student's top-`topk_k` tokens that are in the teacher's top-k; a token with share <
    `topk_threshold` is a drift event; token t's loss weight is clip(1 - topk_drop * (drift
    events up to and including t), 0, 1) + topk_base. With topk_base = 0 (default) the weight
    reaches 0 at the ceil(1 / topk_drop)-th event: the loss is cut there and the row's generation
    stops at the end of that window (truncation); topk_base > 0 (the authors' scripts: 0.5)
    only re-weights. Their batch-level response-length controller is not implemented.
  * `iw` -- IW-OPD (arXiv 2606.22600, as TRL's experimental trainer computes it): no cut; token t's
    loss weight is 1 + iw_gamma * (1 - S_{<t} / S), S_{<t} the sum of |log p_s - log p_t| over the
    row's earlier trained tokens and S over all of them: early and pre-discrepancy tokens count
    up to 1 + gamma, the tail down to 1.
  * `random` -- the rows run to the end; the loss is cut post hoc at lengths drawn from a given
    distribution (e.g. KAT's trained lengths): where KAT cuts, without looking at the content.
Weights multiply the per-token loss; the loss still divides by the number of trained tokens (as
TRL and verl do), so a weighted policy also changes the step's effective learning rate.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.errors import ConfigError

MODES = ("none", "kat", "fixed", "horizon", "topk", "iw", "random")
SIGNALS = ("kl", "logratio")
CUTS = ("onset", "detection", "onset_floor")


@dataclasses.dataclass(frozen=True)
class KATConfig:
  """Static detector settings (tau and spike_tau are traced inputs, so changing them never recompiles)."""
  mode: str = "kat"  # none | kat | fixed | horizon | topk | iw | random (see the docstring)
  signal: str = "kl"  # kl | logratio
  window: int = 32  # W: tokens per window; also the teacher's chunk length in the rollout
  patience: int = 4  # K consecutive low windows
  min_len: int = 256  # no termination before this many generated tokens
  cut: str = "onset"  # onset | detection | onset_floor (onset, never before min_len)
  spike_gate: bool = False
  fixed_len: int = 0  # mode=fixed: truncation length N
  # mode=horizon: H_k = min(max_new_tokens, start + step * (k // every)); step 0 = TOPD.
  horizon_start: int = 0
  horizon_step: int = 0
  horizon_every: int = 1
  # mode=topk (Prune-OPD; the authors' scripts: k 16, threshold 0.7, drop 0.01, base 0.5).
  topk_k: int = 16
  topk_threshold: float = 0.7
  topk_drop: float = 0.01
  topk_base: float = 0.0
  iw_gamma: float = 0.5  # mode=iw (TRL's default)

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
    if self.mode == "horizon" and (self.horizon_start < 1 or self.horizon_step < 0
                                   or self.horizon_every < 1):
      raise ConfigError(
          f"kat.mode='horizon' needs kat.horizon_start >= 1 (got {self.horizon_start}), "
          f"kat.horizon_step >= 0 (got {self.horizon_step}) and kat.horizon_every >= 1 (got "
          f"{self.horizon_every}); e.g. horizon_start = max_new_tokens // 4 for TOPD.")
    if self.mode == "topk" and not (self.topk_k >= 1 and 0 < self.topk_threshold <= 1
                                    and self.topk_drop >= 0 and self.topk_base >= 0):
      raise ConfigError(
          f"kat.mode='topk' needs kat.topk_k >= 1 (got {self.topk_k}), 0 < kat.topk_threshold <= "
          f"1 (got {self.topk_threshold}), kat.topk_drop >= 0 (got {self.topk_drop}) and "
          f"kat.topk_base >= 0 (got {self.topk_base}); the authors use 16, 0.7, 0.01, 0.5.")
    if self.iw_gamma < 0:
      raise ConfigError(f"kat.iw_gamma={self.iw_gamma} must be >= 0 (TRL's default: 0.5).")

  @property
  def stop_events(self) -> int:
    """mode=topk: the drift event at which the weight reaches 0 (and the row is cut); 0 = never."""
    if self.mode != "topk" or self.topk_base > 0 or self.topk_drop <= 0:
      return 0
    # round() first: 1 / 0.01 is 100.00000000000001 in floating point.
    return math.ceil(round(1.0 / self.topk_drop, 9))


def horizon_at(step, cfg: KATConfig, max_new_tokens: int) -> int:
  """mode=horizon: the horizon of training step `step` (0-based)."""
  return min(max_new_tokens, cfg.horizon_start + cfg.horizon_step * (step // cfg.horizon_every))


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
  if cfg.mode in ("fixed", "horizon"):
    # Truncated iff the row has produced a token past N; decided at window granularity.
    limit = cfg.fixed_len if cfg.mode == "fixed" else jnp.asarray(tau).astype(jnp.int32)
    fire = (length_B > limit) & ~state.terminated_B
    onset = jnp.full_like(state.onset_B, limit)
    return state.replace(
        terminated_B=state.terminated_B | fire,
        detect_B=jnp.where(fire, end, state.detect_B),
        onset_B=jnp.where(fire, onset, state.onset_B)), fire
  if cfg.mode == "topk":
    # signal = top-k overlap; low_run_B counts the row's drift events so far.
    valid_BxW = jnp.reshape(start, (-1, 1)) + jnp.arange(w)[None, :] < length_B[:, None]
    drift_BxW = valid_BxW & (signal_BxW < cfg.topk_threshold)
    count_BxW = state.low_run_B[:, None] + jnp.cumsum(drift_BxW.astype(jnp.int32), axis=-1)
    n = cfg.stop_events
    fire = (count_BxW[:, -1] >= n) & ~state.terminated_B if n else jnp.zeros_like(
        state.terminated_B)
    # The n-th event's token has weight 0: the loss keeps the tokens before it.
    at_B = jnp.argmax(count_BxW >= n, axis=-1)
    return state.replace(
        low_run_B=count_BxW[:, -1], terminated_B=state.terminated_B | fire,
        detect_B=jnp.where(fire, end, state.detect_B),
        onset_B=jnp.where(fire, jnp.reshape(start, (-1,)) + at_B, state.onset_B)), fire
  if cfg.mode in ("none", "random", "iw"):
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


def topk_overlap(s_logits_BxWxV, t_logits_BxWxV, k: int):
  """Prune-OPD's drift signal: the share of the student's top-k tokens in the teacher's top-k."""
  _, s_ids = jax.lax.top_k(s_logits_BxWxV, k)
  _, t_ids = jax.lax.top_k(t_logits_BxWxV, k)
  hit = jnp.any(s_ids[..., :, None] == t_ids[..., None, :], axis=-1)
  return jnp.mean(hit.astype(jnp.float32), axis=-1)


def loss_weights(mask_BxT, logratio_BxT, overlap_BxT, cfg: KATConfig):
  """Per-token loss weights (1 outside `iw` / `topk`; 0 outside the mask).

  logratio: log p_s(y) - log p_t(y) of the sampled tokens (iw); overlap: `topk_overlap` (topk).
  """
  mask = mask_BxT.astype(jnp.float32)
  if cfg.mode == "iw":
    a_BxT = jnp.abs(logratio_BxT.astype(jnp.float32)) * mask
    before_BxT = jnp.cumsum(a_BxT, axis=-1) - a_BxT  # exclusive: the discrepancy so far
    total_B = jnp.maximum(jnp.sum(a_BxT, axis=-1, keepdims=True), 1e-8)
    return (1.0 + cfg.iw_gamma * (1.0 - before_BxT / total_B)) * mask
  if cfg.mode == "topk":
    drift_BxT = (overlap_BxT < cfg.topk_threshold) & mask_BxT
    events_BxT = jnp.cumsum(drift_BxT.astype(jnp.float32), axis=-1)  # inclusive
    return (jnp.clip(1.0 - cfg.topk_drop * events_BxT, 0.0, 1.0) + cfg.topk_base) * mask
  return mask


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
    if cfg.mode in ("fixed", "horizon"):
      limit = cfg.fixed_len if cfg.mode == "fixed" else int(tau)
      if length > limit:
        end = -(-(limit + 1) // w) * w  # first window end past N
        out["terminated"][r], out["detect"][r], out["onset"][r] = True, end, limit
        out["trained_len"][r] = limit
      continue
    if cfg.mode == "topk":
      events = np.flatnonzero(signal_BxT[r, :length] < cfg.topk_threshold)
      n = cfg.stop_events
      if n and len(events) >= n:
        at = int(events[n - 1])
        out["terminated"][r], out["detect"][r], out["onset"][r] = True, (at // w + 1) * w, at
        out["trained_len"][r] = at
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
