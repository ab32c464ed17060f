"""The uncut study of truncation policies: where each one would cut long rollouts, against loops.

    python -m kat_jax.studies.policies --config configs/smollm2_long.py --out DIR \
        [--student LABEL=DIR ...] [--prompts 32] [--samples 4]

The student samples held-out prompts with nothing cut; the teacher scores every token, and the
fused loop records the top-k overlap too (`kat.mode='topk'` with weights only, which never stops a
row). Loops come from the n-gram detector (kat_jax/loops.py). Every policy of kat_jax/kat.py is
then applied post hoc to the same rollouts (`kat.detect_offline`, the tested twin of the in-loop
rule; KAT with the threshold its adaptive rule would set from these rollouts' windows), and scored:

  * per rollout: flagged (cut) vs looped -- precision, recall, cuts that land after the loop began;
  * per token: tokens trained (and the loss weights' sum), the share of in-loop tokens the loss
    drops (what a trap detector is for) and of loop-free tokens it drops (its cost), and the
    generation each policy saves (tokens past its stop point that were never needed);
  * KL(student || teacher) by position: loop-free rollouts vs looping ones before / inside loops;
    the cumulative loop rate by length.

Budget matching: `fixed` (ESR; TOPD's fixed horizon is the same cut) and `topk` also run at the
smallest knob value that trains as many tokens as KAT does on these rollouts (`matched_knobs`),
and `random` draws KAT's cut lengths; the training sweep (configs/smollm2_long_compare.py) takes
ESR's and random's matched knobs from its own runs. Writes DIR/uncut.md, DIR/uncut.json,
DIR/policy_cuts.png and the rollouts' signals (DIR/rollouts_<i>.npz: `--reuse` redoes the analysis
from them without sampling; a plain rerun of an interrupted study reuses those sampled for the
same student, config, prompts and samples, and samples the rest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from kat_jax import grading, kat
from kat_jax.config import kat_config
from kat_jax.configfile import load_module
from kat_jax.studies import loops
from kat_jax.studies.experiment import (ci_half, delta_cell, finished_runs, mean_sd,
                                        paired_delta, run_stats)


def uncut_rollouts(config, student_dir: str, n_prompts: int, samples: int, seed: int = 0,
                   batch: int = 16) -> dict:
  """The student's uncut samples on `config`'s held-out prompts, every per-token signal recorded
  (the loop study's, plus the top-k overlap and whether each answer is right)."""
  data = loops.uncut_rollouts(config, student_dir, n_prompts, samples, seed, batch, overlap=True)
  data["correct"] = np.array(grading.grade_many(data["texts"], data["golds"], workers=0,
                                                extract=data["extract"]), bool)
  return data


def policies(config) -> dict[str, kat.KATConfig]:
  """The policies of the study at their published settings (knobs: kat.py); the config's KAT
  window, patience and min_len throughout."""
  base = kat_config(config)
  t = config.max_new_tokens
  return {
      "vanilla": dataclasses.replace(base, mode="none"),
      "KAT plain": dataclasses.replace(base, mode="kat", spike_gate=False, cut="onset"),
      "KAT spike-gated": dataclasses.replace(base, mode="kat", spike_gate=True, cut="onset"),
      "KAT onset floor": dataclasses.replace(base, mode="kat", spike_gate=False,
                                             cut="onset_floor"),
      "ESR (N=100)": dataclasses.replace(base, mode="fixed", fixed_len=100),
      "TOPD (H=T/4)": dataclasses.replace(base, mode="horizon", horizon_start=t // 4,
                                          horizon_step=0),
      "Prune-OPD (k16, 0.7, drop 0.01)": dataclasses.replace(
          base, mode="topk", topk_k=16, topk_threshold=0.7, topk_drop=0.01, topk_base=0.0),
      "IW-OPD (gamma 0.5)": dataclasses.replace(base, mode="iw", iw_gamma=0.5),
  }


def adaptive_tau(data: dict, cfg: kat.KATConfig, quantile: float) -> float:
  """The threshold KAT's adaptive rule sets from these rollouts' complete windows."""
  sig = data[cfg.signal]
  w = cfg.window
  n = sig.shape[1] // w
  means = sig[:, :n * w].reshape(len(sig), n, w).mean(-1)
  complete = data["window_complete"][:, :n]
  return float(np.quantile(means[complete], quantile)) if complete.any() else 0.0


def apply_policy(data: dict, cfg: kat.KATConfig, tau: float, spike_tau: float) -> dict:
  """Where `cfg` cuts each uncut rollout: terminated, trained_len, stop (generated tokens had it
  run in the loop: detection point or the row's length) and the loss weights' sum per row."""
  length = data["length"]
  if cfg.mode in ("none", "iw"):
    det = dict(terminated=np.zeros(len(length), bool), trained_len=length.copy(),
               detect=np.full(len(length), -1))
  else:
    signal = data["overlap"] if cfg.mode == "topk" else data[cfg.signal]
    det = kat.detect_offline(signal, length, data["eos"], tau, spike_tau, cfg)
  t = data["kl"].shape[1]
  mask = np.arange(t)[None, :] < det["trained_len"][:, None]
  weights = np.asarray(kat.loss_weights(mask, data["logratio"], data["overlap"], cfg))
  stop = np.where(det["terminated"], np.minimum(det["detect"], length), length)
  return dict(terminated=det["terminated"], trained_len=det["trained_len"], stop=stop,
              weight=weights.sum(1), weights=weights)


def random_cut(data: dict, source: dict, seed: int = 0) -> dict:
  """`random`: each rollout cut at a length drawn from `source`'s per-rollout cuts (uncut rows
  draw 'no cut'), independent of its content -- KAT's cut rate and lengths, at random places."""
  length = data["length"]
  pool = np.where(source["terminated"], source["trained_len"], np.iinfo(np.int32).max)
  cut = np.random.default_rng(seed).choice(pool, size=len(length))
  trained = np.minimum(length, cut)
  t = data["kl"].shape[1]
  mask = np.arange(t)[None, :] < trained[:, None]
  return dict(terminated=cut < length, trained_len=trained, stop=length.copy(),
              weight=mask.sum(1).astype(float), weights=mask.astype(float))


def score(data: dict, cut: dict) -> dict:
  """A policy's cuts against the loop ground truth, per rollout and per token."""
  length, onset = data["length"], data["loop"]
  looped = onset >= 0
  flagged = cut["terminated"]
  tp = flagged & looped
  t = data["kl"].shape[1]
  pos = np.arange(t)[None, :]
  gen = pos < length[:, None]
  dropped = gen & (pos >= cut["trained_len"][:, None])
  in_loop = gen & looped[:, None] & (pos >= np.where(looped, onset, t)[:, None])
  healthy = gen & ~in_loop
  n = len(length)
  return dict(
      flagged=float(flagged.mean()), precision=float(tp.sum() / max(flagged.sum(), 1)),
      recall=float(tp.sum() / max(looped.sum(), 1)),
      cut_after_onset=float((tp & (cut["trained_len"] >= onset)).sum() / max(tp.sum(), 1)),
      trained=float(cut["trained_len"].sum() / n), weight=float(cut["weight"].sum() / n),
      generated=float(cut["stop"].sum() / n),
      loop_tokens_dropped=float((dropped & in_loop).sum() / max(in_loop.sum(), 1)),
      healthy_tokens_dropped=float((dropped & healthy).sum() / max(healthy.sum(), 1)))


def matched_knobs(data: dict, cfgs: dict[str, kat.KATConfig], target: float) -> dict[str, float]:
  """Knob values at which ESR / TOPD / Prune-OPD train `target` tokens per rollout on `data`."""
  length = data["length"]
  # ESR and TOPD cut every row at one length N: the smallest N whose mean min(len, N) >= target.
  n = next((n for n in range(1, int(length.max()) + 1)
            if np.minimum(length, n).mean() >= target), int(length.max()))
  # Prune-OPD: the loss stops at the ceil(1 / drop)-th drift event; pick that event count.
  drift = data["overlap"] < cfgs["topk"].topk_threshold
  gen = np.arange(drift.shape[1])[None, :] < length[:, None]
  events = np.cumsum(drift & gen, axis=1)

  def trained(m):  # tokens before the m-th event (the row's length if it has fewer)
    hit = events >= m
    return np.where(hit.any(1), hit.argmax(1), length).mean()
  m = next((m for m in range(1, int(events.max()) + 2) if trained(m) >= target),
           int(events.max()) + 1)
  return dict(fixed_len=n, horizon_start=n, topk_drop=1.0 / m, topk_events=m)


def kl_by_position(data: dict, bucket: int = 64) -> list[dict]:
  """Median KL per position bucket: loop-free rollouts, looping ones before and inside loops; and
  the share of rollouts whose loop has begun by the bucket's end."""
  kl, length, onset = data["kl"], data["length"], data["loop"]
  t = kl.shape[1]
  pos = np.arange(t)[None, :]
  gen = pos < length[:, None]
  looped = onset >= 0
  inside = looped[:, None] & (pos >= onset[:, None])
  out = []
  for lo in range(0, t, bucket):
    sl = np.zeros_like(gen)
    sl[:, lo:lo + bucket] = True
    med = lambda m: float(np.median(kl[m])) if m.any() else float("nan")  # noqa: E731
    out.append(dict(start=lo, end=lo + bucket,
                    loop_free=med(sl & gen & ~looped[:, None]),
                    before_loop=med(sl & gen & looped[:, None] & ~inside),
                    in_loop=med(sl & gen & inside),
                    alive=float((length > lo).mean()),
                    looped_by=float((looped & (onset < lo + bucket)).mean())))
  return out


def study(data: dict, config) -> dict:
  """Every policy's cuts and scores on one student's uncut rollouts (and the matched variants)."""
  cfgs = policies(config)
  spike_tau = float(config.kat.spike_tau)
  q = float(config.threshold.quantile)
  cuts = {name: apply_policy(data, cfg, adaptive_tau(data, cfg, q) if cfg.mode == "kat" else
                             (cfg.horizon_start if cfg.mode == "horizon" else 0.0), spike_tau)
          for name, cfg in cfgs.items()}
  target = float(cuts["KAT plain"]["trained_len"].mean())
  knobs = matched_knobs(data, {"topk": cfgs["Prune-OPD (k16, 0.7, drop 0.01)"]}, target)
  n = knobs["fixed_len"]
  cuts["ESR at KAT's budget"] = apply_policy(
      data, dataclasses.replace(cfgs["ESR (N=100)"], fixed_len=n), 0.0, spike_tau)
  cuts["Prune-OPD at KAT's budget"] = apply_policy(
      data, dataclasses.replace(cfgs["Prune-OPD (k16, 0.7, drop 0.01)"],
                                topk_drop=knobs["topk_drop"]), 0.0, spike_tau)
  cuts["random at KAT's cuts"] = random_cut(data, cuts["KAT plain"])
  return dict(cuts=cuts, scores={k: score(data, c) for k, c in cuts.items()}, knobs=knobs,
              kat_target=target, tau=adaptive_tau(data, cfgs["KAT plain"], q))


def report(data: dict, result: dict, label: str) -> str:
  looped = data["loop"] >= 0
  lines = [f"Student {label}: {len(looped)} rollouts, loop rate {looped.mean():.3f} (median "
           f"onset token {int(np.median(data['loop'][looped])) if looped.any() else -1}), EOS "
           f"{data['eos'].mean():.3f}, mean length {data['length'].mean():.1f}, correct "
           f"{data['correct'].mean():.3f}; KAT's adaptive tau {result['tau']:.3g}; KAT plain "
           f"trains {result['kat_target']:.1f} tokens per rollout, matched knobs: ESR / TOPD "
           f"N = {result['knobs']['fixed_len']}, Prune-OPD drop = 1/"
           f"{result['knobs']['topk_events']}.", "",
           "| policy | flagged | precision vs loops | recall | TP cut after onset | trained "
           "tokens / rollout | loss weight / rollout | generated / rollout | loop tokens "
           "dropped | loop-free tokens dropped |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in result["scores"].items():
    lines.append(f"| {name} | {s['flagged']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | "
                 f"{s['cut_after_onset']:.3f} | {s['trained']:.1f} | {s['weight']:.1f} | "
                 f"{s['generated']:.1f} | {s['loop_tokens_dropped']:.3f} | "
                 f"{s['healthy_tokens_dropped']:.3f} |")
  lines += ["", "| tokens | alive | looped by the end | median KL loop-free | before the loop | "
            "inside the loop |", "|---|---|---|---|---|---|"]
  for b in kl_by_position(data):
    lines.append(f"| {b['start']}-{b['end']} | {b['alive']:.2f} | {b['looped_by']:.3f} | "
                 f"{b['loop_free']:.3g} | {b['before_loop']:.3g} | {b['in_loop']:.3g} |")
  return "\n".join(lines)


def plot(data: dict, result: dict, path: Path, label: str, window: int = 16) -> None:
  """KL traces (moving mean over a KAT window) of long rollouts -- looping ones KAT flags, looping
  ones it misses, loop-free ones -- with KAT's tau, the loop onset, and where each policy's loss
  stops."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  long = data["length"] >= data["length"].max() // 2
  looped = data["loop"] >= 0
  flagged = result["cuts"]["KAT plain"]["terminated"]
  rows = (list(np.flatnonzero(long & looped & flagged)[:2])
          + list(np.flatnonzero(long & looped & ~flagged)[:2])
          + list(np.flatnonzero(long & ~looped)[:2]))
  names = [n for n in result["cuts"] if n not in ("vanilla", "IW-OPD (gamma 0.5)",
                                                  "KAT spike-gated", "KAT onset floor")]
  marks = "ov^sDP*Xh<>"
  fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.7 * len(rows) + 1.2), sharex=True,
                           squeeze=False)
  for ax, r in zip(axes[:, 0], rows):
    n = int(data["length"][r])
    smooth = np.convolve(data["kl"][r, :n], np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window - 1, n), smooth, color="0.3", lw=1)
    ax.axhline(result["tau"], color="tab:blue", ls="--", lw=0.8)
    top = max(float(smooth.max()) if smooth.size else 1.0, 1e-3)
    if looped[r]:
      ax.axvline(data["loop"][r], color="red", ls=":", lw=1.2)
    for i, name in enumerate(names):
      c = result["cuts"][name]
      if c["terminated"][r]:
        ax.plot(c["trained_len"][r], top * (1.05 + 0.1 * i), marks[i % len(marks)],
                color=plt.cm.tab10(i % 10), ms=6, label=name, clip_on=False)
    ax.set_ylim(0, top * (1.15 + 0.1 * len(names)))
    kind = ("loops, KAT cuts" if flagged[r] else "loops, KAT misses") if looped[r] else "no loop"
    ax.set_ylabel(f"row {r}\n{kind}", fontsize=7)
  handles = {}
  for ax in axes[:, 0]:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  fig.suptitle(f"{label}: per-token KL(student || teacher) of uncut rollouts (moving mean over "
               f"{window}); dashed: KAT's tau; dotted: loop onset; marks: where each policy's "
               "loss stops", fontsize=8, y=0.995)
  fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=4, fontsize=7,
             frameon=False, bbox_to_anchor=(0.5, 0.97))
  axes[-1, 0].set_xlabel("generated token")
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))
  fig.savefig(path, dpi=110)
  plt.close(fig)


SAVED = ("kl", "logratio", "overlap", "tokens", "length", "eos", "loop", "window_complete",
         "correct")


def save_rollouts(path: Path, data: dict, key: dict) -> None:
  np.savez_compressed(path, **{f: data[f] for f in SAVED},
                      **{f"key_{f}": np.asarray(v) for f, v in key.items()})


def cached_rollouts(path: Path, key: dict) -> dict | None:
  """The rollouts an earlier, interrupted study saved at `path` if they were sampled for the same
  student, config, prompts and samples (`key`, stored beside them), else None: a rerun resumes
  with the next student instead of resampling (tens of minutes per student at 512 tokens here)."""
  if not path.is_file():
    return None
  with np.load(path) as f:
    if any(f"key_{k}" not in f.files or f[f"key_{k}"].item() != v for k, v in key.items()):
      return None
    return {k: f[k] for k in SAVED}


def _jsonable(result: dict) -> dict:
  return dict(scores=result["scores"], knobs=result["knobs"], kat_target=result["kat_target"],
              tau=result["tau"])


# ------------------------------------------------------------------------ the training sweep


# The training sweep's points in run order (configs/smollm2_long_compare.py runs them so): the
# matched points read the earlier runs they match.
SWEEP_ORDER = ["vanilla", "kat", "spike", "floor", "esr", "random", "topk", "popd", "iw"]


def sweep_table(sweep_dir: Path, order: list[str]) -> tuple[str, dict]:
  """The matched-budget training sweep (configs/smollm2_long_compare.py): per policy, mean ± sd
  over seeds of held-out accuracy (and each run's own interval), the paired difference to
  vanilla, loop rate and length of held-out samples after training, tokens generated / trained /
  loss weight per rollout, and time -- without the runs whose directory holds a contended.txt
  (why their timing is not comparable: the machine was shared)."""
  groups: dict[str, dict[int, dict]] = {}
  contended = {}  # run -> why its timing is not comparable (the run's contended.txt)
  for name, seed, run_dir in finished_runs(sweep_dir):
    groups.setdefault(name, {})[seed] = stats = run_stats(run_dir)
    if (run_dir / "contended.txt").is_file():
      stats["contended"] = contended[run_dir.name] = (run_dir / "contended.txt").read_text().strip()
  if not groups:
    return "(no finished runs)", {}
  names = [n for n in order if n in groups] + sorted(set(groups) - set(order))
  base = groups.get("vanilla", {})
  k = next(iter(next(iter(groups.values())).values()))["k"]

  ms, ci = mean_sd, ci_half
  lines = [f"| policy | seeds | avg@{k} (run CI ±) | Δ avg@{k} vs vanilla [≈95% CI] | "
           f"pass@{k} (run CI ±) | Δ pass@{k} [≈95% CI] | held-out loop rate | held-out mean "
           "length | generated / rollout | trained / rollout | loss weight / rollout | trap (cut) "
           "rate | s / step | run wall (train) |", "|" + "---|" * 14]
  agg = {}
  for name in names:
    runs = groups[name]
    seeds = sorted(runs)
    col = lambda f: [runs[s][f] for s in seeds]  # noqa: E731
    agg[name] = {f: col(f) for f in ("avg", "pass_", "loop_after", "len_after", "generated",
                                     "trained", "weight", "trap")}
    for f, key in (("avg", "d_avg"), ("pass_", "d_pass")):
      agg[name][key], agg[name][key + "_ci"] = paired_delta(runs, base, f)
    dcell = lambda key: (  # noqa: E731
        delta_cell(agg[name][key], agg[name][key + "_ci"]) if name != "vanilla" else "—")
    # Times only from runs that had the machine to themselves.
    alone = [s for s in seeds if not runs[s].get("contended")]
    mark = "†" if len(alone) < len(seeds) else ""
    agg[name].update(step_time=[runs[s]["step_time"] for s in alone],
                     train_time=[runs[s]["train_time"] for s in alone])
    lines.append(
        f"| {name} | {len(seeds)} | {ms(col('avg'))}{ci(col('avg_ci'))} | "
        f"{dcell('d_avg')} | {ms(col('pass_'))}{ci(col('pass_ci'))} | "
        f"{dcell('d_pass')} | {ms(col('loop_after'))} | "
        f"{ms(col('len_after'), '.1f')} | {ms(col('generated'), '.1f')} | "
        f"{ms(col('trained'), '.1f')} | {ms(col('weight'), '.1f')} | {ms(col('trap'))} | "
        f"{ms(agg[name]['step_time'], '.2f')}{mark} | "
        f"{ms([t / 60 for t in agg[name]['train_time']], '.1f')} min{mark} |")
  befores = [r for g in groups.values() for r in g.values() if r["avg_before"] is not None]
  if befores:
    fmt = lambda f, p=".3f": ms([r[f] for r in befores], p)  # noqa: E731
    lines.append(f"\nBefore OPD (the shared initial student, each seed's draws; "
                 f"{len(befores)} evaluations): avg@{k} {fmt('avg_before')}, pass@{k} "
                 f"{fmt('pass_before')}, held-out loop rate {fmt('loop_before')}, mean length "
                 f"{fmt('len_before', '.1f')}.")
  if contended:
    lines.append("\n† Timed on the runs that had the machine to themselves; left out: " + "; ".join(
        f"{run} ({why})" for run, why in sorted(contended.items())) + ".")
  every_run = [r for g in groups.values() for r in g.values()]
  lines.append(f"\nTraining time of the {len(every_run)} finished runs: "
               f"{sum(r['train_time'] for r in every_run) / 3600:.1f} h (the steps' wall-clock; "
               "loading, compiling and the held-out evaluations come on top).")
  return "\n".join(lines), agg


TRAINING_FIELDS = [("loop_rate", "rollouts with a loop"), ("gen_len", "generated / rollout"),
                   ("trained_len", "trained / rollout")]


def training_curves(sweep_dir: Path, smooth: int = 5) -> dict[str, dict]:
  """Per finished run's policy: its steps, the number of seeds, and per TRAINING_FIELDS the value
  per step, averaged over seeds and then over the last `smooth` steps (a trailing mean)."""
  runs: dict[str, list[dict]] = {}
  for name, _, run_dir in finished_runs(sweep_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    runs.setdefault(name, []).append({r["step"]: r for r in rows if "gen_len" in r})
  curves = {}
  for name, seeds in runs.items():
    steps = sorted(set.intersection(*(set(r) for r in seeds)))
    curves[name] = dict(steps=steps, seeds=len(seeds))
    for field, _ in TRAINING_FIELDS:
      y = np.array([np.mean([r[s][field] for r in seeds]) for s in steps])
      curves[name][field] = [float(y[max(0, j - smooth + 1):j + 1].mean()) for j in range(len(y))]
  return curves


def plot_training(sweep_dir: Path, path: Path, order: list[str], smooth: int = 5) -> None:
  """How each policy's training rollouts degenerate (`training_curves`), one line per policy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = training_curves(sweep_dir, smooth)
  names = [n for n in order if n in curves] + sorted(set(curves) - set(order))
  fig, axes = plt.subplots(1, len(TRAINING_FIELDS), figsize=(15, 4.2))
  for i, name in enumerate(names):
    c = curves[name]
    for ax, (field, title) in zip(axes, TRAINING_FIELDS):
      ax.plot(c["steps"], c[field], color=plt.cm.tab10(i % 10), ls="-" if i < 10 else "--",
              lw=1.3 if name in ("vanilla", "kat") else 0.9,
              label=f"{name} ({c['seeds']} seed{'s' * (c['seeds'] > 1)})")
      ax.set_title(f"{title} (mean of the last {smooth} steps)", fontsize=9)
      ax.set_xlabel("training step")
  axes[0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="uncut truncation-policy study (module docstring)")
  parser.add_argument("--config", default="", help="a config file[:arg] (the uncut study)")
  parser.add_argument("--student", action="append", default=[],
                      help="LABEL=DIR or DIR; repeat for several (default: config.student)")
  parser.add_argument("--prompts", type=int, default=32)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--initial", action="store_true",
                      help="study config.student (the initial student) first, besides --student")
  parser.add_argument("--reuse", action="store_true",
                      help="analyse OUT/rollouts_<i>.npz from an earlier run instead of sampling")
  parser.add_argument("--out", required=True, help="directory for uncut.md / .json / .png")
  parser.add_argument("--sweep", default="", help="instead: the training sweep's table and "
                      "curves (configs/smollm2_long_compare.py's DIR) into OUT/sweep.md, "
                      "OUT/training.png")
  args = parser.parse_args(argv)
  if args.sweep:
    table, agg = sweep_table(Path(args.sweep), SWEEP_ORDER)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sweep.md").write_text(table + "\n")
    (Path(args.out) / "sweep.json").write_text(json.dumps(agg, indent=2) + "\n")
    try:
      plot_training(Path(args.sweep), Path(args.out) / "training.png", SWEEP_ORDER)
    except ImportError:
      print("(no training.png: the plots need matplotlib -- pip install -e '.[plot]')")
    print(table)
    return
  if not args.config:
    parser.error("--config is required for the uncut study (or give --sweep DIR).")
  path, _, arg = args.config.partition(":")
  config = load_module(path).get_config(arg or None)
  students = [s.split("=", 1) if "=" in s else [s, s] for s in args.student]
  if args.initial or not students:
    students.insert(0, ["initial", config.student])
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  texts, summary = [], {}
  for i, (label, student) in enumerate(students):
    saved = out / f"rollouts_{i}.npz"
    key = dict(student=student, config=args.config, prompts=args.prompts, samples=args.samples)
    if args.reuse:
      data = dict(np.load(saved))
    elif (data := cached_rollouts(saved, key)) is not None:
      print(f"{label}: the uncut rollouts of an earlier run ({saved}), not resampled", flush=True)
    else:
      data = uncut_rollouts(config, student, args.prompts, args.samples, batch=args.batch)
      save_rollouts(saved, data, key)
    result = study(data, config)
    texts.append(report(data, result, label))
    summary[label] = dict(_jsonable(result), by_position=kl_by_position(data))
    plot(data, result, out / ("policy_cuts.png" if i == 0 else f"policy_cuts_{i}.png"), label,
         window=config.kat.window)
    print(texts[-1] + "\n", flush=True)
  (out / "uncut.md").write_text("\n\n".join(texts) + "\n")
  (out / "uncut.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
  main()
