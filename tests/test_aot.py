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
  report = aot.check(cfg, "v5e:2x2")
  results, shape = report.results, report.mesh_shape
  assert shape == (4, 1, 1) and report.rollout_tensor == 0  # the batch over 4 chips: no split
  by_name = {r.name.split(" (")[0]: r for r in results}
  assert set(by_name) == {"rollout prefill", "rollout decode loop", "eval generation",
                          "update"}, results
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


def test_fsdp_decode_loop_is_tensor_parallel_not_batch_gathered(tmp_path):
  """On an FSDP mesh (1, 4, 1) the training layout's decode loop does what issue 14 found at
  paper scale -- the whole batch's activations or logits on every chip -- and the rollout's
  tensor-parallel layout (sharding.ROLLOUT_RULES, the default) does not; the check says so."""
  student, teacher = make_models(tmp_path)
  cfg = tiny_config(student, teacher)
  cfg.dtype = "bfloat16"
  cfg.mesh.data, cfg.mesh.fsdp = 1, -1
  found = {}
  for rollout_tensor in (-1, 0):
    report = aot.check(cfg, "v5e:2x2", rollout_tensor=rollout_tensor, update=False)
    assert report.mesh_shape == (1, 4, 1)
    assert report.rollout_tensor == (0 if rollout_tensor == -1 else 2)
    (loop,) = [r for r in report.results if r.name.startswith("rollout decode loop")]
    assert not loop.error, loop
    found[rollout_tensor] = loop.findings
  assert found[-1], "the FSDP decode loop should gather the batch to the weights"
  assert found[0] == [], found[0]


def test_loop_findings_reads_shapes_from_hlo():
  hlo = ("%ag = bf16[8,1,32]{2,1,0} all-gather(bf16[2,1,32]{2,1,0} %x)\n" * 2
         + "%l = f32[8,4,20]{2,1,0} add(%a, %b)\n")
  found = aot.loop_findings(hlo, batch=8, window=4, vocab=20, hidden=(32,), layers=2)
  assert len(found) == 2 and "[8, 4, 20]" in found[0] and "2 all-gathers" in found[1]
  assert aot.loop_findings(hlo.replace("[8,", "[4,"), 8, 4, 20, (32,), 2) == []
