"""The KAT detector: in-loop window updates vs the offline numpy reference and hand-built traces."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kat_jax import kat


@functools.partial(jax.jit, static_argnames=("cfg",))
def _in_loop(signal_BxT, length_B, eos_B, tau, spike_tau, cfg):
  """Drives `window_update` over a trace exactly as the rollout loop does, window by window.

  The rollout sees, at the end of window k, min(length, end) generated tokens and whether EOS has
  appeared so far; it stops feeding a row once it is terminated (length frozen there).
  """
  b, t = signal_BxT.shape
  w = cfg.window

  def body(carry, start):
    state, stop_B = carry  # stop_B: generated length frozen by an earlier termination
    end = start + w
    length_now = jnp.minimum(jnp.minimum(length_B, end), stop_B)
    eos_now = eos_B & (length_B <= end) & (length_B <= stop_B)
    window = jax.lax.dynamic_slice(signal_BxT, (0, start), (b, w))
    state, fire = kat.window_update(state, window, length_now, eos_now, start, tau, spike_tau,
                                    cfg)
    return (state, jnp.where(fire, end, stop_B)), None

  init = (kat.init_state(b), jnp.full((b,), t, jnp.int32))
  (state, _), _ = jax.lax.scan(body, init, jnp.arange(0, t - w + 1, w))
  return state, kat.trained_length(state, length_B, cfg)


def _compare(signal, length, eos, tau, spike_tau, cfg):
  ref = kat.detect_offline(signal, length, eos, tau, spike_tau, cfg)
  state, trained = _in_loop(jnp.asarray(signal), jnp.asarray(length), jnp.asarray(eos),
                            tau, spike_tau, cfg)
  np.testing.assert_array_equal(np.asarray(state.terminated_B), ref["terminated"])
  np.testing.assert_array_equal(np.asarray(state.detect_B), ref["detect"])
  np.testing.assert_array_equal(np.asarray(state.onset_B), ref["onset"])
  np.testing.assert_array_equal(np.asarray(trained), ref["trained_len"])
  return ref


def test_low_stretch_terminates_exactly_rows_independently():
  # W=4, K=3: row 0 is low from token 8 on -> low windows [8,12), [12,16), [16,20) -> stop at 20,
  # onset 8. Row 1 has the same stretch broken by one high window -> stops 12 tokens later.
  # Row 2 never goes low. Row 3 is low everywhere but min_len=24 delays its detection.
  cfg = kat.KATConfig(window=4, patience=3, min_len=12)
  t = 48
  signal = np.ones((4, t), np.float32)
  signal[0, 8:] = 0.0
  signal[1, 8:] = 0.0
  signal[1, 16:20] = 1.0
  signal[3, :] = 0.0
  length = np.full(4, t, np.int32)
  eos = np.zeros(4, bool)
  ref = _compare(signal, length, eos, 0.5, np.inf, cfg)
  assert ref["terminated"].tolist() == [True, True, False, True]
  assert ref["detect"].tolist() == [20, 32, -1, 12]
  assert ref["onset"].tolist() == [8, 20, -1, 0]
  assert ref["trained_len"].tolist() == [8, 20, 48, 0]

  cfg24 = kat.KATConfig(window=4, patience=3, min_len=24, cut="detection")
  ref = _compare(signal, length, eos, 0.5, np.inf, cfg24)
  assert ref["detect"].tolist() == [24, 32, -1, 24]
  assert ref["onset"].tolist() == [8, 20, -1, 0]  # the run started before min_len
  assert ref["trained_len"].tolist() == [24, 32, 48, 24]

  # onset_floor: the onset cut, but never before min_len -- row 3 (low from token 0) keeps 24.
  floor = kat.KATConfig(window=4, patience=3, min_len=24, cut="onset_floor")
  ref = _compare(signal, length, eos, 0.5, np.inf, floor)
  assert ref["trained_len"].tolist() == [24, 24, 48, 24]


def test_spike_gate_needs_a_spike_in_an_earlier_window():
  cfg = kat.KATConfig(window=4, patience=2, min_len=0, spike_gate=True)
  signal = np.zeros((3, 32), np.float32)
  signal[1, 9] = 5.0  # spike in window [8, 12): low windows count from [12, 16) on
  signal[2, 30] = 5.0  # spike in the last window: too late
  ref = _compare(signal, np.full(3, 32), np.zeros(3, bool), 0.5, 2.0, cfg)
  assert ref["terminated"].tolist() == [False, True, False]
  assert (ref["detect"][1], ref["onset"][1]) == (20, 12)


def test_rows_that_end_are_never_terminated():
  cfg = kat.KATConfig(window=4, patience=2, min_len=0)
  signal = np.zeros((3, 16), np.float32)
  # Row 0 ends with EOS as the last token of window 2: windows 0, 1 fire first (at 8).
  # Row 1 ends with EOS at token 7 (window 1's last): only window 0 is complete -> no fire.
  # Row 2 stops at max length 8 (no EOS): window 1 complete -> fires at 8.
  ref = _compare(signal, np.array([12, 8, 8]), np.array([True, True, False]), 0.5, np.inf, cfg)
  assert ref["terminated"].tolist() == [True, False, True]
  assert ref["trained_len"].tolist() == [0, 8, 0]


def test_fixed_length_truncation():
  cfg = kat.KATConfig(mode="fixed", window=4, fixed_len=10)
  ref = _compare(np.zeros((3, 16), np.float32), np.array([16, 10, 11]), np.array([False, True, True]),
                 0.0, np.inf, cfg)
  assert ref["terminated"].tolist() == [True, False, True]
  assert ref["detect"].tolist() == [12, -1, 12]
  assert ref["trained_len"].tolist() == [10, 10, 10]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_in_loop_equals_offline_on_random_signals(data):
  w = data.draw(st.sampled_from([1, 2, 4]))
  cfg = kat.KATConfig(
      mode=data.draw(st.sampled_from(["kat", "kat", "fixed", "none", "horizon", "topk", "iw"])),
      window=w, patience=data.draw(st.integers(1, 4)), min_len=data.draw(st.integers(0, 12)),
      cut=data.draw(st.sampled_from(["onset", "detection", "onset_floor"])),
      spike_gate=data.draw(st.booleans()), fixed_len=data.draw(st.integers(1, 24)),
      horizon_start=1, topk_threshold=data.draw(st.sampled_from([0.3125, 0.5625, 1.0])),
      topk_drop=data.draw(st.sampled_from([0.0, 0.2, 0.25, 0.5, 1.0])),
      topk_base=data.draw(st.sampled_from([0.0, 0.0, 0.5])))
  b, t = 5, 24
  # Multiples of 1/8 keep every window sum exact, so jnp and numpy agree on each comparison.
  levels = data.draw(st.lists(st.integers(0, 16), min_size=b * t, max_size=b * t))
  signal = np.asarray(levels, np.float32).reshape(b, t) / 8
  length = np.asarray(data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b)), np.int32)
  eos = np.asarray(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
  tau = data.draw(st.sampled_from([0.3125, 0.5625, 1.0625]))
  if cfg.mode == "horizon":
    tau = float(data.draw(st.integers(1, 24)))  # the horizon reaches the rollout as its tau
  _compare(signal, length, eos, tau, 1.4375, cfg)


def test_horizon_is_fixed_truncation_at_the_steps_horizon():
  """TOPD / POPD: the horizon of step k cuts exactly as ESR's fixed length would."""
  cfg = kat.KATConfig(mode="horizon", window=4, horizon_start=6, horizon_step=4, horizon_every=3)
  assert [kat.horizon_at(k, cfg, 20) for k in range(0, 16, 3)] == [6, 10, 14, 18, 20, 20]
  signal = np.zeros((3, 24), np.float32)
  length, eos = np.array([24, 10, 11]), np.array([False, True, True])
  for step in (0, 3, 9):
    h = kat.horizon_at(step, cfg, 24)
    got = _compare(signal, length, eos, float(h), np.inf, cfg)
    want = kat.detect_offline(signal, length, eos, 0.0, np.inf,
                              kat.KATConfig(mode="fixed", window=4, fixed_len=h))
    for field in ("terminated", "detect", "onset", "trained_len"):
      np.testing.assert_array_equal(got[field], want[field], err_msg=f"{field} at step {step}")


