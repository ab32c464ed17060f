"""Shared test setup: 8 fake CPU devices (sharding tests), no hub access, strict rank promotion."""

import os

# Must happen before jax is imported anywhere: tests on meshes need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (installed for the ahead-of-time TPU compile tests) must not try to claim a TPU here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest -n 2: both workers may load it
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes tens of seconds (deselect with -m 'not slow')")
