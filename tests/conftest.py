"""Shared test setup: 8 fake CPU devices (sharding tests), no hub access, strict rank promotion."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: tests on meshes need several devices. XLA's CPU
# backend at LLVM -O0 compiles the suite's hundreds of tiny programs ~40% faster (the mesh
# train-step tests: 129 -> 76 s of CPU) and runs them fast enough (the golden-metric, parity and
# memory tests pass unchanged); the XLA:TPU programs the AOT tests compile are byte-identical.
# Subprocess tests pass KAT_JAX_TEST_XLA_FLAGS on with their own device counts.
os.environ.setdefault("KAT_JAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["KAT_JAX_TEST_XLA_FLAGS"])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (installed for the ahead-of-time TPU compile tests) must not try to claim a TPU here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest -n 2: both workers may load it
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent compilation cache per test session, made by the first process that loads this
# file (pytest's controller, before it starts the xdist workers) and inherited by the workers and
# by the `python -m kat_jax.main` subprocesses tests start: a resume test runs the same programs
# in three processes, and many tests compile the same tiny models' programs. It cut the
# resume-after-exit test from 102 s to 77 s on a cold cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kat_jax_jit_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")