def test_topk_drift_cut_lands_on_the_event_whose_weight_is_zero():
  # drop 0.25: the 4th drift event (overlap < 0.7) has weight 1 - 4 * 0.25 = 0 -> cut there.
  cfg = kat.KATConfig(mode="topk", window=4, topk_threshold=0.7, topk_drop=0.25)
  assert cfg.stop_events == 4 and kat.KATConfig(mode="topk", topk_drop=0.01).stop_events == 100
  overlap = np.ones((3, 16), np.float32)
  overlap[0, [1, 5, 6, 9, 12]] = 0.5  # 4th event at token 9 -> stop after window [8, 12)
  overlap[1, [1, 5, 6]] = 0.0  # 3 events only
  overlap[2, [1, 5, 6, 9]] = 0.5  # but the row ends (EOS) at 9 tokens: token 9 never exists
  ref = _compare(overlap, np.array([16, 16, 9]), np.array([False, False, True]), 0.0, np.inf,
                 cfg)
  assert ref["terminated"].tolist() == [True, False, False]
  assert ref["onset"].tolist() == [9, -1, -1] and ref["detect"].tolist() == [12, -1, -1]
  assert ref["trained_len"].tolist() == [9, 16, 9]
  # topk_base > 0 only re-weights: nothing is cut.
  soft = dataclasses.replace(cfg, topk_base=0.5)
  assert soft.stop_events == 0
  assert not _compare(overlap, np.array([16, 16, 9]), np.array([False] * 3), 0.0, np.inf,
                      soft)["terminated"].any()


