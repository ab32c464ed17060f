"""Ahead-of-time compilation for a TPU topology on this CPU host (kat_jax/aot.py, needs libtpu)."""

import re

import pytest

from kat_jax import aot, memory
from kat_jax import config as config_lib
from kat_jax.models import ConfigError
from train_fixtures import make_models, tiny_config

pytest.importorskip("libtpu")


@pytest.fixture(scope="module")
def tiny_step(tmp_path_factory):
  """(config, report): a tiny bf16 pair's step compiled for v5e:2x2, shared by two tests."""
  student, teacher = make_models(tmp_path_factory.mktemp("models"))
  cfg = tiny_config(student, teacher)
  cfg.dtype = "bfloat16"
  return cfg, aot.check(cfg, "v5e:2x2")


def test_a_tiny_pairs_step_compiles_for_a_tpu_topology(tiny_step):
  """Prefill, decode loop and update of a tiny bf16 pair compile for v5e:2x2 (4 chips) in
  seconds; the decode loop updates its donated state -- the KV caches -- in place."""
  cfg, report = tiny_step
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


def test_compacted_decode_loops_compile_smaller(tmp_path):
  """Every batch the rollout compacts to compiles, and a half batch holds about half the KV
  cache (the loop's aliased, donated state)."""
  student, teacher = make_models(tmp_path)
  cfg = tiny_config(student, teacher)
  cfg.dtype = "bfloat16"
  cfg.compact_multiple = 0  # batch / 8 = 1 row, rounded up to the 4 batch shards: sizes 8, 4
  report = aot.check(cfg, "v5e:2x2", update=False, compaction=True)
  loops = {r.name: r for r in report.results if r.name.startswith("rollout decode loop")}
  assert set(loops) == {"rollout decode loop (B=8)", "rollout decode loop (B=4)"}
  full, half = loops["rollout decode loop (B=8)"], loops["rollout decode loop (B=4)"]
  assert not full.error and not half.error
  assert half.alias == pytest.approx(full.alias / 2, rel=0.1)


def test_a_run_that_cannot_fit_is_refused_with_the_program_and_knobs(tiny_step):
  cfg, report = tiny_step
  biggest = max(report.results, key=lambda r: r.peak)
  aot.refuse_if_too_big(report, biggest.peak / 0.89, cfg)  # everything within 90%: no error
  with pytest.raises(ConfigError, match=rf"the {re.escape(biggest.name)} program needs .* GiB "
                                        r"per device \(XLA's compiled memory, largest part .*; "
                                        r"try .*more devices"):
    aot.refuse_if_too_big(report, biggest.peak / 0.95, cfg)


def test_train_runs_the_compile_check_on_its_own_devices(tmp_path, capsys):
  """compile_check='on' on CPU (it is automatic on TPU): the rollout and update are compiled
  from config.json alone before any weight loads, then training goes on."""
  from kat_jax import train
  student, teacher = make_models(tmp_path)
  cfg = tiny_config(student, teacher, steps=1)
  cfg.compile_check, cfg.eval_size, cfg.export = "on", 0, False
  cfg.device_memory_gb = 8.0
  train.train(cfg, tmp_path / "run")
  out = capsys.readouterr().out
  assert "compile check (" in out and "update (full length)" in out
  assert out.index("compile check (") < out.index("kat_jax OPD summary")


def test_memory_plan_is_within_15_percent_of_the_tpu_compiler(tmp_path):
  """configs/qwen3_opd.py's knobs and the Qwen3-1.7B / 8B widths (one layer each, so it compiles
  in ~45 s) on v5e:2x2: the analytic plan (kat_jax.memory) of the rollout phase and of the update
  phase is within 15% of XLA:TPU's per-device peak. Before the plan counted the update's gathered
  [V, E] LM head and its fp32 gradient it was 50% low here."""
  from kat_jax.configfile import load_config
  cfg = load_config("configs/qwen3_opd.py")
  cfg.student = memory.write_known_config(tmp_path / "student", "Qwen3-1.7B", layers=1)
  cfg.teacher = memory.write_known_config(tmp_path / "teacher", "Qwen3-8B", layers=1)
  cfg.prompts_per_step, cfg.samples_per_prompt, cfg.max_new_tokens = 4, 2, 1024
  cfg.loss.microbatches = 2  # one row per chip at a time, as the paper-scale run
  report = aot.check(cfg, "v5e:2x2", evaluation=False)
  plan = memory.for_config(cfg, report.mesh_shape, None, accelerator=True)
  peaks = {r.name.split(" (")[0]: r.peak for r in report.results if not r.error}
  assert set(peaks) == {"rollout prefill", "rollout decode loop", "update"}, report.results
  rollout_peak = max(peaks["rollout prefill"], peaks["rollout decode loop"])
  assert plan.rollout_phase == pytest.approx(rollout_peak, rel=0.15), (plan.table(), peaks)
  assert plan.update_phase == pytest.approx(peaks["update"], rel=0.15), (plan.table(), peaks)


def test_a_lora_students_update_holds_adapter_sized_optimizer_state(tiny_step):
  """The tiny bf16 pair with rank-4 adapters compiles for v5e:2x2; its update's arguments lose
  what full fine-tuning of the bf16 student keeps there -- float32 master weights (4 bytes per
  param) and float32 Adam moments (8) -- and gain only the frozen bf16 base (2), the adapters and
  their moments."""
  cfg, full = tiny_step
  lora_cfg = cfg.copy_and_resolve_references()
  lora_cfg.lora.rank = 4
  report = aot.check(lora_cfg, "v5e:2x2", evaluation=False)
  (update,) = [r for r in report.results if r.name.startswith("update")]
  (full_update,) = [r for r in full.results if r.name.startswith("update")]
  assert not update.error, update
  s = memory.model_config(cfg.student, "bfloat16")
  params = memory.param_bytes(s, report.mesh_shape, 2)  # bf16 bytes per device
  adapters = memory.param_bytes(s.replace(lora=config_lib.lora_config(lora_cfg)),
                                report.mesh_shape, 2, part="lora")
  # TPU tiles pad a tiny model's small arrays, so the exact bytes are larger than these sums:
  # at least what the arithmetic says is saved (bench/lora_memory.py: real widths, 1.01 -> 0.17
  # GiB of update arguments for Qwen3-1.7B's layer shapes).
  saved = full_update.argument - update.argument
  assert saved >= params * 12 / 2 - params - 3 * adapters > 0, (full_update, update)
