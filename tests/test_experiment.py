"""The experiment's analysis: slip positions, detector scoring against brute force, the table."""

import json

import numpy as np
import pytest

from kat_jax import kat
from kat_jax.studies import experiment
from kat_jax.data import arith


def test_slip_token_points_at_the_first_wrong_character():
  prompt = "25+91-20+22="
  wrong = "25+91=116;116-20=86;86+22=108;\\boxed{108}"
  i = experiment.slip_token(prompt, wrong)
  assert wrong[i] == "8" and wrong[:i].endswith("116-20=")
  assert experiment.slip_token(prompt, "25+91=116;116-20=96;96+22=118;\\boxed{118}") is None
  # A wrong digit in the middle of a result: the slip is that digit, not the line start.
  i = experiment.slip_token("50+60=", "50+60=120;\\boxed{120}")
  assert "50+60=120"[i] == "2"
  # Token index == character index: the tokenizer is character-level on the scratchpad.
  assert len(arith.encode(wrong)) == len(wrong) - len("\\boxed{") + 1


def _synthetic(seed=0, rows=40, t=24):
  rng = np.random.default_rng(seed)
  kl = rng.lognormal(-6, 2, (rows, t)).astype(np.float32)
  length = rng.integers(8, t + 1, rows)
  correct = rng.random(rows) < 0.5
  slip = np.where(correct, -1, rng.integers(0, 8, rows))
  w = 4
  complete = np.arange(t // w)[None, :] * w + w <= length[:, None]
  return dict(kl=kl, logratio=kl, length=length, eos=np.ones(rows, bool), correct=correct,
              slip=slip, window_complete=complete)


@pytest.mark.parametrize("gate", [False, True])
def test_detector_scores_match_brute_force_counts(gate):
  data = _synthetic()
  s = experiment.detector_scores(data, "kl", gate)
  w = 4
  means = [data["kl"][r, i * w:(i + 1) * w].mean() for r in range(40) for i in range(6)
           if data["window_complete"][r, i]]
  assert s["tau"] == pytest.approx(np.quantile(means, 0.2), rel=1e-5)
  det = kat.detect_offline(data["kl"], data["length"], data["eos"], s["tau"], 2.0,
                           kat.KATConfig(mode="kat", window=4, patience=2, min_len=8,
                                         spike_gate=gate))
  flagged = [r for r in range(40) if det["terminated"][r]]
  wrong = [r for r in range(40) if not data["correct"][r]]
  tp = [r for r in flagged if r in wrong]
  assert s["precision"] == pytest.approx(len(tp) / max(len(flagged), 1))
  assert s["recall"] == pytest.approx(len(tp) / len(wrong))
  assert s["flagged"] == pytest.approx(len(flagged) / 40)


def test_sweep_table_pairs_seeds_against_vanilla(tmp_path):
  for seed in (0, 1):
    for name, avg in (("vanilla", 0.5 + seed * 0.1), ("plain", 0.55 + seed * 0.1)):
      d = tmp_path / f"s{seed}_{name}"
      d.mkdir()
      report = {"k": 4, "macro": {"avg@4": avg, "pass@4": 0.9, "avg@4_ci": [avg - .02, avg + .02],
                                  "pass@4_ci": [0.88, 0.92]}}
      (d / "eval_after.json").write_text(json.dumps(report))
      (d / "eval_before.json").write_text(json.dumps(report))
      (d / "summary.json").write_text(json.dumps(dict(mean_trained_length=30.0,
                                                      mean_rollout_length=32.0, trap_rate=0.1)))
      (d / "metrics.jsonl").write_text("".join(json.dumps(dict(step=i, step_time=0.25 + i / 1e3))
                                               + "\n" for i in range(1, 11)))
  table, agg = experiment.sweep_table(tmp_path, ["vanilla", "plain"])
  assert agg["plain"]["d_avg"] == pytest.approx(0.05)
  assert agg["vanilla"]["step_time"] == pytest.approx(0.25 + 8 / 1e3)  # median of steps 6..10
  assert table.splitlines()[2].startswith("| vanilla | 2 | 0.550 ± 0.071 (±0.020) | — |")
  # Δ's interval: 4 runs with half-width 0.02 as independent normals, mean of 2 differences:
  # ±sqrt(4 × 0.02²) / 2 = ±0.02. Δ pass@4 is 0 with the same width.
  assert agg["plain"]["d_avg_ci"] == pytest.approx([0.03, 0.07])
  assert "| plain | 2 | 0.600 ± 0.071 (±0.020) | 0.050 ± 0.000 [+0.030, +0.070] |" in table
  assert "| 0.000 ± 0.000 [-0.020, +0.020] |" in table


def test_long_sweep_table_reports_loops_lengths_and_weights(tmp_path):
  from kat_jax.studies import policies
  for seed in (0, 1):
    for name, avg, loops, weight in (("vanilla", 0.1, 0.2, 300.0), ("iw", 0.15, 0.1, 400.0)):
      d = tmp_path / f"s{seed}_{name}"
      d.mkdir()
      half = 0.03 if name == "vanilla" else 0.04  # the runs' own interval half-widths
      report = {"k": 4, "macro": {"avg@4": avg + seed / 10, "pass@4": 0.3,
                                  "avg@4_ci": [avg + seed / 10 - half, avg + seed / 10 + half]},
                "benchmarks": {"heldout": {"mean_length": 100.0 + seed}}}
      (d / "eval_after.json").write_text(json.dumps(report))
      (d / "eval_before.json").write_text(json.dumps(report))
      (d / "summary.json").write_text(json.dumps(dict(
          mean_trained_length=300.0, mean_rollout_length=310.0, trap_rate=0.0, loop_after=loops,
          loop_before=0.3, mean_trained_weight=weight, loop_rate=0.25)))
      (d / "metrics.jsonl").write_text("".join(json.dumps(dict(step=i, step_time=10.0))
                                               + "\n" for i in range(12)))
  # A run that shared the machine: its times are not the policy's, and the table says so.
  (tmp_path / "s1_iw" / "metrics.jsonl").write_text("".join(
      json.dumps(dict(step=i, step_time=30.0)) + "\n" for i in range(12)))
  (tmp_path / "s1_iw" / "contended.txt").write_text("tests ran beside it\n")
  table, agg = policies.sweep_table(tmp_path, ["vanilla", "iw"])
  assert agg["iw"]["d_avg"] == pytest.approx([0.05, 0.05])
  assert agg["iw"]["weight"] == [400.0, 400.0] and agg["vanilla"]["train_time"] == [120.0, 120.0]
  assert agg["iw"]["step_time"] == [10.0] and agg["iw"]["train_time"] == [120.0]
  row = next(line for line in table.splitlines() if line.startswith("| iw |"))
  assert "| 0.100 ± 0.000 | 100.5 ± 0.7 |" in row and row.endswith("| 10.00† | 2.0 min† |")
  assert "left out: s1_iw (tests ran beside it)." in table
  # Δ's interval: 2 seeds × (iw, vanilla) independent normals with sd = half / 1.96, so the mean
  # difference has sd sqrt(2 (0.04² + 0.03²)) / 2 / 1.96 = 0.025 / 1.96 * sqrt(2): ±0.0354.
  assert agg["iw"]["d_avg_ci"] == pytest.approx([0.05 - 0.05 / np.sqrt(2), 0.05 + 0.05 / np.sqrt(2)])
  assert "| 0.050 ± 0.000 [+0.015, +0.085] |" in row
  assert "Training time of the 4 finished runs: 0.2 h" in table  # 12 steps × (3 × 10 s + 30 s)
  # Δ pass@4 has no intervals to combine: the cell shows none.
  assert agg["iw"]["d_pass_ci"] is None and "| 0.000 ± 0.000 | 0.100 ± 0.000 |" in row
