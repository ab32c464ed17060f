"""The uncut truncation-policy study (kat_jax.studies.policies) and the long sweep's budget
matching (configs/smollm2_long_compare.py), on synthetic traces with known answers."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from kat_jax import kat
from kat_jax.studies import policies as study

ROOT = Path(__file__).resolve().parents[1]


def _data(seed=0, rows=24, t=64, w=4):
  """Rollouts with loops: looping rows go low-KL (and low top-k overlap) from their onset."""
  rng = np.random.default_rng(seed)
  length = rng.integers(8, t + 1, rows).astype(np.int32)
  loop = np.full(rows, -1, np.int32)
  kl = rng.uniform(0.5, 1.5, (rows, t)).astype(np.float32)
  overlap = rng.choice([0.5, 0.75, 1.0], (rows, t)).astype(np.float32)
  for r in range(0, rows, 3):
    length[r] = t
    loop[r] = int(rng.integers(4, 24))
    kl[r, loop[r]:] = 0.01
    overlap[r, loop[r]:] = 0.25  # drifting from the teacher's top-k while agreeing on the token
  gen = np.arange(t)[None, :] < length[:, None]
  kl, overlap = kl * gen, overlap * gen
  ends = np.arange(w, t + 1, w)[None, :]
  eos = length < t
  return dict(kl=kl, logratio=(kl * 0.3).astype(np.float32), overlap=overlap, length=length,
              eos=eos, loop=loop, window_complete=(ends < length[:, None]) | (
                  (ends == length[:, None]) & ~eos[:, None]))


class _Cfg(dict):
  __getattr__ = dict.__getitem__


def _config(t=64):
  k = {f: getattr(kat.KATConfig(), f) for f in kat.KATConfig.__dataclass_fields__}
  k.update(window=4, patience=2, min_len=8)
  return _Cfg(kat=_Cfg(k, spike_tau=2.0), threshold=_Cfg(quantile=0.4), max_new_tokens=t)


def test_scores_match_brute_force_counts():
  data = _data()
  res = study.study(data, _config())
  for name, cut in res["cuts"].items():
    s = res["scores"][name]
    looped = data["loop"] >= 0
    flagged = cut["terminated"]
    assert s["precision"] == pytest.approx((flagged & looped).sum() / max(flagged.sum(), 1))
    assert s["recall"] == pytest.approx((flagged & looped).sum() / looped.sum())
    loop_tok = drop_loop = healthy = drop_healthy = 0
    for r in range(len(data["length"])):
      for i in range(data["length"][r]):
        inside = looped[r] and i >= data["loop"][r]
        dropped = i >= cut["trained_len"][r]
        loop_tok += inside
        drop_loop += inside and dropped
        healthy += not inside
        drop_healthy += (not inside) and dropped
    assert s["loop_tokens_dropped"] == pytest.approx(drop_loop / loop_tok), name
    assert s["healthy_tokens_dropped"] == pytest.approx(drop_healthy / healthy), name
  # KAT catches these loops (low KL for >= 2 windows after the onset), vanilla and IW cut nothing.
  assert res["scores"]["KAT plain"]["recall"] == 1.0
  assert res["scores"]["vanilla"]["flagged"] == 0 == res["scores"]["IW-OPD (gamma 0.5)"]["flagged"]
  assert res["scores"]["IW-OPD (gamma 0.5)"]["weight"] > res["scores"]["vanilla"]["weight"]


def test_matched_knobs_train_kats_budget():
  data = _data(1)
  res = study.study(data, _config())
  target = res["kat_target"]
  n = res["knobs"]["fixed_len"]
  assert np.minimum(data["length"], n).mean() >= target > np.minimum(data["length"], n - 1).mean()
  esr = res["scores"]["ESR at KAT's budget"]["trained"]
  topk = res["scores"]["Prune-OPD at KAT's budget"]["trained"]
  assert esr >= target and topk >= target
  m = res["knobs"]["topk_events"]
  assert kat.KATConfig(mode="topk", topk_drop=1.0 / m).stop_events == m
  # One event fewer trains less than KAT: m is the smallest count that reaches the budget.
  fewer = study.apply_policy(data, kat.KATConfig(mode="topk", window=4, topk_drop=1.0 / (m - 1)),
                             0.0, 2.0)
  assert fewer["trained_len"].mean() < target


def test_random_cut_draws_kats_cuts():
  data = _data(2, rows=3000)
  source = dict(terminated=np.arange(3000) % 4 == 0, trained_len=np.full(3000, 5))
  cut = study.random_cut(data, source)
  assert abs(cut["terminated"].mean() - 0.25) < 0.03
  np.testing.assert_array_equal(cut["trained_len"][cut["terminated"]], 5)


def _compare_config():
  spec = importlib.util.spec_from_file_location("cmp", ROOT / "configs" / "smollm2_long_compare.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_long_sweep_matches_budgets_from_earlier_runs(tmp_path):
  cmp = _compare_config()
  assert cmp.matched_length([10, 20, 30], 15.0) == 18  # (10 + 2N) / 3 >= 15
  for name, recs in (("s0_kat", [dict(length=[30, 30], trained_len=[10, 30],
                                      terminated=[True, False])]),
                     ("s0_vanilla", [dict(length=[40, 10], trained_len=[40, 10],
                                          terminated=[False, False])])):
    (tmp_path / name).mkdir()
    (tmp_path / name / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  (tmp_path / "uncut").mkdir()
  (tmp_path / "uncut" / "uncut.json").write_text(json.dumps({"initial": {"knobs": {
      "topk_events": 40}}}))
  points = {p["name"]: p for p in cmp.get_hyper(__import__("kat_jax.sweep").sweep.hyper)}
  assert list(points)[:2] == ["s0_vanilla", "s0_kat"] and len(points) == 18

  def prepared(name):
    from kat_jax import sweep
    c = sweep.apply(cmp.get_config(), points[name])
    return cmp.prepare(c, points[name], tmp_path)
  assert prepared("s0_esr").kat.fixed_len == 30  # KAT trains 20 / rollout: (min(40, N) + 10) / 2
  assert prepared("s0_random").kat.random_lengths == [10, 513]
  assert prepared("s0_topk").kat.topk_drop == pytest.approx(1 / 40)
  with pytest.raises(FileNotFoundError, match="s1_kat"):
    prepared("s1_esr")


def test_cut_plot_is_written(tmp_path):
  pytest.importorskip("matplotlib")
  data = _data(3)
  res = study.study(data, _config())
  study.plot(data, res, tmp_path / "cuts.png", "synthetic", window=4)
  from PIL import Image
  with Image.open(tmp_path / "cuts.png") as im:
    assert im.size[0] > 1000 and im.size[1] > 500


def test_an_interrupted_study_resumes_with_the_next_student(tmp_path, monkeypatch):
  """Sampling a student's uncut rollouts takes tens of minutes at 512 tokens: a rerun reuses
  rollouts saved for the same student, config, prompts and samples, and resamples otherwise."""
  pytest.importorskip("matplotlib")
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import ml_collections\n"
      "from kat_jax import kat\n"
      "def get_config(arg=None):\n"
      "  k = {f: getattr(kat.KATConfig(), f) for f in kat.KATConfig.__dataclass_fields__}\n"
      "  k.update(window=4, patience=2, min_len=8, spike_tau=2.0)\n"
      "  return ml_collections.ConfigDict(dict(kat=k, threshold=dict(quantile=0.4),\n"
      "                                        max_new_tokens=64, student='/init'))\n")
  calls = []

  def fake_sampler(config, student, n_prompts, samples, batch=16):
    calls.append((student, samples))
    data = _data(len(calls))
    return dict(data, tokens=np.zeros_like(data["kl"], np.int32),
                correct=np.zeros(len(data["length"]), bool))

  monkeypatch.setattr(study, "uncut_rollouts", fake_sampler)
  args = ["--config", str(cfg), "--initial", "--student", "after=/trained", "--samples", "2",
          "--out", str(tmp_path / "out")]
  study.main(args)
  assert calls == [("/init", 2), ("/trained", 2)]
  first = (tmp_path / "out" / "uncut.json").read_text()
  (tmp_path / "out" / "uncut.json").unlink()  # as if the study stopped after sampling
  study.main(args)
  assert len(calls) == 2 and (tmp_path / "out" / "uncut.json").read_text() == first
  # Another student at the same index, or other sampling settings: sampled anew.
  study.main(args[:4] + ["after=/other"] + args[5:])
  assert calls[2:] == [("/other", 2)]
  study.main(args[:6] + ["4"] + args[7:])
  assert calls[3:] == [("/init", 4), ("/trained", 4)]
  # A file saved without its key (an older run) is not trusted either.
  data = study.cached_rollouts(tmp_path / "out" / "rollouts_0.npz",
                               dict(student="/init", config=str(cfg), prompts=32, samples=4))
  assert data is not None and set(data) == set(study.SAVED)
  np.savez(tmp_path / "old.npz", **data)
  assert study.cached_rollouts(tmp_path / "old.npz", dict(student="/init")) is None


def test_training_curves_plot_every_policy(tmp_path):
  pytest.importorskip("matplotlib")
  for seed in (0, 1):
    for name in ("vanilla", "kat"):
      d = tmp_path / f"s{seed}_{name}"
      d.mkdir()
      (d / "summary.json").write_text("{}")
      (d / "metrics.jsonl").write_text("".join(
          json.dumps(dict(step=i, loop_rate=i / 10, gen_len=50.0 * i, trained_len=40.0 * i)) + "\n"
          for i in range(1, 11)) + json.dumps(dict(step=10, **{"final/avg@4": 0.1})) + "\n")
  (tmp_path / "s0_unfinished").mkdir()  # no summary.json: not plotted
  (tmp_path / "s1_kat" / "metrics.jsonl").write_text("".join(  # seed 1 of kat: twice the loops
      json.dumps(dict(step=i, loop_rate=i / 5, gen_len=50.0 * i, trained_len=40.0 * i)) + "\n"
      for i in range(1, 11)))
  curves = study.training_curves(tmp_path, smooth=3)
  assert set(curves) == {"vanilla", "kat"} and curves["kat"]["seeds"] == 2
  assert curves["kat"]["steps"] == list(range(1, 11))
  # Step 5: seeds' mean 0.75 · step, trailing mean over steps 3, 4, 5.
  assert curves["kat"]["loop_rate"][4] == pytest.approx(0.15 * 4)
  assert curves["kat"]["loop_rate"][0] == pytest.approx(0.15)  # only step 1 so far
  assert curves["vanilla"]["gen_len"][9] == pytest.approx(450.0)
  study.plot_training(tmp_path, tmp_path / "training.png", ["vanilla", "kat"])
  from PIL import Image
  with Image.open(tmp_path / "training.png") as im:
    assert im.size[0] > 1000 and im.size[1] > 300
