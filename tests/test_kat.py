"""The KAT detector: in-loop window updates vs the offline numpy reference and hand-built traces."""

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
      mode=data.draw(st.sampled_from(["kat", "kat", "fixed", "none"])),
      window=w, patience=data.draw(st.integers(1, 4)), min_len=data.draw(st.integers(0, 12)),
      cut=data.draw(st.sampled_from(["onset", "detection", "onset_floor"])),
      spike_gate=data.draw(st.booleans()), fixed_len=data.draw(st.integers(1, 24)))
  b, t = 5, 24
  # Multiples of 1/8 keep every window sum exact, so jnp and numpy agree on each comparison.
  levels = data.draw(st.lists(st.integers(0, 16), min_size=b * t, max_size=b * t))
  signal = np.asarray(levels, np.float32).reshape(b, t) / 8
  length = np.asarray(data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b)), np.int32)
  eos = np.asarray(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
  tau = data.draw(st.sampled_from([0.3125, 0.5625, 1.0625]))
  _compare(signal, length, eos, tau, 1.4375, cfg)


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
