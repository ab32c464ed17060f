"""The KAT experiment's analysis: sweep table, detector precision / recall, KL-trace plots.

    python -m kat_jax.studies.experiment --sweep DIR [--out DIR/results.md] [--student ... --teacher ...]

  1. Table: every variant of a `configs/arith_compare.py` sweep, mean +- std over seeds of the
     final avg@k / pass@k (each seed's own 95% bootstrap interval averaged alongside), trained
     tokens per rollout, trap rate and wall-clock per step (median over steps after the first 5).
  2. Detector study on uncut rollouts: the student samples with KAT off, the teacher scores every
     token, and each rollout's ground truth is known -- whether it ends wrong and where its first
     slip is (`arith.first_slip`). The KAT rules are then applied post hoc (`kat.detect_offline`,
     the numpy twin of the in-loop rule) with the threshold the adaptive rule would set from these
     rollouts (the `threshold.quantile` of complete window means), giving precision and recall of
     "terminated" against "ends wrong", and how often the cut lands after the slip.
  3. Plots (matplotlib): per-token KL of trapped and healthy rollouts with tau, slips and cuts; and
     the mean KL aligned on the slip.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import numpy as np

from kat_jax import hf, kat, rollout
from kat_jax.config import ASSETS
from kat_jax.data import arith

# ------------------------------------------------------------------------------ sweep table


def _records(path: Path) -> list[dict]:
  with open(path) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  last = {}
  for r in recs:  # a resumed run re-logs steps: keep the latest record of each
    last[(r["step"], tuple(sorted(r)))] = r
  return list(last.values())


def run_stats(run_dir: Path) -> dict:
  summary = json.loads((run_dir / "summary.json").read_text())
  after = json.loads((run_dir / "eval_after.json").read_text())
  # A sweep may evaluate the shared initial student in one run only (config.eval_before).
  path = run_dir / "eval_before.json"
  before = json.loads(path.read_text()) if path.is_file() else {"macro": {}}
  k = after["k"]
  steps = [r for r in _records(run_dir / "metrics.jsonl") if "step_time" in r and r["step"] > 5]
  return dict(avg=after["macro"][f"avg@{k}"], avg_ci=after["macro"].get(f"avg@{k}_ci"),
              pass_=after["macro"][f"pass@{k}"], pass_ci=after["macro"].get(f"pass@{k}_ci"),
              avg_before=before["macro"].get(f"avg@{k}"),
              pass_before=before["macro"].get(f"pass@{k}"),
              trained=summary["mean_trained_length"], generated=summary["mean_rollout_length"],
              trap=summary["trap_rate"], k=k,
              step_time=statistics.median(r["step_time"] for r in steps) if steps else float("nan"),
              weight=summary.get("mean_trained_weight", summary["mean_trained_length"]),
              loop_train=summary.get("loop_rate"), loop_after=summary.get("loop_after"),
              loop_before=summary.get("loop_before"),
              len_after=_mean_length(after), len_before=_mean_length(before),
              train_time=sum(r["step_time"] for r in _records(run_dir / "metrics.jsonl")
                             if "step_time" in r))


def _mean_length(report: dict):
  """Mean held-out completion length of an evaluation report (None if it has none)."""
  lengths = [b.get("mean_length") for b in report.get("benchmarks", {}).values()]
  lengths = [x for x in lengths if x is not None]
  return float(np.mean(lengths)) if lengths else None


def mean_sd(xs, fmt: str = ".3f") -> str:
  """'mean ± sd' over seeds (sd with ddof 1; the mean alone for one value; '—' for none)."""
  xs = [x for x in xs if x is not None]
  if not xs:
    return "—"
  if len(xs) == 1:
    return f"{np.mean(xs):{fmt}}"
  return f"{np.mean(xs):{fmt}} ± {np.std(xs, ddof=1):{fmt}}"


def ci_half(cis) -> str:
  """' (±h)': the mean half-width of the runs' own intervals ('' if none has one)."""
  cis = [c for c in cis if c]
  return f" (±{np.mean([(c[1] - c[0]) / 2 for c in cis]):.3f})" if cis else ""


def finished_runs(sweep_dir: Path):
  """(variant, seed, run dir) of a sweep's finished runs (DIR/s<seed>_<variant>/summary.json)."""
  for run_dir in sorted(Path(sweep_dir).iterdir()):
    m = re.fullmatch(r"s(\d+)_(\w+)", run_dir.name)
    if m and (run_dir / "summary.json").is_file():
      yield m[2], int(m[1]), run_dir


