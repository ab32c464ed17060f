"""The embedded task: chains of 2-digit additions / subtractions with a written scratchpad.

  prompt:      25+91-20+22=
  completion:  25+91=116;116-20=96;96+22=118;\\boxed{118}</s>

Why this task: a student's early slip (one wrong intermediate value) is followed by lines that
correctly continue from the wrong number -- locally consistent text the teacher agrees with (low KL)
that ends in a wrong answer: the KL agreement trap, at a size that trains on 2 CPU cores. Longer
chains give longer doomed tails.

Problems are a pure function of (seed, index), so the data position in a checkpoint is one integer;
train and held-out problems are disjoint by construction (a hash of the problem picks the split).
The tokenizer is character-level with `\\boxed{` as one token, built with the `tokenizers` library
and saved as tokenizer.json so the models load through the same HF path as real checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from kat_jax.grading import extract_boxed

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)
SYMBOLS = tuple("0123456789+-=;") + ("\\boxed{", "}")
VOCAB = SPECIALS + SYMBOLS  # ids: pad 0, bos 1, eos 2, then symbols
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_TOKEN_RE = re.compile(r"\\boxed\{|.", re.S)


def make_problem(seed: int, index: int, n_ops: int = 3, split: str = "train"):
  """Problem `index` of the stream for (seed, split): (prompt, completion, answer)."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}; use 'train' or 'eval'.")
  # Skip problems of the other split; a problem's split is a hash of its text, never of the seed.
  rng = np.random.default_rng([seed, index, n_ops, split == "eval"])
  while True:
    nums = rng.integers(10, 100, n_ops + 1).tolist()
    ops = rng.choice(["+", "-"], n_ops).tolist()
    prompt = str(nums[0]) + "".join(o + str(n) for o, n in zip(ops, nums[1:])) + "="
    if problem_split(prompt) == split:
      break
  value, lines = nums[0], []
  for op, n in zip(ops, nums[1:]):
    new = value + n if op == "+" else value - n
    lines.append(f"{value}{op}{n}={new};")
    value = new
  return prompt, "".join(lines) + f"\\boxed{{{value}}}", str(value)


def problem_split(prompt: str) -> str:
  """One problem in ten is held out for evaluation, decided by a hash of its text."""
  return "eval" if hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0 else "train"


def encode(text: str) -> list[int]:
  ids = []
  for piece in _TOKEN_RE.findall(text):
    if piece not in _INDEX:
      raise ValueError(f"character {piece!r} is not in the arithmetic vocabulary {SYMBOLS}.")
    ids.append(_INDEX[piece])
  return ids


def decode(ids) -> str:
  """Symbols up to the first EOS (specials dropped)."""
  out = []
  for i in ids:
    i = int(i)
    if i == EOS_ID:
      break
    if i >= len(SPECIALS):
      out.append(VOCAB[i])
  return "".join(out)


_INDEX = {tok: i for i, tok in enumerate(VOCAB)}


def score(completion: str, answer: str) -> bool:
  """Correct iff the last boxed value equals the answer as an integer."""
  got = extract_boxed(completion)
  try:
    return got is not None and int(got) == int(answer)
  except ValueError:
    return False


def first_slip(prompt: str, completion: str) -> int | None:
  """Index of the first scratchpad line with a wrong result, or None if every line is right.

  Ground truth for trap analysis: a line `a op b = c;` is a slip if c != a op b. A line that
  continues from a wrong previous value but computes correctly is *not* a slip (it is the trap).
  """
  for k, line in enumerate(completion.split(";")):
    m = re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", line)
    if m is None:
      continue
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    if c != (a + b if op == "+" else a - b):
      return k
  return None


def save_tokenizer(out_dir: str | Path) -> Path:
  """Writes tokenizer.json (+ tokenizer_config.json) for the arithmetic vocabulary."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIALS))
  tok.save(str(out_dir / "tokenizer.json"))
  (out_dir / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
      "pad_token": PAD, "unk_token": PAD, "model_max_length": 256}, indent=2) + "\n")
  return out_dir
