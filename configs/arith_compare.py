"""The KAT experiment on the embedded task: vanilla OPD vs truncation baselines vs KAT, 3 seeds.

Run:      bash launch/compare_local.sh /tmp/kat_compare      (sweep + docs/results.md + plots)
          or only the sweep: python -m kat_jax.sweep --config configs/arith_compare.py \
                                   --workdir /tmp/kat_compare [--only s0_plain,s0_random]
Expected: 33 runs of configs/arith.py (400 steps each), ~2.2 min per run on 2 CPU cores:
          ~75 min in all; rerunning skips finished runs and resumes an interrupted one.

Variants (each with seeds 0, 1, 2 -- the seed drives every sampled token; prompts are the same):
  vanilla   OPD without any truncation (kat.mode=none);
  fixed     fixed-length truncation: every rollout's loss stops at 24 tokens;
  plain     KAT, the paper's rule: adaptive tau, no spike gate;
  random    random truncation matched to `plain` of the same seed: each rollout is cut with the
            probability and at the lengths that plain KAT cut its rollouts (see `prepare`);
  fixedtau  KAT with a fixed tau = 1e-3 (about the adaptive tau's typical value here);
  spike     KAT adaptive with the spike gate (the default of configs/arith.py);
  logratio  plain KAT on the sampled log-ratio log p_s(y) - log p_t(y) instead of the full KL;
  floor     plain KAT, cut at the onset but never before min_len (kat.cut='onset_floor');
  topk      Prune-OPD drift truncation: top-4 overlap < 0.7 is a drift event, the loss weight
            falls by 0.1 per event and the row is cut at the 10th (the vocabulary has 17 symbols,
            so the paper's k = 16 would overlap almost always);
  popd      POPD's growing horizon: 12 tokens, +12 every 100 steps (12, 24, 36, 48);
  iw        IW-OPD discrepancy weights, gamma 0.5 (no cut).
"""

import importlib.util
import json
from pathlib import Path

VARIANTS = [
    {"name": "vanilla", "config.kat.mode": "none"},
    {"name": "fixed", "config.kat.mode": "fixed", "config.kat.fixed_len": 24},
    {"name": "plain", "config.kat.spike_gate": False},
    {"name": "random", "config.kat.mode": "random", "match": "plain"},
    {"name": "fixedtau", "config.kat.spike_gate": False, "config.threshold.mode": "fixed",
     "config.threshold.fixed_tau": 1e-3},
    {"name": "spike"},
    {"name": "logratio", "config.kat.spike_gate": False, "config.kat.signal": "logratio"},
    # The rival policies of the long-rollout comparison (kat_jax/kat.py), sized for ~36 tokens.
    {"name": "floor", "config.kat.spike_gate": False, "config.kat.cut": "onset_floor"},
    {"name": "topk", "config.kat.mode": "topk", "config.kat.topk_k": 4,
     "config.kat.topk_threshold": 0.7, "config.kat.topk_drop": 0.1, "config.kat.topk_base": 0.0},
    {"name": "popd", "config.kat.mode": "horizon", "config.kat.horizon_start": 12,
     "config.kat.horizon_step": 12, "config.kat.horizon_every": 100},
    {"name": "iw", "config.kat.mode": "iw", "config.kat.iw_gamma": 0.5},
]
SEEDS = [0, 1, 2]


def get_config(arg=None):
  # configs/arith.py, loaded by path (config files are not a package).
  spec = importlib.util.spec_from_file_location("arith_config", Path(__file__).with_name("arith.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.log_rollouts = True
  return c


def get_hyper(hyper):
  return hyper.product([
      hyper.chain([{"name": f"s{s}", "config.seed": s} for s in SEEDS]),
      hyper.chain(VARIANTS),
  ])


def prepare(config, point, workdir: Path):
  """`random`: cut lengths matched to the same seed's plain-KAT run (which runs before it).

  Every rollout of that run contributes one entry: its trained length if KAT cut it, otherwise a
  length past max_new_tokens (drawing it never cuts). Drawing uniformly from the list reproduces
  plain KAT's cut rate and cut-length distribution, independent of the rollout's content.
  """
  if point.get("match") is None:
    return config
  source = workdir / f"s{config.seed}_{point['match']}" / "rollouts.jsonl"
  if not source.is_file():
    raise FileNotFoundError(f"{source} is missing: run the s{config.seed}_{point['match']} point "
                            "first (the sweep's order does).")
  lengths = []
  with open(source) as f:
    for line in f:
      rec = json.loads(line)
      lengths += [t if cut else config.max_new_tokens + 1
                  for t, cut in zip(rec["trained_len"], rec["terminated"])]
  config.kat.random_lengths = lengths
  return config
