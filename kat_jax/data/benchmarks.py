"""Evaluation benchmarks: presets for the usual math sets, local JSONL, tfds, Hugging Face datasets.

A benchmark spec (config `eval.benchmarks`, comma-separated) is one of
  arith              the embedded task's held-out split (`eval_size` problems);
  NAME               a preset loaded from tfds (when its data is prepared) or Hugging Face
                     `datasets` (when installed and online);
  NAME=PATH.jsonl    a preset read from a local JSONL file with the preset's field names
                     (the way to evaluate offline: export the set once where you have internet);
  PATH.jsonl         any local JSONL with a problem field (problem / question / prompt) and
                     an answer field (answer).
Presets know each set's location, fields and answer format; no benchmark text ships with kat_jax.
Math prompts get the usual instruction to box the final answer and go through the student
tokenizer's chat template when it has one.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

from kat_jax.data import chat, sources

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Preset:
  hf_path: str
  split: str
  problem_field: str = "problem"
  answer_field: str = "answer"
  hf_config: str | None = None
  tfds_name: str | None = None
  answer_format: str = "latex"  # latex | integer (AIME: 0-999, may be written 025) | gsm8k
  size: int | None = None  # problems in the official set (a mismatch is reported, not fatal)


PRESETS = {
    "math500": Preset("HuggingFaceH4/MATH-500", "test", size=500),
    "aime24": Preset("HuggingFaceH4/aime_2024", "train", answer_format="integer", size=30),
    "aime25": Preset("math-ai/aime25", "test", answer_format="integer", size=30),
    "amc23": Preset("math-ai/amc23", "test", problem_field="question", size=40),
    "gsm8k": Preset("openai/gsm8k", "test", problem_field="question", hf_config="main",
                    tfds_name="gsm8k", answer_format="gsm8k", size=1319),
}


@dataclasses.dataclass
class Benchmark:
  name: str
  problems: list[str]
  golds: list[str]
  prompts: list[str]  # what the model sees (instruction, chat template applied)
  # How answers are read: 'boxed' (the last \\boxed{}) or 'last_number' (the last \\boxed{}, else
  # the last number in the completion: for models too small to box their answers).
  extract: str = "boxed"


def gold_answer(raw, answer_format: str) -> str:
  """The gold answer as a string the grader compares (GSM8K keeps it after '####')."""
  if isinstance(raw, bytes):
    raw = raw.decode()
  if answer_format == "gsm8k":
    raw = str(raw).rsplit("####", 1)[-1]
    return raw.strip().replace(",", "")
  if isinstance(raw, float) and raw.is_integer():
    return str(int(raw))
  return str(raw).strip()


def _read_jsonl(path: Path, problem_fields, answer_field: str) -> tuple[list[str], list]:
  if not path.is_file():
    raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist.")
  problems, answers = [], []
  for lineno, rec in sources.iter_jsonl(path, "an object with a problem and an answer"):
    field = next((p for p in problem_fields if p in rec), None)
    if field is None or answer_field not in rec:
      raise ValueError(f"{path}:{lineno}: needs a problem field ({' / '.join(problem_fields)})"
                       f" and an {answer_field!r} field; found {sorted(rec)}.")
    problems.append(str(rec[field]))
    answers.append(rec[answer_field])
  if not problems:
    raise ValueError(f"{path}: no problems in the file.")
  return problems, answers


def _from_tfds(preset: Preset, name: str):
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    return None
  try:
    source = tfds.data_source(preset.tfds_name, split=preset.split, download=False)
  except Exception:  # not prepared on this machine: try the next source
    return None
  records = [source[i] for i in range(len(source))]
  text = lambda x: x.decode() if isinstance(x, bytes) else str(x)  # noqa: E731
  return ([text(r[preset.problem_field]) for r in records],
          [text(r[preset.answer_field]) for r in records])


def _from_hf(preset: Preset, name: str):
  try:
    import datasets
  except ImportError:
    raise ValueError(
        f"benchmark {name!r}: Hugging Face `datasets` is not installed and no prepared tfds copy "
        f"was found; pip install datasets (online), or give a local copy as "
        f"'{name}=/path/to/{name}.jsonl' with fields {preset.problem_field!r} and "
        f"{preset.answer_field!r}.") from None
  try:
    ds = datasets.load_dataset(preset.hf_path, preset.hf_config, split=preset.split)
  except Exception as e:
    raise ValueError(
        f"benchmark {name!r}: could not load {preset.hf_path} ({type(e).__name__}); offline, give "
        f"a local copy as '{name}=/path/to/{name}.jsonl' with fields {preset.problem_field!r} and "
        f"{preset.answer_field!r}.") from None
  return [str(p) for p in ds[preset.problem_field]], list(ds[preset.answer_field])


def parse_specs(specs: str) -> list[tuple[str, str | None]]:
  """'math500, aime24=/x.jsonl, my.jsonl' -> [(name, path or None), ...]; validates names."""
  out = []
  for spec in (s.strip() for s in specs.split(",")):
    if not spec:
      continue
    if "=" in spec:
      name, path = (x.strip() for x in spec.split("=", 1))
      if name not in PRESETS:
        raise ValueError(f"unknown benchmark preset {name!r} in {spec!r}; presets: "
                         f"{', '.join(PRESETS)} (or give a bare path to a JSONL file).")
      out.append((name, path))
    elif spec == "arith" or spec in PRESETS:
      out.append((spec, None))
    elif spec.endswith(".jsonl"):
      out.append((Path(spec).stem, spec))
    else:
      raise ValueError(f"unknown benchmark {spec!r}; use 'arith', a preset ("
                       f"{', '.join(PRESETS)}), 'NAME=/path.jsonl' or a path ending in .jsonl.")
  if not out:
    raise ValueError("no benchmark given; e.g. 'arith' or 'math500=/data/math500.jsonl'.")
  return out


def format_prompts(problems: list[str], chat_template: str | None, special: dict[str, str],
                   instruction: str | None = INSTRUCTION) -> list[str]:
  texts = [f"{p}\n\n{instruction}" if instruction else p for p in problems]
  if chat_template is None:
    return texts
  return [chat.render(chat_template, [{"role": "user", "content": t}], **special) for t in texts]


def load(spec: tuple[str, str | None], *, limit: int = 0, model_dir: str | Path | None = None,
         use_chat_template: bool = True, arith_seed: int = 0, arith_ops: int = 3) -> Benchmark:
  """One benchmark (see the module docstring); `limit` > 0 keeps the first `limit` problems."""
  name, path = spec
  if name == "arith" and path is None:
    arith_data = types.SimpleNamespace(source="arith", seed=arith_seed, n_ops=arith_ops,
                                       extract="boxed")
    return heldout(arith_data, limit)
  preset = PRESETS.get(name)
  if path is not None:
    fields = (preset.problem_field,) if preset else ("problem", "question", "prompt")
    problems, answers = _read_jsonl(Path(path), fields, preset.answer_field if preset else "answer")
  else:
    loaded = _from_tfds(preset, name) if preset.tfds_name else None
    problems, answers = loaded or _from_hf(preset, name)
  golds = [gold_answer(a, preset.answer_format if preset else "latex") for a in answers]
  if limit:
    problems, golds = problems[:limit], golds[:limit]
  template, special = (chat.load_template(model_dir) if model_dir is not None and use_chat_template
                       else (None, {}))
  return Benchmark(name, problems, golds, format_prompts(problems, template, special))


def heldout(data_cfg, limit: int, model_dir=None) -> Benchmark:
  """The training data's held-out prompts, formatted exactly as in training: the arithmetic
  task's eval split, the JSONL at data.eval_path (else data.path's held-out records, which
  training never sees: sources.heldout_split), a TFDS dataset's data.eval_split, or
  reasoning-gym's held-out seed (instruction and chat template as in training)."""
  source = sources.from_config(data_cfg, "eval", model_dir)
  if data_cfg.source == "reasoning_gym":
    pairs = source.batch(0, limit or 256)
    return Benchmark("gym", [p for p, _ in pairs], [a for _, a in pairs], [p for p, _ in pairs],
                     extract=data_cfg.extract)
  if data_cfg.source == "arith":
    pairs, name = source.batch(0, limit or 256), "arith"
  elif data_cfg.source == "tfds":  # the eval split, in its own order
    n = len(source.records)
    pairs, name = [source.record(k) for k in range(min(limit or n, n))], "heldout"
  else:  # in file order (the training source permutes per epoch)
    pairs, name = [(r["prompt"], r["answer"]) for r in source.records], "heldout"
    pairs = pairs[:limit or len(pairs)]
  problems, golds = map(list, zip(*pairs))
  # As in training: the bare prompt, no instruction, no chat template.
  return Benchmark(name, problems, golds, list(problems), extract=data_cfg.extract)
