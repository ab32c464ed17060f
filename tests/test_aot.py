"""Ahead-of-time compilation for a TPU topology on this CPU host (kat_jax/aot.py, needs libtpu)."""

import pytest

from kat_jax import aot, memory
from train_fixtures import make_models, tiny_config

pytest.importorskip("libtpu")


def test_a_tiny_pairs_step_compiles_for_a_tpu_topology(tmp_path):
  """Prefill, decode loop and update of a tiny bf16 pair compile for v5e:2x2 (4 chips) in
  seconds; the decode loop updates its donated state -- the KV caches -- in place."""
  student, teacher = make_models(tmp_path)
  cfg = tiny_config(student, teacher)
  cfg.dtype = "bfloat16"
  results, shape = aot.check(cfg, "v5e:2x2")
  assert shape == (4, 1, 1)
  by_name = {r.name.split(" (")[0]: r for r in results}
  assert set(by_name) == {"rollout prefill", "rollout decode loop", "update"}, results
  for r in results:
    assert not r.error, r
    assert r.code > 0 and r.argument > 0 and r.seconds < 60, r
  # Both models' caches: layers x (k, v) x rows per chip x kv heads x (prompt + buffer) x head_dim
  # x 2 bytes; the loop's outputs alias at least that much of its donated inputs (no copy).
  rows = 8 // 4
  kv = 2 * 2 * 2 * rows * 2 * (cfg.max_prompt_len + 16) * 8 * 2
  assert by_name["rollout decode loop"].alias >= kv
  plan = memory.for_config(cfg, shape, None, accelerator=True)
  text = aot.table(results, plan, 15.75 * aot.GiB)
  assert "rollout decode loop (B=8)" in text and "of 15.75 GiB" in text


def test_unknown_topology_is_one_clear_error():
  with pytest.raises(ValueError, match=r"--topology='v9x:1x1': cannot describe it"):
    aot.topology_devices("v9x:1x1")
