"""Prompt sources with a one-integer position: example i is a pure function of (source, i).

That makes the data position in a checkpoint a single integer and resuming exact. Sources:
  * `ArithSource`: the embedded arithmetic task (kat_jax.data.arith);
  * `JsonlSource`: a local JSONL file, one `{"prompt": str, "answer": str}` object per line,
    visited in a fresh seeded permutation each epoch. Without a separate `data.eval_path`, the
    file's held-out part (`heldout_split`) is never trained on and is what evaluation reads;
  * `kat_jax.data.gym.GymSource`: reasoning-gym generators (data.source='reasoning_gym');
  * `TfdsSource`: a prepared TFDS dataset directory (array_record files, what TPU users keep
    their prompts in), read by random access through `tfds` data sources -- no TensorFlow, no
    input pipeline: example i is record order[i] of a seeded per-epoch permutation, as for JSONL.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from kat_jax.data import arith
from kat_jax.data import chat, gym


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_order(seed: int, i: int, n: int) -> int:
  """The record of position i in a stream over n records: each epoch a fresh seeded permutation
  (computed once per epoch, not per example)."""
  epoch, j = divmod(i, n)
  return int(_permutation(seed, epoch, n)[j])


class ArithSource:

  def __init__(self, seed: int = 0, n_ops: int = 3, split: str = "train"):
    self.seed, self.n_ops, self.split = seed, n_ops, split

  def example(self, i: int) -> tuple[str, str]:
    prompt, _, answer = arith.make_problem(self.seed, i, self.n_ops, self.split)
    return prompt, answer

  def batch(self, start: int, n: int) -> list[tuple[str, str]]:
    return [self.example(i) for i in range(start, start + n)]


class JsonlSource:

  def __init__(self, path: str | Path, seed: int = 0, part: str = "all", heldout_size: int = 0):
    """part: "all" records, or the "train" / "heldout" part of `heldout_split`."""
    self.path = Path(path)
    self.records = read_jsonl(self.path)
    if part != "all":
      train, heldout = heldout_split(len(self.records), heldout_size)
      if part == "heldout" and not len(heldout):  # config.validate reports it first
        raise ValueError(f"{self.path} has {len(self.records)} record(s): too few to hold any "
                         "out for evaluation; give data.eval_path or eval.benchmarks.")
      self.records = [self.records[i] for i in (train if part == "train" else heldout)]
    self.seed = seed

  def example(self, i: int) -> tuple[str, str]:
    rec = self.records[epoch_order(self.seed, i, len(self.records))]
    return rec["prompt"], rec["answer"]

  def batch(self, start: int, n: int) -> list[tuple[str, str]]:
    return [self.example(i) for i in range(start, start + n)]


class TfdsSource:

  def __init__(self, path: str | Path, split: str, seed: int = 0, prompt_field: str = "prompt",
               answer_field: str = "answer"):
    """path: a prepared dataset's directory (DATA_DIR/NAME/VERSION, holding dataset_info.json;
    or DATA_DIR/NAME, whose highest version is used)."""
    self.path, self.split, self.seed = tfds_version_dir(path), split, seed
    self.prompt_field, self.answer_field = prompt_field, answer_field
    tfds = _import_tfds()
    builder = tfds.builder_from_directory(str(self.path))
    splits = list(builder.info.splits)
    if split.split("[", 1)[0] not in splits:  # tfds slices ("train[:95%]") are fine
      raise ValueError(f"{self.path} has no split {split!r} (it has {splits}); set data.split / "
                       "data.eval_split.")
    fields = list(builder.info.features.keys())
    for name, field in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
      if field not in fields:
        raise ValueError(f"{self.path}: no feature {field!r} ({name}); its features are {fields}.")
    try:
      self.records = builder.as_data_source(split=split)
    except NotImplementedError:  # tfds' usual TFRecord files have no random access
      raise ValueError(f"{self.path} is not stored as array_record (random access); prepare it "
                       "with download_and_prepare(file_format='array_record') (or `tfds build "
                       "--file_format=array_record`).") from None
    if not len(self.records):
      raise ValueError(f"{self.path} split {split!r} holds no records.")

  def record(self, k: int) -> tuple[str, str]:
    """Record k of the split, in the dataset's own order."""
    rec = self.records[k]
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    return text(rec[self.prompt_field]), text(rec[self.answer_field])

  def example(self, i: int) -> tuple[str, str]:
    return self.record(epoch_order(self.seed, i, len(self.records)))

  def batch(self, start: int, n: int) -> list[tuple[str, str]]:
    return [self.example(i) for i in range(start, start + n)]


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError("data.source='tfds' needs tensorflow-datasets: pip install "
                      "'kat_jax[tfds]' (no TensorFlow needed for array_record data).") from None
  return tfds


