"""Prompts from `reasoning-gym` generators: procedurally generated problems with known answers,
offline, in unlimited supply (`pip install reasoning-gym==0.1.25`).

`data.tasks` names the generators and their settings, separated by ';':

    chain_sum(min_terms=2, max_terms=3, max_digits=2); basic_arithmetic(max_terms=2)

Example i of the source is task i % n_tasks, item (i // n_tasks) % data.size of that task's
generator -- a pure function of (seed, i) as every kat_jax source, so the data position in a
checkpoint is one integer. reasoning-gym seeds item j with `seed + j`, so neighbouring seeds would
share all but one item: kat_jax passes `data.seed * 10**7` (and + 10**9 for the held-out split), so
different seeds and the two splits draw disjoint item seeds as long as data.size <= 10**7 (tiny
problem spaces, e.g. one-digit sums, may still repeat a question). data.size bounds each
generator: some (gsm_symbolic, list_functions, ...) build all their items up front.

Answers are the generator's `answer` strings; they are graded with `kat_jax.grading` (a number, a
fraction, a LaTeX expression), with `data.extract='last_number'` for models too small to write
`\\boxed{}` (SmolLM2-135M mostly does not).
"""

from __future__ import annotations

import ast

from kat_jax.data import chat

SEED_STRIDE = 10**7
EVAL_SEED_OFFSET = 10**9
MAX_SIZE = SEED_STRIDE


def parse_tasks(spec: str) -> list[tuple[str, dict]]:
  """'a(k=1, j="x"); b' -> [('a', {'k': 1, 'j': 'x'}), ('b', {})]; errors name the bad part."""
  tasks = []
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    try:
      node = ast.parse(part, mode="eval").body
    except SyntaxError:
      raise ValueError(f"cannot parse {part!r}; write name or name(key=value, ...), tasks "
                       "separated by ';'.") from None
    if isinstance(node, ast.Name):
      tasks.append((node.id, {}))
      continue
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
      raise ValueError(f"cannot parse {part!r}; write name or name(key=value, ...).")
    try:
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:
      raise ValueError(f"{part!r}: settings must be literals (numbers, strings, tuples).") from None
    tasks.append((node.func.id, kwargs))
  if not tasks:
    raise ValueError("no task given; e.g. 'chain_sum(min_terms=2, max_terms=3)'.")
  return tasks


def make_datasets(spec: str, seed: int, size: int) -> list:
  """The reasoning-gym datasets of `spec` (`size` items each, item seeds seed, seed + 1, ...);
  unknown names or settings raise ValueError."""
  if not 1 <= size <= MAX_SIZE:
    raise ValueError(f"data.size={size} must be between 1 and {MAX_SIZE}.")
  try:
    import reasoning_gym
  except ImportError:
    raise ValueError("data.source='reasoning_gym' needs reasoning-gym: pip install "
                     "reasoning-gym==0.1.25 (or pip install -e '.[gym]').") from None
  out = []
  for name, kwargs in parse_tasks(spec):
    try:
      out.append(reasoning_gym.create_dataset(name, seed=seed, size=size, **kwargs))
    except (TypeError, ValueError, AssertionError) as e:
      raise ValueError(f"task {name}{kwargs or ''}: {e}") from None
  return out


class GymSource:
  """(prompt, answer) pairs; prompts are question + instruction, through the chat template."""

  def __init__(self, tasks: str, seed: int = 0, split: str = "train", instruction: str = "",
               chat_template: str | None = None, special: dict | None = None,
               size: int = 10_000):
    self.seed = seed * SEED_STRIDE + (EVAL_SEED_OFFSET if split == "eval" else 0)
    self.size = size
    self.datasets = make_datasets(tasks, self.seed, size)
    self.instruction = instruction
    self.template, self.special = chat_template, special or {}

  def format(self, question: str) -> str:
    text = f"{question.strip()}\n\n{self.instruction}" if self.instruction else question
    if self.template is None:
      return text
    return chat.render(self.template, [{"role": "user", "content": text}], **self.special)

  def entry(self, i: int) -> dict:
    n = len(self.datasets)
    return self.datasets[i % n][(i // n) % self.size]

  def example(self, i: int) -> tuple[str, str]:
    e = self.entry(i)
    return self.format(e["question"]), str(e["answer"])

  def batch(self, start: int, n: int) -> list[tuple[str, str]]:
    return [self.example(i) for i in range(start, start + n)]
