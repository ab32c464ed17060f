"""Config file for subprocess tests: `--config tests/tiny_config.py:STUDENT_DIR,TEACHER_DIR,STEPS`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import tiny_config  # noqa: E402


def get_config(arg):
  student, teacher, steps = arg.split(",")
  return tiny_config(Path(student), Path(teacher), int(steps))
