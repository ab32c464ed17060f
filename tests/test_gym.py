"""reasoning-gym prompt source, answer extraction for small models, and their config checks."""

import types

import pytest

from kat_jax import grading
from kat_jax.data import benchmarks, gym, sources

reasoning_gym = pytest.importorskip("reasoning_gym")

TASKS = ("chain_sum(min_terms=2, max_terms=2, min_digits=1, max_digits=1); "
         "basic_arithmetic(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=('+',))")


def test_parse_tasks():
  assert gym.parse_tasks(" a ; b(k=1, s='x', t=('+', '-')) ;") == [
      ("a", {}), ("b", {"k": 1, "s": "x", "t": ("+", "-")})]
  for bad, msg in (("a(", "cannot parse"), ("a(1)", "cannot parse"), ("a(k=x)", "literals"),
                   ("", "no task given")):
    with pytest.raises(ValueError, match=msg):
      gym.parse_tasks(bad)


def test_source_interleaves_tasks_and_matches_the_generators():
  src = gym.GymSource(TASKS, seed=5)
  base = 5 * 10**7  # data.seed 5 -> item seeds 5e7 + j: neighbouring seeds never share items
  chain = reasoning_gym.create_dataset("chain_sum", seed=base, size=10, min_terms=2, max_terms=2,
                                       min_digits=1, max_digits=1)
  arith = reasoning_gym.create_dataset("basic_arithmetic", seed=base, size=10, min_terms=2,
                                       max_terms=2, min_digits=1, max_digits=1, operators=("+",))
  for i in range(6):
    ref = (chain if i % 2 == 0 else arith)[i // 2]
    assert src.example(i) == (ref["question"], ref["answer"])
  # A pure function of (seed, i): a fresh source (a resumed run) gives the same prompts.
  assert gym.GymSource(TASKS, seed=5).batch(3, 4) == src.batch(3, 4)


def test_splits_and_seeds_draw_disjoint_items():
  big = "chain_sum(min_terms=3, max_terms=3, min_digits=4, max_digits=4)"  # collisions ~impossible
  questions = {}
  for seed in (0, 1):
    for split in ("train", "eval"):
      src = gym.GymSource(big, seed=seed, split=split, size=50)
      questions[seed, split] = {src.example(i)[0] for i in range(50)}
      assert src.example(50) == src.example(0)  # the source cycles through `size` items
  keys = list(questions)
  for a in range(len(keys)):
    for b in range(a + 1, len(keys)):
      assert not questions[keys[a]] & questions[keys[b]], (keys[a], keys[b])
  # Seed 0's training items are reasoning-gym's own seeds 0, 1, 2, ...
  ref = reasoning_gym.create_dataset("chain_sum", seed=0, size=3, min_terms=3, max_terms=3,
                                     min_digits=4, max_digits=4)
  assert gym.GymSource(big, seed=0).example(2)[0] == ref[2]["question"]
  with pytest.raises(ValueError, match="data.size=0"):
    gym.GymSource(big, size=0)


def test_prompts_use_instruction_and_chat_template(tmp_path):
  template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(
      '{"chat_template": %s, "eos_token": "</s>"}' % __import__("json").dumps(template))
  data = types.SimpleNamespace(source="reasoning_gym", tasks=TASKS, seed=0, instruction="Think.",
                               chat_template=True, extract="last_number", size=100)
  prompt, answer = sources.from_config(data, "train", tmp_path).example(0)
  question = reasoning_gym.create_dataset(
      "chain_sum", seed=0, size=1, min_terms=2, max_terms=2, min_digits=1, max_digits=1)[0]
  assert prompt == f"<|user|>{question['question']}\n\nThink.</s><|assistant|>"
  assert answer == question["answer"]
  bench = benchmarks.heldout(data, 5, tmp_path)
  assert bench.extract == "last_number" and len(bench.prompts) == 5
  # Held-out items come from reasoning-gym seeds 1e9 + j (data.seed 0), formatted as in training.
  held = reasoning_gym.create_dataset("chain_sum", seed=10**9, size=1, min_terms=2, max_terms=2,
                                      min_digits=1, max_digits=1)[0]
  assert bench.prompts[0] == f"<|user|>{held['question']}\n\nThink.</s><|assistant|>"
  assert bench.golds[0] == held["answer"]
  with pytest.raises(ValueError, match="no chat template"):
    sources.from_config(data, "train", tmp_path / "nowhere")


@pytest.mark.parametrize("text,boxed,last", [
    ("So 3 + 4 = 7.", None, "7"),
    ("The total is -14", None, "-14"),
    ("It costs 1,000 dollars, not 20", None, "20"),
    ("half is 2.5", None, "2.5"),
    ("ratio 3/4", None, "3/4"),
    ("\\boxed{12} and then 13", "12", "12"),  # a box always wins
    ("no digits here", None, None),
    ("costs 20, or 1,000", None, "1,000"),
    ("pick 3,4", None, "4"),  # not a thousands group
    ("value .5", None, ".5"),
    ("temp \u22123", None, "-3"),  # Unicode minus
    ("pages 3-5", None, "5"),  # a range, not -5
    ("Put it in \\boxed{}. It is 9", "", "9"),  # an echoed empty box is no answer
])
def test_extract_answer(text, boxed, last):
  assert grading.extract_answer(text) == boxed
  assert grading.extract_answer(text, "last_number") == last


def test_last_number_grading_agrees_with_the_generators_scorer():
  ds = reasoning_gym.create_dataset("chain_sum", seed=3, size=20, min_terms=2, max_terms=3,
                                    min_digits=1, max_digits=2)
  completions, golds, scores = [], [], []
  for j, e in enumerate(ds):
    answer = e["answer"] if j % 3 else str(int(e["answer"]) + 1)  # every third one wrong
    completions.append(f"Let me compute. {e['question']} The result is {answer}.")
    golds.append(e["answer"])
    scores.append(ds.score_answer(answer, e) == 1.0)
  assert grading.grade_many(completions, golds, workers=0, extract="last_number") == scores
  assert not any(grading.grade_many(completions, golds, workers=0))  # no box: no answer
