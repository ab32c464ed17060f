"""The trap dashboard: one self-contained HTML file (no network, no CDN) of a training run.

    python -m kat_jax.report WORKDIR [--out FILE]      # default WORKDIR/report.html

(train writes it at the end of every run.) It shows the training curves from metrics.jsonl --
loss, mean KL, tau beside the uncut-probe quantile, trap and loop rates, tokens generated and
trained, step time, held-out avg@k / pass@k -- and a rollout browser over samples.jsonl
(config.log_samples rows every config.log_samples_every steps): each token coloured by its
KL(student || teacher), KAT's onset / detection / cut marked, the tail KAT drops struck through,
repetition loops shaded, the per-token student and teacher log-probs on hover, and filters
(trapped or not, correct or wrong; also as a link, report.html#step=40&ftrap=trapped&fcorrect=
wrong). The charts are inline SVG drawn by a few lines of inline JavaScript from the JSON
embedded in the page.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

# Curves: (title, [(metric key, label)]); eval curves are found by their key pattern.
CURVES = [
    ("loss", [("loss", "loss")]),
    ("mean KL(student || teacher) per token", [("kl", "full-vocabulary KL"),
                                               ("kl_sampled", "sampled log-ratio")]),
    ("KAT threshold tau", [("tau", "tau"), ("tau_probe", "uncut-probe quantile")]),
    ("rates", [("trap_rate", "trap rate"), ("loop_rate", "loop rate")]),
    ("tokens per rollout", [("gen_len", "generated"), ("trained_len", "trained")]),
    ("step time (s)", [("step_time", "step time")]),
]


def _records(path: Path) -> list[dict]:
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
        continue
  return out


def _series(metrics: list[dict]) -> list[dict]:
  """Chart specs: per chart, its lines as [[step, value], ...] (nulls dropped)."""
  charts = []
  for title, keys in CURVES:
    lines = [{"label": label, "points": [[r["step"], r[k]] for r in metrics
                                         if r.get(k) is not None and "loss" in r]}
             for k, label in keys]
    if any(line["points"] for line in lines):
      charts.append({"title": title, "lines": lines})
  # Macro averages over the benchmarks: eval/avg@k (before and during), final/avg@k (after).
  names = sorted({k.split("/", 1)[1] for r in metrics for k in r
                  if k.startswith(("eval/", "final/")) and k.count("/") == 1
                  and ("avg@" in k or "pass@" in k)})
  if names:
    lines = [{"label": name,
              "points": [[r["step"], r[k]] for r in metrics for k in (f"eval/{name}",
                                                                      f"final/{name}")
                         if r.get(k) is not None]} for name in names]
    charts.append({"title": "held-out avg@k / pass@k (macro over benchmarks)", "lines": lines})
  return charts


def _finite(x):
  """x with every non-finite float replaced by None."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_finite(v) for v in x]
  return x


