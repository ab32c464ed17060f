"""The local sweep runner on the comparison config's variants (tiny models, 2 steps each)."""

import json
import sys
from pathlib import Path

import pytest

from kat_jax import sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import make_models  # noqa: E402

SPEC = str(Path(__file__).resolve().parent / "tiny_sweep.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return make_models(tmp_path_factory.mktemp("models"))


def test_hyper_product_names_and_order():
  pts = sweep.hyper.product([sweep.hyper.sweep("config.seed", [0, 1]),
                             sweep.hyper.chain([{"name": "a", "config.kat.mode": "none"},
                                                {"name": "b"}])])
  assert [sweep.point_name(p) for p in pts] == ["a", "b", "a", "b"]
  assert pts[2] == {"config.seed": 1, "name": "a", "config.kat.mode": "none"}
  assert sweep.point_name({"config.seed": 1}) == "seed=1"
  names = sweep.points("configs/arith_compare.py")
  assert len(names) == 33 and sweep.point_name(names[3]) == "s0_random"


def test_random_variant_matches_the_plain_runs_cuts(models, tmp_path):
  arg = f"{models[0]},{models[1]}"
  out = sweep.run_local(SPEC, str(tmp_path), arg)
  assert set(out) == {"s0_plain", "s0_random"}
  plain = [json.loads(line) for line in open(tmp_path / "s0_plain" / "rollouts.jsonl")]
  expected = [t if cut else 16 + 1 for rec in plain
              for t, cut in zip(rec["trained_len"], rec["terminated"])]
  used = json.loads((tmp_path / "s0_random" / "config.json").read_text())["kat"]
  assert used["mode"] == "random" and used["random_lengths"] == expected
  for name in out:
    assert json.loads((tmp_path / name / "summary.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / name / "eval_after.json").read_text())["k"] == 4
  # A rerun skips finished points and trains nothing.
  stamp = (tmp_path / "s0_plain" / "metrics.jsonl").stat().st_mtime_ns
  again = sweep.run_local(SPEC, str(tmp_path), arg)
  assert again == out and (tmp_path / "s0_plain" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_bad_override_names_the_key():
  from ml_collections import ConfigDict
  with pytest.raises(ValueError, match="'config.kat.windw': config has no such setting"):
    sweep.apply(ConfigDict({"kat": {"window": 4}}), {"config.kat.windw": 3})
