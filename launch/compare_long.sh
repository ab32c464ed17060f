#!/usr/bin/env bash
# Truncation policies on the real model's long rollouts, on this machine (configs/smollm2_long*.py):
#   1. the uncut study of the initial student: loops, KL by position, where each policy would cut
#      (DIR/uncut/uncut.md, .json, policy_cuts.png; its matched Prune-OPD knob feeds step 2);
#   2. the training sweep: 9 policies x 2 seeds, budgets matched to KAT (resumable);
#   3. the uncut study again: the initial student and one seed's students after vanilla OPD and
#      after KAT (same prompts and draws; the first seed whose two exports are on this machine);
#   4. the sweep's table (DIR/tables/sweep.md).
#
#   bash launch/smollm2_setup.sh                  (once)
#   bash launch/compare_long.sh /tmp/long         (hours on 2 CPU cores: docs/results.md)
#   DRY_RUN=1 bash launch/compare_long.sh DIR     (print the commands only)
#   ONLY=s0_vanilla,s0_kat bash launch/compare_long.sh DIR    (a subset of the sweep's points)
#
# Rerunning skips finished runs, resumes an interrupted one, and keeps an existing uncut study.
# Across machines: RECORDS=docs/runs/smollm2_long first copies the finished runs recorded there
# into DIR (launch/records.sh; `bash launch/records.sh save DIR docs/runs/smollm2_long` records
# them), so the sweep goes on with the next run.
set -euo pipefail
DIR="${1:?usage: compare_long.sh WORKDIR}"
PY="${PYTHON:-python}"
run() { echo "+ $*"; if [[ -z "${DRY_RUN:-}" ]]; then "$@"; fi; }
if [[ -n "${RECORDS:-}" ]]; then
  run bash "$(dirname "$0")/records.sh" restore "$DIR" "$RECORDS"
fi
if [[ ! -f "$DIR/uncut/uncut.json" ]]; then
  run "$PY" -m kat_jax.studies.policies --config configs/smollm2_long.py --prompts 64 --samples 4 \
    --out "$DIR/uncut"
fi
run "$PY" -m kat_jax.sweep --config configs/smollm2_long_compare.py --workdir "$DIR" \
  ${ONLY:+--only "$ONLY"}
# Step 3 needs trained students: the exports of one seed's vanilla and KAT runs on this machine
# (records carry no weights, so a sweep spread over machines studies the seed whose two runs
# the last one trained; none: skipped).
SEED_AFTER=""
for s in 0 1 2 3; do
  if [[ -d "$DIR/s${s}_vanilla/export" && -d "$DIR/s${s}_kat/export" ]]; then SEED_AFTER=$s; break; fi
done
if [[ -z "${ONLY:-}" && ! -f "$DIR/uncut_after/uncut.json" && -n "$SEED_AFTER" ]]; then
  run "$PY" -m kat_jax.studies.policies --config configs/smollm2_long.py --prompts 64 --samples 4 \
    --initial --student "after vanilla OPD=$DIR/s${SEED_AFTER}_vanilla/export" \
    --student "after KAT=$DIR/s${SEED_AFTER}_kat/export" --out "$DIR/uncut_after"
fi
run "$PY" -m kat_jax.studies.policies --sweep "$DIR" --out "$DIR/tables"
