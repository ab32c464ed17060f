#!/usr/bin/env bash
# kat_jax on a Cloud TPU VM or pod slice, with gcloud. Every command acts on ALL workers of the
# slice: JAX's multi-host runtime needs the same program started on each (kat_jax calls
# jax.distributed.initialize() when --config.distributed=True; configs/qwen3_opd.py sets it).
#
#   bash launch/tpu.sh create  NAME ZONE ACCELERATOR [RUNTIME]   # e.g. v5litepod-16 v2-alpha-tpuv5-lite
#   bash launch/tpu.sh install NAME ZONE                         # copy this checkout, pip install [tpu]
#   bash launch/tpu.sh run     NAME ZONE -- MAIN_ARGS...         # python -m kat_jax.main MAIN_ARGS
#   bash launch/tpu.sh sweep   NAME ZONE CONFIG WORKDIR          # each get_hyper point in turn
#   bash launch/tpu.sh delete  NAME ZONE
#
# DRY_RUN=1 prints the commands instead of running them (nothing is created or charged).
# The workdir must be visible to every worker (a Filestore / NFS mount, or a GCS bucket mounted
# with gcsfuse): Orbax writes checkpoints collectively, process 0 writes logs and the export.
set -euo pipefail
cmd="${1:-}"; name="${2:-}"; zone="${3:-}"
usage() { sed -n '5,10p' "$0" >&2; exit 2; }
[[ -n "$cmd" && -n "$name" && -n "$zone" ]] || usage
shift 3
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
ssh_all() {  # ssh_all "remote command": the same command on every worker, in parallel
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}
REMOTE_DIR="${REMOTE_DIR:-kat_jax}"
case "$cmd" in
  create)
    accel="${1:?ACCELERATOR, e.g. v5litepod-16 or v4-32}"
    runtime="${2:-tpu-ubuntu2204-base}"
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accel" \
      --version "$runtime"
    ;;
  install)
    here="$(cd "$(dirname "$0")/.." && pwd)"
    run gcloud compute tpus tpu-vm scp --recurse "$here" "$name:~/$REMOTE_DIR" --zone "$zone" \
      --worker=all
    ssh_all "cd ~/$REMOTE_DIR && bash launch/install.sh tpu"
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || { echo "run: give the kat_jax.main arguments after --" >&2; exit 2; }
    args="$(printf ' %q' "$@")"
    ssh_all "cd ~/$REMOTE_DIR && .venv/bin/python -m kat_jax.main$args --config.distributed=True"
    ;;
  sweep)
    config="${1:?CONFIG (a sweep config with get_hyper)}"; workdir="${2:?WORKDIR}"
    # The point names come from the config itself, so this machine needs kat_jax installed too.
    points="$("${PYTHON:-python}" -m kat_jax.sweep --config "$config" --workdir "$workdir" --list)"
    for point in $points; do
      ssh_all "cd ~/$REMOTE_DIR && .venv/bin/python -m kat_jax.sweep --distributed \
--config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir") --only $(printf '%q' "$point")"
    done
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *) usage ;;
esac
