#!/usr/bin/env bash
# The KAT experiment on the embedded task, on this machine: 11 variants x 3 seeds of
# configs/arith.py (see configs/arith_compare.py), then the analysis (kat_jax.studies.experiment):
# the results table, detector precision / recall on uncut rollouts, and the KL-trace plot.
#
#   bash launch/compare_local.sh /tmp/kat_compare        (~80 min on 2 CPU cores)
#   DRY_RUN=1 bash launch/compare_local.sh DIR           (print the commands only)
#
# Rerunning skips finished runs (and resumes an interrupted one). Writes DIR/results.md and
# DIR/kl_traces.png; docs/results.md quotes them. Needs matplotlib (pip install -e ".[plot]").
set -euo pipefail
DIR="${1:?usage: compare_local.sh WORKDIR}"
PY="${PYTHON:-python}"
run() { echo "+ $*"; if [[ -z "${DRY_RUN:-}" ]]; then "$@"; fi; }
run "$PY" -m kat_jax.sweep --config configs/arith_compare.py --workdir "$DIR"
run "$PY" -m kat_jax.studies.experiment --sweep "$DIR" --out "$DIR/results.md"
