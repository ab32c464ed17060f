"""What a training run reports: per-step records (metrics.jsonl, TensorBoard), per-rollout
lengths and cuts (rollouts.jsonl), sample rollouts token by token for the dashboard
(samples.jsonl, kat_jax.report), running totals, and the final summary table. Only process 0
writes; the records are plain floats computed from host copies."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np

from kat_jax import grading, loops


def step_record(res, m: dict, tau: float, max_new_tokens: int, step_time: float
                ) -> tuple[dict, dict, np.ndarray]:
  """(the step's metrics record, its counts for `Totals`, the rows' loop onsets [B]) from the
  host rollout result `res`, the update / threshold metrics `m` and the step's tau."""
  gen = int(res.length_B.sum())
  # Probe rows were generated to their end: KAT saved nothing there.
  stopped = res.terminated_B & ~res.probe_B
  saved = int(np.sum(np.where(stopped, max_new_tokens - res.length_B, 0)))
  gen_mask = np.arange(res.kl_BxT.shape[1])[None, :] < res.length_B[:, None]
  # Ground truth for KAT on real models: rollouts with an n-gram repetition loop.
  loop_B = loops.loop_onsets(res.tokens_BxT, res.length_B)
  rec = dict(loss=m["loss"], grad_norm=m["grad_norm"], skipped=m["skipped"], empty=m["empty"],
             kl=float(res.kl_BxT[gen_mask].mean()) if gen else 0.0,
             kl_sampled=float(res.logratio_BxT[gen_mask].mean()) if gen else 0.0,
             trap_rate=float(res.terminated_B.mean()), loop_rate=float((loop_B >= 0).mean()),
             gen_len=float(res.length_B.mean()),
             trained_len=float(res.trained_len_B.mean()),
             trained_weight=float(res.loss_weight_BxT.sum(1).mean()),
             tokens_saved_frac=saved / max(gen + saved, 1), tau=tau,
             tau_probe=m["tau_probe"], tau_rejected=m["tau_rejected"],
             tau_imputed=m["tau_imputed"],
             tokens_per_s=gen / step_time, step_time=step_time)
  counts = dict(generated=gen, trained=int(res.trained_len_B.sum()),
                trained_weight=float(res.loss_weight_BxT.sum()), rows=len(res.length_B),
                terminated=int(res.terminated_B.sum()), saved=saved,
                looped=int((loop_B >= 0).sum()))
  return rec, counts, loop_B