def _weights_reference(mask, logratio, overlap, cfg):
  """loss_weights by the papers' formulas, one token at a time."""
  b, t = mask.shape
  out = np.zeros((b, t))
  for r in range(b):
    a = [abs(float(logratio[r, i])) if mask[r, i] else 0.0 for i in range(t)]
    total = max(sum(a), 1e-8)
    events = 0
    for i in range(t):
      if not mask[r, i]:
        continue
      if cfg.mode == "iw":  # TRL: 1 + gamma * (1 - S_prev / S_total), S_prev exclusive
        out[r, i] = 1 + cfg.iw_gamma * (1 - sum(a[:i]) / total)
      elif cfg.mode == "topk":  # Prune-OPD: clip(1 - drop * inclusive event count) + base
        events += overlap[r, i] < cfg.topk_threshold
        out[r, i] = min(max(1 - cfg.topk_drop * events, 0), 1) + cfg.topk_base
      else:
        out[r, i] = 1.0
  return out


@pytest.mark.parametrize("mode", ["iw", "topk", "kat", "none"])
def test_loss_weights_match_the_published_formulas(mode):
  rng = np.random.default_rng(0)
  b, t = 4, 12
  mask = np.arange(t)[None, :] < np.array([12, 7, 0, 1])[:, None]
  logratio = rng.normal(size=(b, t)).astype(np.float32)
  overlap = rng.integers(0, 5, size=(b, t)).astype(np.float32) / 4
  cfg = kat.KATConfig(mode=mode, iw_gamma=0.7, topk_drop=0.3, topk_base=0.25)
  got = np.asarray(kat.loss_weights(jnp.asarray(mask), jnp.asarray(logratio),
                                    jnp.asarray(overlap), cfg))
  np.testing.assert_allclose(got, _weights_reference(mask, logratio, overlap, cfg), rtol=1e-5,
                             atol=1e-6)
  if mode == "iw":  # TRL's own test case: a = [.2, -.3, .5], gamma 0.5 -> [1.5, 1.4, 1.25]
    w = kat.loss_weights(jnp.ones((1, 3), bool), jnp.asarray([[0.2, -0.3, 0.5]]), None,
                         kat.KATConfig(mode="iw"))
    np.testing.assert_allclose(np.asarray(w)[0], [1.5, 1.4, 1.25], rtol=1e-6)


def test_topk_overlap_is_the_share_of_student_top_k_in_teacher_top_k():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 3, 50)).astype(np.float32)
  t = rng.normal(size=(2, 3, 50)).astype(np.float32)
  t[0, 0] = s[0, 0]  # identical distributions: overlap 1
  got = np.asarray(kat.topk_overlap(jnp.asarray(s), jnp.asarray(t), 8))
  want = np.zeros((2, 3))
  for i in range(2):
    for j in range(3):
      top_s = set(np.argsort(-s[i, j])[:8])
      top_t = set(np.argsort(-t[i, j])[:8])
      want[i, j] = len(top_s & top_t) / 8
  np.testing.assert_allclose(got, want)
  assert got[0, 0] == 1.0


def test_random_truncation_matches_target_distribution():
  key = jax.random.key(0)
  length = jnp.full((20000,), 100, jnp.int32)
  targets = jnp.asarray([10, 50, 200])  # 200 > length: such draws leave the row uncut
  trained, cut = kat.random_truncation(key, length, targets)
  counts = np.bincount(np.asarray(trained), minlength=101)
  np.testing.assert_allclose(counts[[10, 50, 100]] / 20000, [1 / 3] * 3, atol=0.02)
  assert np.array_equal(np.asarray(cut), np.asarray(trained) < 100)


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="kat.signal='entropy'"):
    kat.KATConfig(signal="entropy")
  with pytest.raises(ValueError, match="fixed_len"):
    kat.KATConfig(mode="fixed")
  with pytest.raises(ValueError, match="kat.horizon_start >= 1"):
    kat.KATConfig(mode="horizon")
  with pytest.raises(ValueError, match="kat.topk_threshold"):
    kat.KATConfig(mode="topk", topk_threshold=1.5)
  with pytest.raises(ValueError, match="kat.iw_gamma=-1"):
    kat.KATConfig(mode="iw", iw_gamma=-1)
  with pytest.raises(ValueError, match="kat.mode='esr'"):
    kat.KATConfig(mode="esr")
