"""The loop study: KAT's detector scored against the n-gram loop detector (kat_jax.loops).

    python -m kat_jax.studies.loops --config configs/smollm2_opd.py --student DIR --out DIR/loops.md

The student samples held-out prompts with KAT off, the teacher scores every token, loops are found
by the detector, and KAT's rules (plain and spike-gated, `kat.detect_offline` with the threshold
the adaptive rule would set from these rollouts) are scored against them: precision and recall of
"terminated" vs "loops", whether the cut lands after the loop began, and the per-token KL inside
loops vs before them vs in loop-free rollouts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kat_jax import hf, kat
from kat_jax.config import rollout_config
from kat_jax.configfile import load_module
from kat_jax.data import benchmarks
from kat_jax.loops import loop_onsets
from kat_jax.studies.experiment import post_hoc, score_uncut


def uncut_rollouts(config, student_dir: str, n_prompts: int, samples: int, seed: int = 0,
                   batch: int = 32, overlap: bool = False) -> dict:
  """KAT off: the student samples `config`'s held-out prompts, the teacher scores each token.

  overlap: also record the top-k overlap (kat.mode='topk' with weights only, which never stops a
  row); data["golds"] / data["extract"] say how to grade the texts."""

  student, _ = hf.load(student_dir)
  teacher, _ = hf.load(config.teacher)
  compat = hf.check_compatible(student_dir, config.teacher)
  s_cfg = hf.read_config(student_dir)
  pad = s_cfg.pad_token_id if s_cfg.pad_token_id is not None else compat.eos_token_ids[0]
  cfg = rollout_config(config, compat.eos_token_ids, pad, compat.vocab_size)
  watch = dict(mode="topk", topk_base=1.0) if overlap else dict(mode="none")
  cfg = dataclasses.replace(cfg, kat=dataclasses.replace(cfg.kat, **watch))
  tok = Tokenizer.from_file(str(Path(student_dir) / "tokenizer.json"))
  bench = benchmarks.heldout(config.data, n_prompts, student_dir)  # its own chat template
  rows = [tok.encode(p, add_special_tokens=False).ids
          for p in bench.prompts for _ in range(samples)]
  data = score_uncut(student, teacher, rows, cfg, pad, seed, batch)
  data["loop"] = loop_onsets(data["tokens"], data["length"])
  data["texts"] = tok.decode_batch([[int(t) for t in r[:n]] for r, n in
                                    zip(data["tokens"], data["length"])])
  data["golds"] = [g for g in bench.golds for _ in range(samples)]
  data["extract"] = bench.extract
  data["kat"] = kat.KATConfig(**{**dataclasses.asdict(cfg.kat), "mode": "kat"})
  data["spike_tau"] = float(config.kat.spike_tau)
  data["quantile"] = float(config.threshold.quantile)
  return data


def detector_scores(data: dict, signal: str, spike_gate: bool) -> dict:
  """KAT's rule applied post hoc to uncut rollouts, scored against the loop ground truth."""
  cfg = dataclasses.replace(data["kat"], signal=signal, spike_gate=spike_gate)
  s = post_hoc(data, signal, cfg, data["quantile"], data["spike_tau"], data["loop"] >= 0,
               data["loop"])
  s["looped"] = s.pop("target")
  return s


def kl_in_loops(data: dict) -> dict:
  """Per-token KL: loop-free rollouts, looping rollouts before the onset, inside the loop."""
  kl, n, onset = data["kl"], data["length"], data["loop"]
  parts = {"loop-free rollouts": [], "looping rollouts, before the loop": [],
           "inside the loop": []}
  for r in range(len(kl)):
    if onset[r] < 0:
      parts["loop-free rollouts"].append(kl[r, :n[r]])
    else:
      parts["looping rollouts, before the loop"].append(kl[r, :onset[r]])
      parts["inside the loop"].append(kl[r, onset[r]:n[r]])
  out = {}
  for name, xs in parts.items():
    v = np.concatenate(xs) if xs else np.zeros(0)
    out[name] = dict(tokens=int(v.size), median=float(np.median(v)) if v.size else float("nan"),
                     mean=float(v.mean()) if v.size else float("nan"),
                     below_1e2=float((v < 1e-2).mean()) if v.size else float("nan"))
  return out


OFFSETS = (-16, -8, -4, -1, 0, 1, 4, 8, 16, 32, 48)


def kl_around_onset(data: dict, offsets=OFFSETS) -> dict[int, float]:
  """Median per-token KL at each offset from the loop onset, over looping rollouts."""
  out = {}
  for o in offsets:
    v = [data["kl"][r, s + o] for r, s in enumerate(data["loop"])
         if s >= 0 and 0 <= s + o < data["length"][r]]
    out[o] = float(np.median(v)) if v else float("nan")
  return out


def report(data: dict, label: str) -> tuple[str, dict]:
  studies = {(rule, signal): detector_scores(data, signal, gate)
             for rule, gate in (("plain", False), ("spike-gated", True))
             for signal in ("kl", "logratio")}
  kl = kl_in_loops(data)
  looped = data["loop"] >= 0
  lines = [f"Student {label}: {len(looped)} rollouts, {looped.mean():.3f} contain a loop "
           f"(median onset token {int(np.median(data['loop'][looped])) if looped.any() else -1}"
           f"), {data['eos'].mean():.3f} end with EOS, mean length {data['length'].mean():.1f}.",
           "", "| tokens | count | median KL | mean KL | share with KL < 0.01 |", "|---|---|---|---|---|"]
  for name, s in kl.items():
    lines.append(f"| {name} | {s['tokens']} | {s['median']:.3g} | {s['mean']:.3g} | "
                 f"{s['below_1e2']:.3f} |")
  around = kl_around_onset(data)
  lines += ["", "Median KL by token offset from the loop onset: "
            + ", ".join(f"{o:+d}: {v:.3g}" for o, v in around.items()) + "."]
  lines += ["", "| rule | signal | tau | flagged | loops | precision | recall | TP cut after "
            "onset | tokens cut |", "|---|---|---|---|---|---|---|---|---|"]
  for (rule, signal), s in studies.items():
    lines.append(f"| {rule} | {signal} | {s['tau']:.3g} | {s['flagged']:.3f} | {s['looped']:.3f}"
                 f" | {s['precision']:.3f} | {s['recall']:.3f} | {s['cut_after_onset']:.3f} | "
                 f"{s['tokens_cut']:.3f} |")
  summary = dict(loop_rate=float(looped.mean()), kl=kl, kl_around_onset=around,
                 rules={f"{r}/{s}": {k: v for k, v in st.items() if k != "det"}
                        for (r, s), st in studies.items()})
  return "\n".join(lines), summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="loop / KAT detector study (module docstring)")
  parser.add_argument("--config", required=True, help="a config file (e.g. smollm2_opd.py)")
  parser.add_argument("--student", action="append", default=[],
                      help="LABEL=DIR or DIR; repeat for several (default: config.student)")
  parser.add_argument("--prompts", type=int, default=32)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--out", default="", help="markdown file to write (and .json beside it)")
  args = parser.parse_args(argv)
  config = load_module(args.config).get_config(None)
  students = [s.split("=", 1) if "=" in s else [s, s] for s in args.student] or \
      [["initial", config.student]]
  texts, summaries = [], {}
  for label, path in students:
    data = uncut_rollouts(config, path, args.prompts, args.samples)
    text, summaries[label] = report(data, label)
    texts.append(text)
    print(text + "\n", flush=True)
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(texts) + "\n")
    out.with_suffix(".json").write_text(json.dumps(summaries, indent=2) + "\n")


if __name__ == "__main__":
  main()
