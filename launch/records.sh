#!/usr/bin/env bash
# A sweep's records in the repository, so that a sweep longer than one machine's life goes on
# where it stopped (launch/compare_long.sh restores them first):
#
#   bash launch/records.sh save    WORKDIR RECORDS   # finished runs + studies -> RECORDS
#   bash launch/records.sh restore WORKDIR RECORDS   # RECORDS -> WORKDIR (never overwrites)
#
# A run is finished when it has summary.json; its records are what the tables read (config,
# summary, evaluations, per-step metrics, per-rollout lengths, and contended.txt where someone
# noted that the run shared the machine, so its timing is left out) -- not its checkpoints,
# exports or TensorBoard files. A study directory (uncut*, tables) is kept without its rollout
# arrays.
set -euo pipefail
MODE="${1:?usage: records.sh save|restore WORKDIR RECORDS}"
DIR="${2:?usage: records.sh save|restore WORKDIR RECORDS}"
RECORDS="${3:?usage: records.sh save|restore WORKDIR RECORDS}"
case "$MODE" in
  save)
    mkdir -p "$RECORDS"
    for run in "$DIR"/*/; do
      name="$(basename "$run")"
      if [[ -f "$run/summary.json" ]]; then
        mkdir -p "$RECORDS/$name"
        for f in config.json summary.json eval_before.json eval_after.json metrics.jsonl \
                 rollouts.jsonl contended.txt; do
          [[ -f "$run/$f" ]] && cp "$run/$f" "$RECORDS/$name/"
        done
      elif [[ -f "$run/uncut.json" || -f "$run/sweep.md" ]]; then
        mkdir -p "$RECORDS/$name"
        find "$run" -maxdepth 1 -type f ! -name '*.npz' -exec cp {} "$RECORDS/$name/" \;
      fi
    done
    echo "saved $(ls "$RECORDS" | wc -l) records in $RECORDS";;
  restore)
    mkdir -p "$DIR"
    if [[ -d "$RECORDS" ]]; then
      for rec in "$RECORDS"/*/; do
        name="$(basename "$rec")"
        if [[ ! -e "$DIR/$name" ]]; then cp -r "$rec" "$DIR/$name"; fi
      done
    fi;;
  *) echo "usage: records.sh save|restore WORKDIR RECORDS" >&2; exit 2;;
esac
