#!/usr/bin/env bash
# Installs kat_jax into ./.venv for one platform. Run on every worker of a TPU slice / GPU host.
#   bash launch/install.sh cpu      # CPU only (also what the tests use)
#   bash launch/install.sh tpu      # TPU VM: jax[tpu] (libtpu)
#   bash launch/install.sh cuda12   # NVIDIA GPUs: jax[cuda12] (CUDA 12 wheels from PyPI)
#   bash launch/install.sh test     # CPU + test extras (pytest, torch CPU, transformers)
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
platform="${1:-cpu}"
cd "$(dirname "$0")/.."
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $*"; else "$@"; fi; }
case "$platform" in
  cpu) extra="" ;;
  tpu) extra="[tpu]" ;;
  cuda12) extra="[cuda12]" ;;
  test) extra="[test]" ;;
  *) echo "usage: $0 {cpu|tpu|cuda12|test}" >&2; exit 2 ;;
esac
run python3 -m venv .venv
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/pip install -q -e ".${extra}"
run .venv/bin/python -c "import jax; print('kat_jax installed;', jax.device_count(), jax.default_backend(), 'device(s)')"