def tfds_version_dir(path: str | Path) -> Path:
  """The directory holding dataset_info.json: `path` itself, or its highest version subdir."""
  if not str(path):
    raise FileNotFoundError("data.source='tfds' needs data.path: the directory of a prepared "
                            "TFDS dataset (DATA_DIR/NAME or DATA_DIR/NAME/VERSION).")
  path = Path(path)
  if (path / "dataset_info.json").is_file():
    return path
  versions = sorted((p for p in path.iterdir() if (p / "dataset_info.json").is_file()
                     and "incomplete" not in p.name),
                    key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")),
                    ) if path.is_dir() else []
  if not versions:
    raise FileNotFoundError(f"data.path={str(path)!r} is not a prepared TFDS dataset (no "
                            "dataset_info.json in it or in a version subdirectory); give "
                            "DATA_DIR/NAME/VERSION of a dataset built with download_and_prepare.")
  return versions[-1]


# Fixed, so every data.seed (and every run on the same file) holds out the same records.
_HELDOUT_SEED = 0x68656C64


def heldout_split(n: int, heldout_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(training, held-out) record indices in file order: min(heldout_size, n // 2) records held
  out, chosen pseudo-randomly (a file sorted by difficulty still gets a representative part)."""
  k = min(heldout_size, n // 2)
  perm = np.random.default_rng(_HELDOUT_SEED).permutation(n)
  return np.sort(perm[k:]), np.sort(perm[:k])


def from_config(data_cfg, split: str, model_dir=None, holdout: bool = True):
  """The training (split="train") or held-out ("eval") source of a config's `data` group: the
  arithmetic task's split (held-out problems use seed + 1), data.path and data.eval_path (without
  an eval_path, data.path minus / only its `data.heldout_size` held-out records), or the
  reasoning-gym tasks (formatted with `model_dir`'s chat template when data.chat_template).

  holdout=False: the run evaluates on named benchmarks (eval.benchmarks), so a JSONL data.path
  trains whole."""
  if data_cfg.source == "reasoning_gym":
    template, special = (chat.load_template(model_dir)
                         if data_cfg.chat_template and model_dir is not None else (None, {}))
    if data_cfg.chat_template and template is None:
      raise ValueError(f"data.chat_template=True but {model_dir} has no chat template; set "
                       "data.chat_template=False for a base model.")
    return gym.GymSource(data_cfg.tasks, seed=data_cfg.seed, split=split,
                         instruction=data_cfg.instruction, chat_template=template,
                         special=special, size=data_cfg.size)
  if data_cfg.source == "arith":
    return ArithSource(seed=data_cfg.seed + (split == "eval"), n_ops=data_cfg.n_ops, split=split)
  if data_cfg.source == "tfds":  # the held-out prompts are another split of the dataset
    return TfdsSource(data_cfg.path, data_cfg.split if split == "train" else data_cfg.eval_split,
                      seed=data_cfg.seed, prompt_field=data_cfg.prompt_field,
                      answer_field=data_cfg.answer_field)
  if data_cfg.eval_path:
    return JsonlSource(data_cfg.path if split == "train" else data_cfg.eval_path,
                       seed=data_cfg.seed)
  if not data_cfg.heldout_size or not holdout:  # the whole file trains
    if split == "train":
      return JsonlSource(data_cfg.path, seed=data_cfg.seed)
    raise ValueError("data.heldout_size=0 and no data.eval_path: no prompts are held out; set "
                     "data.eval_path, data.heldout_size > 0, or eval.benchmarks.")
  return JsonlSource(data_cfg.path, seed=data_cfg.seed,
                     part="train" if split == "train" else "heldout",
                     heldout_size=data_cfg.heldout_size)


def read_jsonl(path: Path) -> list[dict[str, str]]:
  """Reads prompt/answer records; a bad line is an error naming the file, line and field."""
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; give a JSONL file with "
                            'one {"prompt": ..., "answer": ...} object per line.')
  records = []
  for lineno, rec in iter_jsonl(path, "an object with 'prompt' and 'answer'"):
    for field in ("prompt", "answer"):
      if not isinstance(rec.get(field), (str, int, float)) or rec.get(field) == "":
        raise ValueError(f"{path}:{lineno}: field {field!r} is missing or empty; every line "
                         'needs {"prompt": "...", "answer": "..."}.')
    records.append({"prompt": str(rec["prompt"]), "answer": str(rec["answer"])})
  if not records:
    raise ValueError(f"{path} holds no records.")
  return records


def iter_jsonl(path: Path, expected: str):
  """(line number, object) for every non-blank line; bad JSON is an error naming file and line."""
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
      if not isinstance(rec, dict):
        raise ValueError(f"{path}:{lineno}: expected {expected}.")
      yield lineno, rec
