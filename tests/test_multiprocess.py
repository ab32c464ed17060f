"""Two processes on one machine (JAX's multi-host runtime over gloo, 4 CPU devices each, FSDP and
the rollout's tensor-parallel layout across them): the training loop gives the same rollouts and
losses as one process with 8 devices (all-data); process 0 alone writes logs and the export, both
write the Orbax checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kat_jax import safetensors_io

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import make_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(spec, workdir, n_procs, devices_each, extra=()):
  port = _free_port()
  procs = []
  for i in range(n_procs):
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each} "
               + os.environ["KAT_JAX_TEST_XLA_FLAGS"])
    args = [sys.executable, "-m", "kat_jax.main", "--config", spec, "--workdir", str(workdir),
            *extra]
    if n_procs > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n_procs),
                 JAX_PROCESS_ID=str(i))
      args.append("--config.distributed=True")
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return make_models(tmp_path_factory.mktemp("models"))


def test_two_processes_train_like_one(models, tmp_path):
  spec = f"tests/tiny_config.py:{models[0]},{models[1]},2"
  # 16 rollouts through 8 decode slots: slot refill's prefills and row updates across processes.
  refill = ("--config.prompts_per_step=8", "--config.rollout.slots=8")
  _launch(spec, tmp_path / "one", 1, 8, refill)
  # FSDP over both processes: the student is resharded into the rollout's tensor-parallel groups
  # (2 devices each, the batch over the 4 groups, across the processes) and back every step.
  outs = _launch(spec, tmp_path / "two", 2, 4,
                 ("--config.mesh.data=1", "--config.mesh.fsdp=-1", *refill))
  assert "kat_jax OPD summary" in outs[0][0] and "kat_jax OPD summary" not in outs[1][0]
  one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
  two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
  assert len(one) == len(two)  # written once, by process 0
  for a, b in zip(one, two):
    assert a["step"] == b["step"]
    for key in ("gen_len", "trained_len", "trap_rate"):
      if key in a:
        assert a[key] == b[key], (a["step"], key)
    for key in ("loss", "kl", "eval/avg@4"):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
  assert (tmp_path / "two" / "checkpoints" / "2").is_dir()
  x = {n: safetensors_io.read_tensor(i) for n, i in
       safetensors_io.read_header(tmp_path / "one" / "export" / "model.safetensors").items()}
  y = {n: safetensors_io.read_tensor(i) for n, i in
       safetensors_io.read_header(tmp_path / "two" / "export" / "model.safetensors").items()}
  assert x.keys() == y.keys()
  for n in x:
    np.testing.assert_allclose(y[n], x[n], rtol=1e-4, atol=1e-6, err_msg=n)
