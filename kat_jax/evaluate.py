"""Answer extraction for math-style completions (grading and pass@k arrive with evaluation)."""

from __future__ import annotations

BOXED = "\\boxed{"


def extract_boxed(text: str) -> str | None:
  """Contents of the last `\\boxed{...}` in `text` (nested braces handled), or None."""
  start = text.rfind(BOXED)
  if start < 0:
    return None
  i = start + len(BOXED)
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None  # unclosed box: no answer
