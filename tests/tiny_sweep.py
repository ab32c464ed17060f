"""Sweep config for tests: `configs/arith_compare.py`'s variants on the tiny models, 2 steps.

Use as `--config tests/tiny_sweep.py:STUDENT_DIR,TEACHER_DIR`.
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import tiny_config  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "arith_compare", Path(__file__).resolve().parents[1] / "configs" / "arith_compare.py")
_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compare)
prepare = _compare.prepare


def get_config(arg):
  student, teacher = arg.split(",")
  c = tiny_config(Path(student), Path(teacher), 2)
  c.eval_size = 4
  c.log_rollouts = True
  return c


def get_hyper(hyper):
  variants = {v["name"]: v for v in _compare.VARIANTS}
  return hyper.product([hyper.chain([{"name": "s0", "config.seed": 0}]),
                        hyper.chain([variants["plain"], variants["random"]])])
