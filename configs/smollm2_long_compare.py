"""Every truncation policy on the real model's long rollouts, at KAT's token budget, 2 seeds.

Run:      bash launch/compare_long.sh /tmp/long      (uncut study, then this sweep, then tables)
          or only the sweep: python -m kat_jax.sweep --config configs/smollm2_long_compare.py \
                                   --workdir /tmp/long [--only s0_vanilla,s0_kat]
Needs:    launch/smollm2_setup.sh once; for `topk`, the uncut study's DIR/uncut/uncut.json.
Expected: 18 runs of configs/smollm2_long.py (40 steps each); rerunning skips finished runs and
          resumes an interrupted one from its last checkpoint. Wall-clock per run: docs/results.md.

Points (seed s in 0, 1; each seed's runs share prompts and the initial student), in run order:
  vanilla   no truncation;
  kat       KAT, the paper's plain rule (adaptive tau, cut at the onset);
  spike     KAT with the spike gate;
  floor     KAT, cut at the onset but never before min_len (kat.cut='onset_floor');
  esr       ESR / TOPD fixed-length truncation, N matched: the N at which the same seed's vanilla
            rollouts, cut at N, train as many tokens per rollout as its KAT run trained (`prepare`;
            TOPD with a fixed horizon is this same rule, tested equal);
  random    the loss cut at lengths drawn from the same seed's KAT run's cuts (rate and lengths);
  topk      Prune-OPD drift truncation, the drift-event count matched to KAT's budget on the uncut
            study's rollouts (DIR/uncut/uncut.json: knobs.topk_events);
  popd      POPD's growing horizon 64 -> 512 over the run (not budget-matched: its schedule is
            the knob; its trained tokens are reported);
  iw        IW-OPD weights, gamma 0.5 (no cut, nothing to match).
"""

import importlib.util
import json
from pathlib import Path

import numpy as np

from kat_jax.studies.policies import SWEEP_ORDER as ORDER  # the table's order too

SEEDS = [0, 1]


def _long():
  spec = importlib.util.spec_from_file_location(
      "smollm2_long", Path(__file__).with_name("smollm2_long.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _long().get_config(None)
  c.log_rollouts = True
  return c


def get_hyper(hyper):
  policies = _long().POLICIES
  points = []
  for name in ORDER:
    point = {"name": name}
    if name == "random":
      point.update({"config.kat.mode": "random", "match": "kat"})
    else:
      point.update({f"config.kat.{k}": v for k, v in policies[name].items()})
    if name in ("esr", "topk"):
      point["match"] = "kat"
    if name != "vanilla":  # the initial student is evaluated once per seed, in its vanilla run
      point["config.eval_before"] = False
    points.append(point)
  return hyper.product([hyper.chain([{"name": f"s{s}", "config.seed": s} for s in SEEDS]),
                        hyper.chain(points)])


def _rollouts(path: Path) -> list[dict]:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: run {path.parent.name} first (the sweep's "
                            "order does).")
  return [json.loads(line) for line in path.read_text().splitlines()]


def matched_length(lengths, target: float) -> int:
  """The smallest N with mean(min(length, N)) >= target: a fixed cut that trains `target`."""
  lengths = np.asarray(lengths)
  return next((n for n in range(1, int(lengths.max()) + 1)
               if np.minimum(lengths, n).mean() >= target), int(lengths.max()))


def prepare(config, point, workdir: Path):
  """Budget matching against the same seed's KAT run (it runs before the matched points)."""
  match = point.get("match")
  if match is None:
    return config
  recs = _rollouts(workdir / f"s{config.seed}_{match}" / "rollouts.jsonl")
  mode = config.kat.mode
  if mode == "random":
    config.kat.random_lengths = [t if cut else config.max_new_tokens + 1 for r in recs
                                 for t, cut in zip(r["trained_len"], r["terminated"])]
  elif mode == "fixed":
    target = float(np.mean([t for r in recs for t in r["trained_len"]]))
    vanilla = _rollouts(workdir / f"s{config.seed}_vanilla" / "rollouts.jsonl")
    config.kat.fixed_len = matched_length([n for r in vanilla for n in r["length"]], target)
  elif mode == "topk":
    study = workdir / "uncut" / "uncut.json"
    if not study.is_file():
      raise FileNotFoundError(f"{study} is missing: run the uncut study first "
                              "(python -m kat_jax.studies.policies ... --out DIR/uncut).")
    knobs = next(iter(json.loads(study.read_text()).values()))["knobs"]
    config.kat.topk_drop = 1.0 / knobs["topk_events"]
  return config
