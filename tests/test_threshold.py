"""The adaptive KAT threshold against a plain-Python reference over several training steps."""

import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax import threshold


def _reference(steps, cfg):
  """Per step: (tau used by that step's rollout, then update with its statistics)."""
  ema, n, out = 0.0, 0, []
  for k, (means, complete) in enumerate(steps):
    if cfg.mode == "fixed":
      out.append(-np.inf if k < cfg.warmup_steps else cfg.fixed_tau)
      continue
    out.append(-np.inf if k < cfg.warmup_steps or n == 0 else ema)
    vals = np.asarray(means, np.float64)[np.asarray(complete)]
    if vals.size == 0:
      continue
    stat = (np.quantile(vals, cfg.quantile) if cfg.mode == "adaptive"
            else cfg.ratio * vals.mean())
    ema = stat if n == 0 else cfg.momentum * ema + (1 - cfg.momentum) * stat
    n += 1
  return out


@pytest.mark.parametrize("cfg", [
    threshold.ThresholdConfig(),
    threshold.ThresholdConfig(mode="ratio", ratio=0.3, momentum=0.5, warmup_steps=2),
    threshold.ThresholdConfig(mode="fixed", fixed_tau=0.25, warmup_steps=3),
    threshold.ThresholdConfig(quantile=0.5, momentum=0.0, warmup_steps=0),
], ids=["adaptive", "ratio", "fixed", "median-no-ema"])
def test_tau_sequence_matches_reference(cfg):
  rng = np.random.RandomState(0)
  steps = []
  for k in range(9):
    means = rng.gamma(2.0, 0.1 * (1 + k), (6, 4)).astype(np.float32)
    complete = rng.rand(6, 4) < 0.7
    if k == 3:
      complete[:] = False  # a step with no complete window leaves tau unchanged
    steps.append((means, complete))
  state = threshold.init()
  got = []
  for k, (means, complete) in enumerate(steps):
    got.append(float(threshold.tau(state, k, cfg)))
    state = threshold.observe(state, jnp.asarray(means), jnp.asarray(complete), cfg)
  np.testing.assert_allclose(got, _reference(steps, cfg), rtol=1e-5)
  assert np.isneginf(got[0]), "KAT is off until tau has warmed up"


def test_bad_threshold_config_is_named():
  with pytest.raises(ValueError, match="threshold.mode='median'"):
    threshold.ThresholdConfig(mode="median")