def sample_rows(res, loop_B, prompts: list[str], answers: list, decode, n: int,
                extract: str = "boxed") -> list[dict]:
  """Up to `n` rollouts of a step for the dashboard (kat_jax.report): KAT-cut rows first (at
  most half), then the others, in row order; per token its text, KL and both log-probs, and
  whether the completion's answer is right (None when the row has no answer to grade)."""
  stopped = np.flatnonzero(res.terminated_B & ~res.probe_B)[: n // 2].tolist()
  picked = set(stopped)
  rest = [i for i in range(len(res.length_B)) if i not in picked]
  chosen = sorted(stopped + rest[: n - len(stopped)])
  rows, texts, golds = [], [], []
  for i in chosen:
    n_tok = int(res.length_B[i])
    ids = res.tokens_BxT[i, :n_tok].tolist()
    r4 = lambda a: [round(float(x), 4) for x in a[i, :n_tok]]  # noqa: E731
    rows.append(dict(
        row=i, prompt=prompts[i], tokens=[decode([t]) for t in ids], kl=r4(res.kl_BxT),
        logp_s=r4(res.logp_student_BxT), logp_t=r4(res.logp_teacher_BxT), length=n_tok,
        trained_len=int(res.trained_len_B[i]), terminated=bool(res.terminated_B[i]),
        probe=bool(res.probe_B[i]), eos=bool(res.eos_B[i]), onset=int(res.onset_B[i]),
        detect=int(res.detect_B[i]), loop_onset=int(loop_B[i]), correct=None))
    texts.append(decode(ids))
    golds.append(answers[i])
  graded = [k for k, g in enumerate(golds) if g not in (None, "")]
  if graded:
    workers = 0 if threading.current_thread() is threading.main_thread() else 1
    marks = grading.grade_many([texts[k] for k in graded], [str(golds[k]) for k in graded],
                               workers=workers, extract=extract)
    for k, ok in zip(graded, marks):
      rows[k]["correct"] = bool(ok)
  return rows


@dataclasses.dataclass
class Totals:
  """Token and row counts summed over the steps of this process's run."""
  generated: int = 0
  trained: int = 0
  trained_weight: float = 0.0  # the loss weights' sum (= trained tokens without a weighting policy)
  rows: int = 0
  terminated: int = 0
  saved: int = 0
  looped: int = 0

  def add(self, counts: dict) -> None:
    for k, v in counts.items():
      setattr(self, k, getattr(self, k) + v)

  def summary(self, steps: int, k: int, before, after) -> dict:
    """The run's summary.json: held-out avg@k / pass@k before and after, lengths, rates."""
    macro = lambda r, f: r and r["macro"][f"{f}@{k}"]  # noqa: E731
    rows = max(self.rows, 1)
    return dict(
        steps=steps, k=k, avg_before=macro(before, "avg"), avg_after=macro(after, "avg"),
        pass_before=macro(before, "pass"), pass_after=macro(after, "pass"),
        mean_rollout_length=self.generated / rows, mean_trained_length=self.trained / rows,
        mean_trained_weight=self.trained_weight / rows,
        trap_rate=self.terminated / rows, loop_rate=self.looped / rows,
        loop_before=mean_loop_rate(before), loop_after=mean_loop_rate(after),
        tokens_saved_frac=self.saved / max(self.generated + self.saved, 1))


def mean_loop_rate(report) -> float | None:
  """Share of held-out completions with a repetition loop, averaged over benchmarks."""
  rates = [r["loop_rate"] for r in (report or {}).get("benchmarks", {}).values()
           if "loop_rate" in r]
  return float(np.mean(rates)) if rates else None


class Logger:
  """metrics.jsonl (+ TensorBoard when tensorboardX is installed) and, with `rollouts`,
  rollouts.jsonl, appended to (a resumed run continues its files). Inert off process 0."""

  def __init__(self, workdir: Path, active: bool, rollouts: bool, samples: bool = False):
    self.metrics = open(workdir / "metrics.jsonl", "a") if active else None
    self.rollouts = open(workdir / "rollouts.jsonl", "a") if active and rollouts else None
    self.samples = open(workdir / "samples.jsonl", "a") if active and samples else None
    self.writer = _tensorboard(workdir) if active else None

  def log_samples(self, step: int, rows: list[dict]) -> None:
    """One step's `sample_rows` for the dashboard."""
    if self.samples is None:
      return
    self.samples.write(json.dumps({"step": step, "rows": rows}) + "\n")
    self.samples.flush()

  def log(self, step: int, rec: dict) -> None:
    if self.metrics is None:
      return
    # tau is -inf while KAT warms up: null in the JSONL (strict JSON), absent from TensorBoard.
    clean = {k: (v if np.isfinite(v) else None) for k, v in rec.items()}
    self.metrics.write(json.dumps({"step": step, **clean}) + "\n")
    self.metrics.flush()
    if self.writer:
      for k, v in clean.items():
        if v is not None:
          self.writer.add_scalar(k, v, step)

  def log_rollouts(self, step: int, res, loop_B) -> None:
    """Per-rollout lengths and cuts: what the random-truncation ablation matches."""
    if self.rollouts is None:
      return
    self.rollouts.write(json.dumps(dict(
        step=step, length=res.length_B.tolist(), trained_len=res.trained_len_B.tolist(),
        terminated=res.terminated_B.tolist(), probe=res.probe_B.tolist(), eos=res.eos_B.tolist(),
        loop_onset=loop_B.tolist())) + "\n")
    self.rollouts.flush()

  def close(self) -> None:
    for f in (self.metrics, self.rollouts, self.samples, self.writer):
      if f is not None:
        f.close()


def _tensorboard(workdir: Path):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # TensorBoard files are optional; JSONL is always written
    return None
  return SummaryWriter(str(workdir / "tensorboard"))


def progress(total: int, initial: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc="opd", dynamic_ncols=True)


def print_table(summary: dict, start_step: int) -> None:
  k = summary["k"]
  rows = [(f"held-out avg@{k} before", summary["avg_before"]),
          (f"held-out avg@{k} after", summary["avg_after"]),
          (f"held-out pass@{k} before", summary["pass_before"]),
          (f"held-out pass@{k} after", summary["pass_after"]),
          ("mean rollout length (tokens)", summary["mean_rollout_length"]),
          ("mean trained length (tokens)", summary["mean_trained_length"]),
          ("trap rate (rows cut by KAT)", summary["trap_rate"]),
          ("rollouts with a repetition loop", summary["loop_rate"]),
          ("held-out loop rate before", summary["loop_before"]),
          ("held-out loop rate after", summary["loop_after"]),
          ("tokens saved (upper bound)", summary["tokens_saved_frac"])]
  note = f" (steps {start_step + 1}-{summary['steps']} of this run)" if start_step else ""
  print(f"\nkat_jax OPD summary{note}")
  for name, value in rows:
    text = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else value)
    print(f"  {name:<34} {text}")