def delta_interval(runs: list[dict], bases: list[dict], field: str) -> list[float] | None:
  """An approximate 95% interval of the mean over seeds of the paired differences run − vanilla
  (None without intervals). The evaluation reports keep each run's own bootstrap interval over
  problems, not per-problem scores, so the two runs of a seed are taken as independent normals
  with sd = half-width / 1.96 (conservative: the draws share prompts): the mean of n differences
  has half-width sqrt(sum of all 2n squared half-widths) / n."""
  key = field.rstrip("_") + "_ci"  # run_stats' names: avg / avg_ci, pass_ / pass_ci
  halves = [(r[key][1] - r[key][0]) / 2 for r in runs + bases if r.get(key)]
  if not runs or len(halves) != 2 * len(runs):
    return None
  mean = float(np.mean([r[field] - b[field] for r, b in zip(runs, bases)]))
  half = float(np.sqrt(np.sum(np.square(halves)))) / len(runs)
  return [mean - half, mean + half]


def fmt_interval(interval) -> str:
  return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""


def paired_delta(runs: dict[int, dict], base: dict[int, dict], field: str):
  """The paired differences run − vanilla of `field` over the seeds both have, and the
  approximate 95% interval of their mean (delta_interval)."""
  seeds = [s for s in sorted(runs) if s in base]
  deltas = [runs[s][field] - base[s][field] for s in seeds]
  return deltas, delta_interval([runs[s] for s in seeds], [base[s] for s in seeds], field)


def delta_cell(deltas, interval) -> str:
  """'mean ± sd [lo, hi]' of paired differences over seeds (the interval only where known)."""
  return f"{mean_sd(deltas)} {fmt_interval(interval)}".rstrip()


