"""Launch scripts: valid bash, and a dry-run mode that prints the exact commands they would run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


def _dry(*args):
  env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
  out = subprocess.run(["bash", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return [line for line in out.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(script)], check=True)


def test_tpu_lifecycle_dry_run():
  tpu = ROOT / "launch" / "tpu.sh"
  (create,) = _dry(tpu, "create", "kat", "us-central2-b", "v4-32")
  assert create.startswith("+ gcloud compute tpus tpu-vm create kat --zone us-central2-b "
                           "--accelerator-type v4-32")
  scp, install = _dry(tpu, "install", "kat", "us-central2-b")
  assert "tpu-vm scp --recurse" in scp and "--worker=all" in scp
  assert "--worker=all" in install and "launch/install.sh\\ tpu" in install
  (run,) = _dry(tpu, "run", "kat", "z", "--", "--config", "configs/qwen3_opd.py", "--workdir",
                "/mnt/a b")
  assert "--worker=all" in run and "kat_jax.main\\ --config\\ configs/qwen3_opd.py" in run
  assert "/mnt/a\\\\\\ b" in run  # the space survives two shells
  assert run.endswith("--config.distributed=True")
  sweep = _dry(tpu, "sweep", "kat", "z", "configs/arith_compare.py", "/mnt/cmp")
  assert len(sweep) == 33 and all("kat_jax.sweep\\ --distributed" in s for s in sweep)
  assert sweep[3].endswith("--only\\ s0_random")
  (delete,) = _dry(tpu, "delete", "kat", "z")
  assert delete == "+ gcloud compute tpus tpu-vm delete kat --zone z --quiet"
  bad = subprocess.run(["bash", str(tpu), "frobnicate", "a", "b"], capture_output=True, text=True)
  assert bad.returncode == 2 and "create" in bad.stderr


def test_install_and_compare_dry_runs():
  lines = _dry(ROOT / "launch" / "install.sh", "tpu")
  assert any('pip install -q -e .[tpu]' in line for line in lines)
  sweep, report = _dry(ROOT / "launch" / "compare_local.sh", "/tmp/x")
  assert "kat_jax.sweep --config configs/arith_compare.py --workdir /tmp/x" in sweep
  assert "kat_jax.studies.experiment --sweep /tmp/x" in report


def test_smollm2_setup_dry_run(tmp_path, monkeypatch):
  monkeypatch.setenv("KAT_JAX_MODELS", str(tmp_path))
  lines = _dry(ROOT / "launch" / "smollm2_setup.sh")
  assert lines == [
      f"+ {sys.executable} -m kat_jax.gguf_import --gguf smollm2 --out {tmp_path}/smollm2",
      f"+ {sys.executable} -m kat_jax.prune --model {tmp_path}/smollm2 --layers 20 --out "
      f"{tmp_path}/smollm2_l20"]
  (tmp_path / "smollm2").mkdir()
  (tmp_path / "smollm2" / "config.json").write_text("{}")
  assert len(_dry(ROOT / "launch" / "smollm2_setup.sh")) == 1  # existing models are kept


def test_long_compare_dry_run(tmp_path):
  study, sweep, table = _dry(ROOT / "launch" / "compare_long.sh", tmp_path)
  assert "uncut_after" not in sweep + table  # no trained students to study yet
  for run in ("s1_vanilla", "s1_kat"):
    (tmp_path / run / "export").mkdir(parents=True)
  study, sweep, after, table = _dry(ROOT / "launch" / "compare_long.sh", tmp_path)
  assert f"after vanilla OPD={tmp_path}/s1_vanilla/export" in after
  assert "kat_jax.studies.policies --config configs/smollm2_long.py" in study
  assert study.endswith(f"--out {tmp_path}/uncut")
  assert f"kat_jax.sweep --config configs/smollm2_long_compare.py --workdir {tmp_path}" in sweep
  assert f"after KAT={tmp_path}/s1_kat/export" in after
  assert table.endswith(f"--sweep {tmp_path} --out {tmp_path}/tables")
  (tmp_path / "uncut").mkdir()
  (tmp_path / "uncut" / "uncut.json").write_text("{}")
  env_only = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, ONLY="s0_vanilla")
  out = subprocess.run(["bash", str(ROOT / "launch" / "compare_long.sh"), str(tmp_path)],
                       cwd=ROOT, env=env_only, capture_output=True, text=True, timeout=60)
  lines = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
  assert len(lines) == 2 and lines[0].endswith("--only s0_vanilla")  # the study is kept


def test_records_keep_finished_runs_without_checkpoints_and_never_overwrite(tmp_path):
  work, records = tmp_path / "work", tmp_path / "records"
  for name, files in (("s0_vanilla", ["summary.json", "metrics.jsonl", "rollouts.jsonl",
                                      "eval_after.json", "checkpoints/10/x", "export/m.bin"]),
                      ("s0_kat", ["metrics.jsonl", "checkpoints/10/x"]),  # unfinished
                      ("uncut", ["uncut.json", "uncut.md", "rollouts_0.npz"])):
    for f in files:
      (work / name / f).parent.mkdir(parents=True, exist_ok=True)
      (work / name / f).write_text(name)
  script = str(ROOT / "launch" / "records.sh")
  subprocess.run(["bash", script, "save", str(work), str(records)], check=True,
                 capture_output=True)
  kept = sorted(str(p.relative_to(records)) for p in records.rglob("*") if p.is_file())
  assert kept == ["s0_vanilla/eval_after.json", "s0_vanilla/metrics.jsonl",
                  "s0_vanilla/rollouts.jsonl", "s0_vanilla/summary.json", "uncut/uncut.json",
                  "uncut/uncut.md"]
  fresh = tmp_path / "fresh"
  (fresh / "uncut").mkdir(parents=True)
  (fresh / "uncut" / "uncut.json").write_text("newer")
  subprocess.run(["bash", script, "restore", str(fresh), str(records)], check=True)
  assert (fresh / "s0_vanilla" / "summary.json").read_text() == "s0_vanilla"
  assert (fresh / "uncut" / "uncut.json").read_text() == "newer"  # an existing one is kept
