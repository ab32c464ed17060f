"""Grading math completions: the last `\\boxed{...}`, a fast exact / numeric path, then math-verify.

`grade(completion, gold)` is the whole rule:
  1. the answer is the contents of the LAST `\\boxed{...}` (nested braces handled); a completion
     without one is wrong (and counted as "no answer" by the evaluator);
  2. a fast path decides plain cases without sympy: identical strings after light normalisation,
     or two numbers (integers with leading zeros like AIME's `025`, decimals like AMC's `27.0`,
     thousands separators `1,000`, simple fractions `\\frac{1}{2}` / `1/2`) compared exactly;
  3. otherwise `math-verify` decides, with the gold wrapped as `\\boxed{gold}` and the extracted
     answer as `\\boxed{answer}` -- we extract the box ourselves because math-verify merges
     adjacent boxes (`\\boxed{1}\\boxed{2}` parses as the set {1, 2}) and credits unboxed text.

math-verify bounds its sympy work with `signal.alarm`, which only works on a process's main thread.
`grade` calls it in-process when on the main thread and otherwise through a worker process;
`grade_many` sends every undecided pair to a pool of worker processes (spawned, so they never fork
a process that runs JAX threads). This module imports neither JAX nor sympy at import time, so the
workers start in about a second.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import re
import threading
from fractions import Fraction

BOXED = "\\boxed{"
# Parsing / verification budget per answer, seconds (math-verify's own defaults are 5 / 5).
TIMEOUT_S = 5


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


# A number as written in prose: thousands groups only in threes (`1,000`, but `3,4` is two numbers),
# decimals (`2.5`, `.5`), fractions (`3/4`), a sign only where no digit precedes it (`3-5` is a
# range: its last number is 5, not -5).
_LAST_NUMBER = re.compile(
    r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\d.])-?\.\d+")


def extract_answer(text: str, extract: str = "boxed") -> str | None:
  """The answer of `text`: the last `\\boxed{}`; with extract='last_number' and no non-empty box,
  the last number written (`-14`, `1,000`, `2.5`, `3/4`) -- for models too small to box."""
  if extract not in ("boxed", "last_number"):
    raise ValueError(f"extract={extract!r}; use 'boxed' or 'last_number'.")
  boxed = extract_boxed(text)
  if extract == "boxed" or (boxed is not None and boxed.strip()):
    return boxed
  # An echoed instruction's empty \boxed{} is no answer; a Unicode minus is a minus.
  numbers = _LAST_NUMBER.findall(text.replace("\u2212", "-"))
  return numbers[-1] if numbers else None


# ------------------------------------------------------------------------------- fast path

_SPACES = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\s+")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$|^([+-]?)\\[dt]?frac(\d)(\d)$")
_SLASH = re.compile(r"^([+-]?\d+)/(\d+)$")


def _normalize(s: str) -> str:
  s = _SPACES.sub("", s.strip())
  s = s.strip("$").replace("\\left", "").replace("\\right", "")
  # `\text{5}` / `\mathrm{5}` around a plain answer.
  m = re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", s)
  return m[1] if m else s


def _number(s: str) -> Fraction | None:
  """An exact rational for plain numeric answers, else None."""
  if _THOUSANDS.match(s):
    s = s.replace(",", "")
  if _NUMBER.match(s):
    return Fraction(s)
  m = _FRAC.match(s)
  if m:
    sign, num, den = (m[1], m[2], m[3]) if m[2] is not None else (m[4], m[5], m[6])
    if int(den) == 0:
      return None
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value
  m = _SLASH.match(s)
  if m and int(m[2]) != 0:
    return Fraction(int(m[1]), int(m[2]))
  return None


def fast_equal(answer: str, gold: str) -> bool | None:
  """True / False when the fast path can decide, None when it takes math-verify."""
  a, g = _normalize(answer), _normalize(gold)
  if a == g:
    return True
  na, ng = _number(a), _number(g)
  if na is not None and ng is not None:
    if na == ng:
      return True
    # Two integers that differ are different; two decimals may still agree after math-verify's
    # rounding (gold 0.333 vs 1/3), so those go on.
    if na.denominator == 1 and ng.denominator == 1:
      return False
  return None


# ----------------------------------------------------------------------------- math-verify


def _verify_pairs(pairs: list[tuple[str, str]]) -> list[bool]:
  """math-verify on (answer, gold) pairs; must run on a process's main thread (signal.alarm)."""
  from math_verify import parse, verify
  out = []
  for answer, gold in pairs:
    try:
      g = parse(BOXED + gold + "}", parsing_timeout=TIMEOUT_S)
      a = parse(BOXED + answer + "}", parsing_timeout=TIMEOUT_S)
      out.append(bool(g) and bool(a) and bool(verify(g, a, timeout_seconds=TIMEOUT_S)))
    except Exception:  # a parser crash or timeout on odd LaTeX is a wrong answer, not a dead eval
      out.append(False)
  return out


_POOL: concurrent.futures.ProcessPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  global _POOL, _POOL_SIZE
  with _POOL_LOCK:
    if _POOL is None or _POOL_SIZE != workers:
      if _POOL is not None:
        _POOL.shutdown(wait=False, cancel_futures=True)
      _POOL = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"))
      _POOL_SIZE = workers
      # Shut the workers down before interpreter teardown (otherwise the executor's weakref
      # callback can run after its modules are gone and print a traceback at exit).
      atexit.register(shutdown)
    return _POOL


def shutdown() -> None:
  """Stops the grading worker processes (they also stop when the interpreter exits)."""
  global _POOL
  with _POOL_LOCK:
    if _POOL is not None:
      _POOL.shutdown(wait=True, cancel_futures=True)
      _POOL = None


def grade(completion: str, gold: str) -> bool:
  """True iff the last boxed answer in `completion` equals `gold` (see the module docstring)."""
  in_main = threading.current_thread() is threading.main_thread()
  return grade_many([completion], [gold], workers=0 if in_main else 1)[0]


def grade_many(completions: list[str], golds: list[str], workers: int = 2,
               chunk: int = 64, extract: str = "boxed") -> list[bool]:
  """`grade` over many pairs; undecided ones go to `workers` processes (0: in this process).
  `extract`: how the answer is read (`extract_answer`)."""
  if len(completions) != len(golds):
    raise ValueError(f"{len(completions)} completions but {len(golds)} golds.")
  out: list[bool | None] = []
  todo: list[tuple[int, str, str]] = []
  for i, (c, g) in enumerate(zip(completions, golds)):
    answer = extract_answer(c, extract)
    decided = False if answer is None else fast_equal(answer, str(g))
    out.append(decided)
    if decided is None:
      todo.append((i, answer, str(g)))
  if not todo:
    return out  # type: ignore[return-value]
  pairs = [(a, g) for _, a, g in todo]
  if workers <= 0:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("grade_many(workers=0) must run on the main thread (math-verify uses "
                         "signal.alarm); pass workers >= 1.")
    results = _verify_pairs(pairs)
  else:
    chunks = [pairs[i:i + chunk] for i in range(0, len(pairs), chunk)]
    results = [r for part in _pool(workers).map(_verify_pairs, chunks) for r in part]
  for (i, _, _), r in zip(todo, results):
    out[i] = r
  return out  # type: ignore[return-value]