def sweep_table(sweep_dir: Path, order: list[str] | None = None) -> tuple[str, dict]:
  groups: dict[str, dict[int, dict]] = {}
  for name, seed, run_dir in finished_runs(sweep_dir):
    groups.setdefault(name, {})[seed] = run_stats(run_dir)
  names = [n for n in (order or []) if n in groups] + sorted(set(groups) - set(order or []))
  k = next(iter(next(iter(groups.values())).values()))["k"] if groups else 4
  base = groups.get("vanilla", {})

  lines = [f"| variant | seeds | avg@{k} after (CI ±) | Δ avg@{k} vs vanilla [≈95% CI] "
           f"| pass@{k} after (CI ±) | Δ pass@{k} vs vanilla [≈95% CI] "
           f"| trained tokens / rollout | generated tokens / rollout "
           f"| trap rate | s / step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  agg = {}
  for name in names:
    runs = groups[name]
    seeds = sorted(runs)
    avg = [runs[s]["avg"] for s in seeds]
    pas = [runs[s]["pass_"] for s in seeds]
    (d_avg, d_avg_ci), (d_pass, d_pass_ci) = (paired_delta(runs, base, f) for f in ("avg", "pass_"))
    agg[name] = dict(avg=float(np.mean(avg)), pass_=float(np.mean(pas)),
                     d_avg=float(np.mean(d_avg)) if d_avg else None,
                     d_pass=float(np.mean(d_pass)) if d_pass else None,
                     d_avg_ci=d_avg_ci, d_pass_ci=d_pass_ci,
                     trained=float(np.mean([runs[s]["trained"] for s in seeds])),
                     step_time=float(np.mean([runs[s]["step_time"] for s in seeds])))
    lines.append(
        f"| {name} | {len(seeds)} | {mean_sd(avg)}{ci_half([runs[s]['avg_ci'] for s in seeds])} | "
        f"{delta_cell(d_avg, d_avg_ci) if name != 'vanilla' else '—'} | "
        f"{mean_sd(pas)}{ci_half([runs[s]['pass_ci'] for s in seeds])} | "
        f"{delta_cell(d_pass, d_pass_ci) if name != 'vanilla' else '—'} | "
        f"{np.mean([runs[s]['trained'] for s in seeds]):.1f} | "
        f"{np.mean([runs[s]['generated'] for s in seeds]):.1f} | "
        f"{np.mean([runs[s]['trap'] for s in seeds]):.3f} | "
        f"{np.mean([runs[s]['step_time'] for s in seeds]):.3f} |")
  before = [r["avg_before"] for g in groups.values() for r in g.values()
            if r["avg_before"] is not None]
  pbefore = [r["pass_before"] for g in groups.values() for r in g.values()
             if r["pass_before"] is not None]
  if before:
    lines.append(f"\nBefore OPD (same student, every run's paired draws): avg@{k} "
                 f"{np.mean(before):.3f}, pass@{k} {np.mean(pbefore):.3f}.")
  return "\n".join(lines), agg


# ---------------------------------------------------------------------------- detector study


def slip_token(prompt: str, completion: str) -> int | None:
  """Token index (in the completion) of the first wrong result character, or None."""
  k = arith.first_slip(prompt, completion)
  if k is None:
    return None
  lines = completion.split(";")
  start = sum(len(x) + 1 for x in lines[:k])
  m = re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", lines[k])
  a, op, b, c = int(m[1]), m[2], int(m[3]), m[4]
  true = str(a + b if op == "+" else a - b)
  first = next((i for i, (x, y) in enumerate(zip(c, true)) if x != y), min(len(c), len(true)))
  # Character-level tokenizer: one token per character of the scratchpad.
  return start + len(m[1]) + 1 + len(m[3]) + 1 + first


def score_uncut(student, teacher, rows: list[list[int]], cfg, pad_id: int, seed: int,
                batch: int) -> dict[str, np.ndarray]:
  """Rolls out prompt token lists `batch` at a time with `cfg` (KAT off) and concatenates the
  per-token signals: kl, logratio, overlap (zeros unless kat.mode='topk'), tokens, length, eos,
  window_mean, window_complete."""
  import jax

  out = {f: [] for f in ("kl", "logratio", "overlap", "tokens", "length", "eos", "window_mean",
                         "window_complete")}
  for c, lo in enumerate(range(0, len(rows), batch)):
    prompt, start = rollout.pad_prompts(rows[lo:lo + batch], pad_id)
    res = jax.device_get(rollout.rollout(student, teacher, prompt, start,
                                         jax.random.key(1000 * seed + c), cfg))
    for field, x in (("kl", res.kl_BxT), ("logratio", res.logratio_BxT),
                     ("overlap", res.overlap_BxT),
                     ("tokens", res.tokens_BxT), ("length", res.length_B), ("eos", res.eos_B),
                     ("window_mean", res.window_mean_BxN),
                     ("window_complete", res.window_complete_BxN)):
      out[field].append(x)
  return {f: np.concatenate(v) for f, v in out.items()}


def uncut_rollouts(student_dir, teacher_dir, n_problems: int, samples: int, seed: int,
                   max_new_tokens: int = 48, window: int = 4, batch: int = 256) -> dict:
  """Student samples with KAT off on held-out problems; teacher-scored per-token signals."""
  student, s_cfg = hf.load(student_dir)
  teacher, _ = hf.load(teacher_dir)
  vocab = len(arith.VOCAB)
  cfg = rollout.RolloutConfig(max_new_tokens=max_new_tokens, eos_ids=(arith.EOS_ID,),
                              pad_id=arith.PAD_ID, vocab_size=vocab,
                              kat=kat.KATConfig(mode="none", window=window))
  problems = [arith.make_problem(seed + 1, i, 3, "eval") for i in range(n_problems)]
  rows = [(p, a) for p, _, a in problems for _ in range(samples)]
  data = score_uncut(student, teacher, [arith.encode(p) for p, _ in rows], cfg, arith.PAD_ID,
                     seed, batch)
  texts = [arith.decode(t[:n]) for t, n in zip(data["tokens"], data["length"])]
  data["texts"] = texts
  data["prompts"] = [p for p, _ in rows]
  data["correct"] = np.array([arith.score(t, a) for t, (_, a) in zip(texts, rows)])
  data["slip"] = np.array([-1 if (s := slip_token(p, t)) is None else s
                           for t, (p, _) in zip(texts, rows)])
  return data


def post_hoc(data: dict, signal: str, cfg, quantile: float, spike_tau: float,
             target_B: np.ndarray, onset_B: np.ndarray) -> dict:
  """KAT's rule `cfg` (a kat.KATConfig) applied to uncut rollouts' `signal`, with the threshold
  the adaptive rule would set from their own complete windows, scored against a ground truth:
  rows `target_B` (doomed: ends wrong, loops) whose trouble starts at token `onset_B` (-1: unknown).
  """
  sig = data[signal]
  w = cfg.window
  n_win = sig.shape[1] // w
  means = sig[:, :n_win * w].reshape(len(sig), n_win, w).mean(-1)
  complete = data["window_complete"][:, :n_win]
  tau = float(np.quantile(means[complete], quantile)) if complete.any() else 0.0
  det = kat.detect_offline(sig, data["length"], data["eos"], tau, spike_tau, cfg)
  flagged = det["terminated"]
  tp = flagged & target_B
  after = tp & (onset_B >= 0) & (det["trained_len"] >= onset_B)
  return dict(tau=tau, flagged=float(flagged.mean()), target=float(target_B.mean()),
              precision=float(tp.sum() / max(flagged.sum(), 1)),
              recall=float(tp.sum() / max(target_B.sum(), 1)),
              cut_after_onset=float(after.sum() / max(tp.sum(), 1)),
              tokens_cut=float(1 - det["trained_len"].sum() / max(data["length"].sum(), 1)),
              det=det)


def detector_scores(data: dict, signal: str, spike_gate: bool, quantile: float = 0.2,
                    spike_tau: float = 2.0, window: int = 4, patience: int = 2,
                    min_len: int = 8) -> dict:
  """The rule against "ends wrong", and whether the cut lands after the first slip."""
  cfg = kat.KATConfig(mode="kat", signal=signal, window=window, patience=patience,
                      min_len=min_len, spike_gate=spike_gate)
  s = post_hoc(data, signal, cfg, quantile, spike_tau, ~data["correct"], data["slip"])
  s["wrong"], s["cut_after_slip"] = s.pop("target"), s.pop("cut_after_onset")
  return s


def detector_table(studies: dict[str, dict]) -> str:
  lines = ["| student | rule | signal | tau | rollouts flagged | ends wrong | precision | "
           "recall | TP cut after the slip | tokens cut |", "|---|---|---|---|---|---|---|---|---|---|"]
  for label, rows in studies.items():
    for (rule, signal), s in rows.items():
      lines.append(f"| {label} | {rule} | {signal} | {s['tau']:.2e} | {s['flagged']:.3f} | "
                   f"{s['wrong']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | "
                   f"{s['cut_after_slip']:.3f} | {s['tokens_cut']:.3f} |")
  return "\n".join(lines)


def kl_stats(data: dict) -> str:
  """Median per-token KL before the slip, at it, and after it (wrong rollouts) vs correct ones."""
  kl, n = data["kl"], data["length"]
  pre, at, post, ok = [], [], [], []
  for r in range(len(kl)):
    s = data["slip"][r]
    if data["correct"][r]:
      ok.append(kl[r, :n[r]])
    elif s >= 0:
      pre.append(kl[r, :s])
      at.append(kl[r, s:s + 1])
      post.append(kl[r, s + 1:n[r]])
  med = lambda xs: float(np.median(np.concatenate(xs))) if xs else float("nan")  # noqa: E731
  mean = lambda xs: float(np.mean(np.concatenate(xs))) if xs else float("nan")  # noqa: E731
  return (f"| tokens | median KL | mean KL |\n|---|---|---|\n"
          f"| correct rollouts | {med(ok):.2e} | {mean(ok):.2e} |\n"
          f"| wrong rollouts, before the slip | {med(pre):.2e} | {mean(pre):.2e} |\n"
          f"| wrong rollouts, the slip token | {med(at):.2e} | {mean(at):.2e} |\n"
          f"| wrong rollouts, after the slip | {med(post):.2e} | {mean(post):.2e} |")


def plot_traces(data: dict, studies: dict[str, dict], path: Path, n_each: int = 3,
                seed: int = 0) -> None:
  """Top: KL traces of wrong (with a slip) and correct rollouts, tau and each rule's cut points.
  Bottom: mean / median KL aligned on the first slip of wrong rollouts."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kl, n = data["kl"], data["length"]
  rng = np.random.default_rng(seed)
  flagged = np.any([s["det"]["terminated"] for s in studies.values()], axis=0)
  wrong = np.flatnonzero(~data["correct"] & (data["slip"] >= 0))
  # Prefer wrong rollouts that some rule cut (the trap as KAT sees it), then any wrong ones.
  wrong = np.concatenate([rng.permutation(wrong[flagged[wrong]]),
                          rng.permutation(wrong[~flagged[wrong]])])[:n_each]
  right = rng.permutation(np.flatnonzero(data["correct"]))[:n_each]
  fig, axes = plt.subplots(2, 1, figsize=(10, 7.5))
  ax = axes[0]
  colors = ["tab:red", "tab:orange", "tab:brown", "tab:blue", "tab:cyan", "tab:green"]
  markers = dict(zip(studies, ["x", "+", "^", "v"]))
  for i, r in enumerate(list(wrong) + list(right)):
    c = colors[i % len(colors)]
    label = ("wrong (dotted: first slip)" if i == 0 else
             "correct" if i == len(wrong) else None)
    ax.semilogy(np.arange(n[r]), np.maximum(kl[r, :n[r]], 1e-8), color=c, lw=1.3, label=label)
    if data["slip"][r] >= 0:
      ax.axvline(data["slip"][r], color=c, ls=":", lw=1.2)
    for rule, st in studies.items():
      if st["det"]["terminated"][r]:
        x = int(st["det"]["trained_len"][r])
        ax.plot(x, max(kl[r, min(x, n[r] - 1)], 1e-8), markers[rule], color="k", ms=10)
  for rule, m in markers.items():
    ax.plot([], [], m, color="k", label=f"cut by {rule} KAT")
  tau = next(iter(studies.values()))["tau"]
  ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.1e}")
  ax.set_xlabel("generated token")
  ax.set_ylabel("KL(student || teacher) per token")
  ax.set_title("Per-token KL of uncut rollouts")
  ax.legend(fontsize=8, ncol=2)
  # Mean KL aligned on the slip, wrong rollouts only.
  ax = axes[1]
  offsets = np.arange(-12, 25)
  rows = [r for r in range(len(kl)) if data["slip"][r] >= 0]
  vals = [[kl[r, data["slip"][r] + o] for r in rows if 0 <= data["slip"][r] + o < n[r]]
          for o in offsets]
  ax.semilogy(offsets, [np.mean(v) if v else np.nan for v in vals], "r.-", label="mean")
  ax.semilogy(offsets, [np.median(v) if v else np.nan for v in vals], "m.-", label="median")
  ok = np.concatenate([kl[r, :n[r]] for r in range(len(kl)) if data["correct"][r]])
  ax.axhline(np.mean(ok), color="b", ls="--", lw=1, label="mean over correct rollouts")
  ax.axhline(np.median(ok), color="c", ls="--", lw=1, label="median over correct rollouts")
  ax.axvline(0, color="k", ls=":", lw=1)
  ax.set_xlabel("tokens from the first slip (wrong rollouts)")
  ax.set_ylabel("KL per token")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="KAT experiment analysis (see module docstring)")
  parser.add_argument("--sweep", required=True, help="sweep directory (configs/arith_compare.py)")
  parser.add_argument("--out", default="", help="markdown file (default: SWEEP/results.md)")
  parser.add_argument("--problems", type=int, default=256)
  parser.add_argument("--samples", type=int, default=4)
  args = parser.parse_args(argv)
  sweep_dir = Path(args.sweep)
  out = Path(args.out) if args.out else sweep_dir / "results.md"
  order = ["vanilla", "fixed", "random", "fixedtau", "plain", "spike", "logratio", "floor", "topk",
           "popd", "iw"]
  table, _ = sweep_table(sweep_dir, order)
  students = {"initial (shipped)": ASSETS / "arith_student"}
  if (sweep_dir / "s0_vanilla" / "export").is_dir():
    students["after vanilla OPD (s0)"] = sweep_dir / "s0_vanilla" / "export"
  studies, stats, plot_data = {}, {}, None
  for label, student_dir in students.items():
    data = uncut_rollouts(student_dir, ASSETS / "arith_teacher", args.problems, args.samples, 0)
    studies[label] = {(rule, signal): detector_scores(data, signal, gate)
                      for rule, gate in (("plain", False), ("spike-gated", True))
                      for signal in ("kl", "logratio")}
    stats[label] = kl_stats(data)
    if plot_data is None:
      plot_data = (data, {rule: studies[label][(rule, "kl")] for rule in ("plain", "spike-gated")})
  out.parent.mkdir(parents=True, exist_ok=True)
  figure = out.with_name("kl_traces.png")
  plot_traces(*plot_data, figure)
  text = [f"## Sweep ({sweep_dir})", "", table, "",
          f"## Detector on uncut rollouts ({args.problems} held-out problems x {args.samples})",
          "", detector_table(studies), ""]
  for label, s in stats.items():
    text += [f"Per-token KL, student {label}:", "", s, ""]
  text += [f"![KL traces]({figure.name})", ""]
  out.write_text("\n".join(text))
  print("\n".join(text))
  print(f"wrote {out} and {figure}")


if __name__ == "__main__":
  main()
