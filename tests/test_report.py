"""The trap dashboard (kat_jax/report.py) of a real short training run, rendered by headless
Chromium: the DOM it builds and a screenshot that is not blank."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from kat_jax import report, train
from train_fixtures import make_models, tiny_config

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
if CHROMIUM is None:
  if os.environ.get("KAT_JAX_REQUIRE_CHROMIUM") == "1":
    raise RuntimeError("KAT_JAX_REQUIRE_CHROMIUM=1 but no chromium: apt-get install chromium")
  pytest.skip("no headless Chromium (apt-get install chromium)", allow_module_level=True)


def _chromium(*args):
  return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                         "--virtual-time-budget=5000", *args], capture_output=True, text=True,
                        timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("dash")
  cfg = tiny_config(*make_models(root), steps=3)
  cfg.log_samples, cfg.log_samples_every = 6, 2
  cfg.export = False
  train.train(cfg, root / "run")
  return root / "run"


def _samples(run_dir):
  return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_training_logs_samples_and_writes_a_self_contained_report(run_dir):
  samples = _samples(run_dir)
  assert [s["step"] for s in samples] == [1, 2, 3]  # the first, every 2nd, the last
  for s in samples:
    assert len(s["rows"]) == 6
    for row in s["rows"]:
      n = row["length"]
      assert len(row["tokens"]) == len(row["kl"]) == len(row["logp_s"]) == len(row["logp_t"]) == n
      assert row["trained_len"] <= n and row["correct"] in (True, False)
  page = (run_dir / "report.html").read_text()
  # Nothing fetched: no external script, stylesheet, image or link.
  assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
  assert "<link" not in page


def test_the_dashboard_renders_in_headless_chromium(run_dir, tmp_path):
  samples = _samples(run_dir)
  out = _chromium("--dump-dom", (run_dir / "report.html").as_uri())
  dom = out.stdout
  assert 'data-ready="1"' in dom, out.stderr[-2000:]
  titles = re.findall(r'class="plot" data-title="([^"]+)"', dom)
  assert {"loss", "mean KL(student || teacher) per token", "KAT threshold tau", "rates",
          "tokens per rollout", "step time (s)",
          "held-out avg@k / pass@k (macro over benchmarks)"} <= set(titles), titles
  paths = re.findall(r'<path d="(M[^"]+)"', dom)
  assert len(paths) >= 10 and all(p.count("L") >= 1 for p in paths[:4])
  last = samples[-1]["rows"]  # the page opens on the last logged step
  assert len(re.findall(r'class="rollout"', dom)) == len(last)
  tokens = re.findall(r'<span class="tok( cut)?( loop)?" data-kl="([^"]+)" style="background:'
                      r'rgba\(220,38,38,([0-9.]+)\)', dom)
  assert len(tokens) == sum(r["length"] for r in last)
  assert sum(1 for t in tokens if t[0]) == sum(r["length"] - r["trained_len"] for r in last)
  assert max(float(t[3]) for t in tokens) == 1.0  # the highest-KL tokens are fully red
  trapped = [r for r in last if r["terminated"] and 0 <= r["onset"] < r["length"]]
  assert len(re.findall(r'class="mark onset"', dom)) == len(trapped) + 1  # + the legend's
  # The filter as a deep link: only the KAT-cut rollouts of the step with the most of them.
  step = max(samples, key=lambda s: sum(r["terminated"] for r in s["rows"]))
  want = sum(r["terminated"] for r in step["rows"])
  assert 1 <= want < 6  # trapped rows come first, at most half, then the others
  dom = _chromium("--dump-dom", (run_dir / "report.html").as_uri()
                  + f"#step={step['step']}&ftrap=trapped").stdout
  assert len(re.findall(r'class="rollout"', dom)) == want
  assert f"{want} of 6 rollouts" in dom
  shot = tmp_path / "shot.png"
  _chromium("--hide-scrollbars", "--window-size=1200,1400", f"--screenshot={shot}",
            (run_dir / "report.html").as_uri())
  from PIL import Image
  img = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
  hist = img.histogram()
  non_white = 1 - hist[255] / sum(hist)
  assert img.size == (1200, 1400) and non_white > 0.03, non_white  # charts and tokens drawn


def test_a_resumed_or_diverged_run_still_renders(run_dir, tmp_path):
  """A resumed run has no 'before' evaluation and a diverging one logs NaN / inf; a prompt may
  hold '</script>': the page still parses its data and draws."""
  import shutil as sh
  work = tmp_path / "run"
  sh.copytree(run_dir, work)
  summary = json.loads((work / "summary.json").read_text())
  summary["avg_before"] = summary["pass_before"] = None
  (work / "summary.json").write_text(json.dumps(summary))
  samples = _samples(work)
  samples[-1]["rows"][0]["kl"][0] = float("nan")
  samples[-1]["rows"][0]["prompt"] = "</script><!-- <script>"
  (work / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
  with open(work / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "loss": float("inf"), "kl": float("nan")}) + "\n")
  dom = _chromium("--dump-dom", report.build(work).as_uri()).stdout
  assert 'data-ready="1"' in dom and "at the end" in dom
  assert "&lt;/script&gt;&lt;!-- &lt;script&gt;" in dom  # shown as text


def test_report_cli_names_a_workdir_without_metrics(tmp_path):
  out = subprocess.run([sys.executable, "-m", "kat_jax.report", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "metrics.jsonl" in out.stderr
  with pytest.raises(FileNotFoundError):
    report.build(tmp_path)
