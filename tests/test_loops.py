"""The n-gram repetition-loop detector against a brute-force reading of its definition."""

import numpy as np
import pytest

from kat_jax import loops
from kat_jax.studies import loops as loop_study

CFG = loops.LoopConfig(max_period=6, min_repeats=3, min_span=8)


def brute_force(x, cfg=CFG) -> int:
  """Earliest t such that x[t : t + span] is p-periodic for some p <= max_period, with span >=
  max(min_repeats * p, min_span) -- checked literally, window by window."""
  n = len(x)
  for t in range(n):
    for p in range(1, cfg.max_period + 1):
      need = max(cfg.min_repeats * p, cfg.min_span)
      if t + need > n:
        continue
      seg = x[t:t + need]
      if all(seg[j] == seg[j - p] for j in range(p, need)):
        return t
  return -1


def test_matches_brute_force_on_random_sequences():
  rng = np.random.default_rng(0)
  found = 0
  for trial in range(400):
    n = int(rng.integers(1, 60))
    x = rng.integers(0, int(rng.integers(2, 6)), n)
    if trial % 2:  # plant a loop of a random period somewhere
      p, reps = int(rng.integers(1, 8)), int(rng.integers(2, 6))
      at = int(rng.integers(0, n + 1))
      x = np.concatenate([x[:at], np.tile(rng.integers(0, 50, p), reps), x[at:]])
    want = brute_force(list(x))
    assert loops.find_loop(x, CFG) == want, (x.tolist(), want)
    found += want >= 0
  assert 50 < found < 400  # both outcomes exercised


def test_examples():
  cfg = loops.LoopConfig()  # defaults: period <= 32, 3 copies, 16 tokens
  text = list(range(40))
  assert loops.find_loop(text, cfg) == -1
  assert loops.find_loop([5, 6] + [7] * 16, cfg) == 2
  assert loops.find_loop([5, 6] + [7] * 15, cfg) == -1  # 15 < min_span
  sentence = list(range(100, 110))
  assert loops.find_loop([1, 2, 3] + sentence * 3, cfg) == 3  # a 10-token sentence, 3 times
  assert loops.find_loop([1, 2, 3] + sentence * 2, cfg) == -1  # said twice: not a loop


def test_onsets_ignore_tokens_past_each_length():
  tokens = np.array([[1, 2, 3, 4] + [9] * 20, [9] * 24])
  np.testing.assert_array_equal(loops.loop_onsets(tokens, [24, 10]), [4, -1])


@pytest.mark.parametrize("p", [1, 2, 5])
def test_onset_is_the_first_copy(p):
  block = list(range(50, 50 + p))
  x = [7, 8, 9] + block * (16 // p + 3)
  assert loops.find_loop(x) == 3


def _study_data():
  """4 rollouts of 32 tokens: rows 0-1 loop from token 12 on with KL 0.01 there (1.0 before);
  rows 2-3 never loop, KL 1.0 throughout; row 0 has a KL spike at token 11."""
  from kat_jax import kat
  kl = np.ones((4, 32), np.float32)
  kl[:2, 12:] = 0.01
  kl[0, 11] = 5.0
  tokens = np.tile(np.arange(32), (4, 1))
  tokens[:2, 12:] = 7
  length = np.full(4, 32)
  return dict(kl=kl, logratio=kl.copy(), tokens=tokens, length=length, eos=np.zeros(4, bool),
              window_complete=np.ones((4, 8), bool), loop=loops.loop_onsets(tokens, length),
              kat=kat.KATConfig(mode="kat", window=4, patience=2, min_len=8, cut="onset"),
              spike_tau=2.0, quantile=0.4)


def test_study_scores_kat_rules_against_loops():
  data = _study_data()
  np.testing.assert_array_equal(data["loop"], [12, 12, -1, -1])
  plain = loop_study.detector_scores(data, "kl", spike_gate=False)
  assert plain["tau"] == 1.0  # 10 of 32 window means are low: the 0.4 quantile is a high one
  assert (plain["precision"], plain["recall"], plain["cut_after_onset"]) == (1.0, 1.0, 1.0)
  np.testing.assert_array_equal(plain["det"]["trained_len"], [12, 12, 32, 32])
  assert plain["tokens_cut"] == 40 / 128
  gated = loop_study.detector_scores(data, "kl", spike_gate=True)  # only row 0 has a spike
  assert (gated["precision"], gated["recall"], gated["flagged"]) == (1.0, 0.5, 0.25)
  kl = loop_study.kl_in_loops(data)
  assert kl["inside the loop"]["tokens"] == 40
  assert kl["inside the loop"]["median"] == pytest.approx(0.01)
  assert kl["looping rollouts, before the loop"]["tokens"] == 24
  assert kl["loop-free rollouts"]["median"] == 1.0
  text, summary = loop_study.report(data, "synthetic")
  assert summary["loop_rate"] == 0.5 and "| plain | kl |" in text