def build(workdir: str | Path, out: str | Path | None = None) -> Path:
  """Writes the dashboard of `workdir` (metrics.jsonl, samples.jsonl, config.json,
  summary.json when present); returns its path."""
  workdir = Path(workdir)
  metrics = _records(workdir / "metrics.jsonl")
  if not metrics:
    raise FileNotFoundError(f"{workdir / 'metrics.jsonl'} is missing or empty: give the workdir "
                            "of a training run (python -m kat_jax.main ... --workdir DIR).")
  config = (json.loads((workdir / "config.json").read_text())
            if (workdir / "config.json").is_file() else {})
  summary = (json.loads((workdir / "summary.json").read_text())
             if (workdir / "summary.json").is_file() else {})
  data = {"charts": _series(metrics), "samples": _records(workdir / "samples.jsonl"),
          "summary": summary,
          "run": {k: config.get(k) for k in ("student", "teacher", "steps", "prompts_per_step",
                                             "samples_per_prompt", "max_new_tokens")},
          "kat": config.get("kat", {}), "threshold": config.get("threshold", {})}
  # Strict JSON (a diverging run's NaN / inf become null: JSON.parse refuses them), and no "<"
  # inside the <script> element ("</script>" or "<!--" in a prompt would end or confuse it).
  payload = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False)
  payload = payload.replace("<", "\\u003c")
  page = _PAGE.replace("__TITLE__", html.escape(f"kat_jax run {workdir.name}"))
  page = page.replace("__DATA__", payload)
  out = Path(out) if out else workdir / "report.html"
  out.write_text(page)
  return out


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
#meta{color:#555;margin-bottom:8px}
#charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}
.chart{border:1px solid #ddd;border-radius:4px;padding:6px}
.chart h3{font-size:13px;margin:0 0 4px}
.legend span{margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:3px}
#controls{margin:6px 0} #controls label{margin-right:12px}
.rollout{border:1px solid #ddd;border-radius:4px;margin:8px 0;padding:6px}
.rollout .head{font-size:12px;color:#444;margin-bottom:4px}
.rollout .prompt{color:#666;font-size:12px;white-space:pre-wrap;margin-bottom:4px}
.tokens{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px}
.tok.cut{text-decoration:line-through;opacity:.55}
.tok.loop{outline:1px dashed #7a4fd6}
.mark{display:inline-block;font-size:10px;color:#fff;border-radius:3px;padding:0 3px;margin:0 2px}
.mark.onset{background:#d97706} .mark.detect{background:#b91c1c} .mark.cut{background:#111}
.mark.loop{background:#7a4fd6}
.badge{display:inline-block;border-radius:3px;padding:0 4px;margin-left:4px;font-size:11px}
.trapped{background:#fee2e2} .healthy{background:#dcfce7} .ok{background:#dcfce7}
.wrong{background:#fee2e2} .probe{background:#e0e7ff}
#empty{color:#888}
</style></head><body>
<h1>__TITLE__</h1><div id="meta"></div>
<h2>Training curves</h2><div id="charts"></div>
<h2>Rollouts</h2>
<div id="controls">
<label>step <select id="step"></select></label>
<label>KAT <select id="ftrap"><option value="all">all</option><option value="trapped">trapped
</option><option value="healthy">not trapped</option></select></label>
<label>answer <select id="fcorrect"><option value="all">all</option><option value="ok">correct
</option><option value="wrong">wrong</option></select></label>
<span id="count"></span></div>
<div id="legend" class="legend">token colour: KL(student || teacher), white = 0, red = the
step's 99th percentile; <span class="mark onset">onset</span> trap onset
<span class="mark detect">detect</span> detection <span class="mark cut">cut</span> loss ends
(tail struck through) <span class="mark loop">loop</span> repetition loop (dashed)</div>
<div id="rollouts"></div><div id="empty"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4))
                                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function fmt(v) {
  if (typeof v !== "number" || !isFinite(v)) return "n/a";
  return Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.01)
         ? v.toExponential(2) : (+v.toFixed(3)).toString();
}
function chart(spec, parent) {
  const box = el("div", {class: "chart"}, parent);
  el("h3", {}, box, spec.title);
  const W = 360, H = 170, L = 48, R = 8, T = 8, B = 22;
  const pts = spec.lines.flatMap(l => l.points);
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, width: "100%", class: "plot",
                             "data-title": spec.title}, box);
  el("svg:rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafafa",
                  stroke: "#ccc"}, svg);
  for (const [v, y] of [[y1, T + 9], [y0, H - B]])
    el("svg:text", {x: L - 4, y: y, "text-anchor": "end", "font-size": 10}, svg, fmt(v));
  for (const [v, anchor] of [[x0, "start"], [x1, "end"]])
    el("svg:text", {x: sx(v), y: H - 6, "text-anchor": anchor, "font-size": 10}, svg,
       "step " + v);
  const legend = el("div", {class: "legend"}, box);
  spec.lines.forEach((line, i) => {
    const c = COLORS[i % COLORS.length];
    if (!line.points.length) return;
    const d = line.points.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " "
                                        + sy(p[1]).toFixed(1)).join(" ");
    el("svg:path", {d: d, fill: "none", stroke: c, "stroke-width": 1.6,
                    "data-label": line.label}, svg);
    if (line.points.length < 30)
      for (const p of line.points) el("svg:circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.2,
                                                     fill: c}, svg);
    const s = el("span", {}, legend);
    el("i", {style: "background:" + c}, s);
    s.appendChild(document.createTextNode(line.label));
  });
}
function meta() {
  const r = D.run, k = D.kat || {}, s = D.summary || {};
  const parts = [`student ${r.student}`, `teacher ${r.teacher}`,
                 `${r.prompts_per_step} x ${r.samples_per_prompt} rollouts/step`,
                 `KAT ${k.mode} window ${k.window} patience ${k.patience} min_len ${k.min_len}`];
  if (typeof s.avg_after === "number")  // a resumed run has no "before"
    parts.push(typeof s.avg_before === "number"
               ? `avg@${s.k} ${fmt(s.avg_before)} -> ${fmt(s.avg_after)}`
               : `avg@${s.k} ${fmt(s.avg_after)} at the end`);
  if (s.trap_rate !== undefined) parts.push(`trap rate ${fmt(s.trap_rate)}`);
  document.getElementById("meta").textContent = parts.join(" | ");
}
function quantile(values, q) {
  if (!values.length) return 1;
  const v = [...values].sort((a, b) => a - b);
  return v[Math.min(v.length - 1, Math.floor(q * v.length))] || 1e-6;
}
function rollout(row, scale, parent) {
  const box = el("div", {class: "rollout", "data-row": row.row}, parent);
  const head = el("div", {class: "head"}, box,
                  `row ${row.row}: ${row.length} tokens generated, ${row.trained_len} trained`);
  el("span", {class: "badge " + (row.terminated ? "trapped" : "healthy")}, head,
     row.terminated ? "trapped" : "not trapped");
  if (row.probe) el("span", {class: "badge probe"}, head, "probe (generated to its end)");
  if (row.correct !== null && row.correct !== undefined)
    el("span", {class: "badge " + (row.correct ? "ok" : "wrong")}, head,
       row.correct ? "correct" : "wrong");
  if (row.prompt) el("div", {class: "prompt"}, box, row.prompt);
  const toks = el("div", {class: "tokens"}, box);
  const mark = (kind, t) => el("span", {class: "mark " + kind, "data-t": t}, toks,
                               kind === "detect" ? "detect" : kind);
  row.tokens.forEach((text, t) => {
    if (row.terminated && t === row.onset) mark("onset", t);
    if (row.terminated && t === row.detect) mark("detect", t);
    if (row.loop_onset >= 0 && t === row.loop_onset) mark("loop", t);
    if (t === row.trained_len && row.trained_len < row.length) mark("cut", t);
    const kl = row.kl[t], a = Math.min(1, Math.max(0, kl / scale));
    const cls = ["tok"];
    if (t >= row.trained_len) cls.push("cut");
    if (row.loop_onset >= 0 && t >= row.loop_onset) cls.push("loop");
    el("span", {class: cls.join(" "), "data-kl": kl,
                style: `background:rgba(220,38,38,${a.toFixed(3)})`,
                title: `t=${t}  KL=${fmt(kl)}  log p_student=${fmt(row.logp_s[t])}  ` +
                       `log p_teacher=${fmt(row.logp_t[t])}`}, toks, text);
  });
}
function render() {
  const step = +document.getElementById("step").value;
  const ftrap = document.getElementById("ftrap").value;
  const fcorrect = document.getElementById("fcorrect").value;
  const entry = D.samples.find(s => s.step === step);
  const parent = document.getElementById("rollouts");
  parent.replaceChildren();
  if (!entry) return;
  const scale = quantile(entry.rows.flatMap(r => r.kl), 0.99);
  let shown = 0;
  for (const row of entry.rows) {
    if (ftrap === "trapped" && !row.terminated) continue;
    if (ftrap === "healthy" && row.terminated) continue;
    if (fcorrect === "ok" && row.correct !== true) continue;
    if (fcorrect === "wrong" && row.correct !== false) continue;
    rollout(row, scale, parent);
    shown += 1;
  }
  document.getElementById("count").textContent = `${shown} of ${entry.rows.length} rollouts`;
}
meta();
const charts = document.getElementById("charts");
for (const spec of D.charts) chart(spec, charts);
const select = document.getElementById("step");
for (const s of D.samples) el("option", {value: s.step}, select, "step " + s.step);
if (D.samples.length) {
  select.value = D.samples[D.samples.length - 1].step;
  // Deep links: report.html#step=40&ftrap=trapped&fcorrect=wrong
  for (const part of location.hash.slice(1).split("&")) {
    const [k, v] = part.split("=");
    const box = document.getElementById(k);
    if (box && ["step", "ftrap", "fcorrect"].includes(k)) box.value = decodeURIComponent(v);
  }
  for (const id of ["step", "ftrap", "fcorrect"])
    document.getElementById(id).addEventListener("change", render);
  render();
} else {
  document.getElementById("empty").textContent =
      "no samples.jsonl in this run (config.log_samples = 0)";
}
document.body.setAttribute("data-ready", "1");
</script></body></html>
"""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="a training run's --workdir")
  parser.add_argument("--out", default="", help="output file (default WORKDIR/report.html)")
  args = parser.parse_args(argv)
  try:
    print(build(args.workdir, args.out or None))
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
