"""Repetition loops: an n-gram detector, the ground truth for KAT on real models (training logs
each step's loop rate with it; evaluation counts looped completions).

A rollout *loops* when, from some token on, a block of p tokens (1 <= p <= max_period) repeats back
to back for at least max(min_repeats * p, min_span) tokens: `；；；；...` (p=1), `I am I am ...`,
or a whole sentence said three times. The onset is the first token of the first copy. Natural text
rarely has 16+ tokens of exact periodic repetition; degenerate small models produce it all the time.

The study of KAT's detector against it is `kat_jax.studies.loops`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  max_period: int = 32
  min_repeats: int = 3
  min_span: int = 16


def find_loop(tokens, cfg: LoopConfig = LoopConfig()) -> int:
  """Index of the first token of the earliest repetition loop in `tokens`, or -1."""
  x = np.asarray(tokens)
  n = len(x)
  best = -1
  for p in range(1, min(cfg.max_period, n // 2) + 1):
    need = max(cfg.min_repeats * p, cfg.min_span)  # periodic span, copies included
    if need > n:
      break
    # match[t]: x[t + p] == x[t]; a run of r matches from t makes x[t : t + p + r] p-periodic.
    match = np.concatenate([[False], x[p:] == x[:-p], [False]]).astype(np.int8)
    edges = np.diff(match)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    ok = (ends - starts) + p >= need
    if ok.any():
      t = int(starts[ok][0])
      best = t if best < 0 else min(best, t)
  return best


def loop_onsets(tokens_BxT, length_B, cfg: LoopConfig = LoopConfig()) -> np.ndarray:
  """find_loop over each row's generated tokens [0, length): onsets [B] (-1: no loop)."""
  tokens_BxT, length_B = np.asarray(tokens_BxT), np.asarray(length_B)
  return np.array([find_loop(t[:n], cfg) for t, n in zip(tokens_BxT, length_B)], np.int32)
