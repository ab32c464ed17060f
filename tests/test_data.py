"""The embedded arithmetic task, its tokenizer and the prompt sources."""

import json

import pytest

from kat_jax.data import arith, sources
from kat_jax.evaluate import extract_boxed


def test_problem_is_correct_and_deterministic():
  prompt, completion, answer = arith.make_problem(0, 5)
  assert (prompt, completion, answer) == arith.make_problem(0, 5)
  assert prompt != arith.make_problem(0, 6)[0]
  nums = [int(x) for x in prompt[:-1].replace("-", "+-").split("+")]
  assert str(sum(nums)) == answer and arith.score(completion, answer)
  assert arith.first_slip(prompt, completion) is None
  assert completion.count(";") == 3 and completion.endswith(f"\\boxed{{{answer}}}")


def test_train_and_eval_splits_are_disjoint():
  train = {arith.make_problem(1, i)[0] for i in range(2000)}
  held = {arith.make_problem(1, i, split="eval")[0] for i in range(300)}
  assert not train & held
  assert all(arith.problem_split(p) == "eval" for p in held)


def test_slip_then_consistent_continuation():
  # One slip (25+91=115), then lines that correctly continue from the wrong value: the trap.
  completion = "25+91=115;115-20=95;95+22=117;\\boxed{117}"
  assert arith.first_slip("25+91-20+22=", completion) == 0
  assert not arith.score(completion, "118")
  assert arith.first_slip("", "25+91=116;116-20=95;95+22=117;\\boxed{117}") == 1


def test_tokenizer_roundtrip_with_tokenizers_and_transformers(tmp_path):
  from tokenizers import Tokenizer
  import transformers

  arith.save_tokenizer(tmp_path)
  text = "25+91=116;116-20=96;96+22=118;\\boxed{118}"
  ids = arith.encode(text)
  assert len(ids) == len(text) - len("\\boxed{") + 1
  tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert tok.encode(text).ids == ids
  assert arith.decode(ids + [arith.EOS_ID, 5, 6]) == text
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
  assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (arith.EOS_ID, arith.PAD_ID)
  assert hf_tok.decode(ids) == text
  with pytest.raises(ValueError, match="not in the arithmetic vocabulary"):
    arith.encode("2*3")


def test_extract_boxed():
  assert extract_boxed("x \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert extract_boxed("no box") is None
  assert extract_boxed("\\boxed{12") is None


def test_jsonl_source_and_errors(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(5)))
  src = sources.JsonlSource(path, seed=3)
  epoch0 = src.batch(0, 5)
  assert sorted(epoch0) == [(f"q{i}", str(i)) for i in range(5)]
  assert src.batch(5, 5) != epoch0 and sorted(src.batch(5, 5)) == sorted(epoch0)
  assert src.example(7) == sources.JsonlSource(path, seed=3).example(7)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer' is missing"):
    sources.JsonlSource(bad)
  bad.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    sources.JsonlSource(bad)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.JsonlSource(tmp_path / "missing.jsonl")


def test_arith_source_positions():
  """Example i is a pure function of (seed, i): a batch is the examples at its positions (a
  fresh source -- a resumed run -- gives the same ones), and every answer is its prompt's value."""
  src = sources.ArithSource(seed=2)
  batch = src.batch(3, 4)
  assert batch[1:] == sources.ArithSource(seed=2).batch(4, 3)
  assert len({p for p, _ in batch}) == 4 and batch != sources.ArithSource(seed=3).batch(3, 4)
  for prompt, answer in batch:
    assert prompt.endswith("=")
    assert int(answer) == sum(int(x) for x in prompt[:-1].replace("-", "+-").split("+"))


def test_jsonl_heldout_split_is_fixed_disjoint_and_bounded():
  train, held = sources.heldout_split(100, 10)
  assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)
  assert sorted(set(train) | set(held)) == list(range(100))
  np_train, np_held = sources.heldout_split(100, 10)
  assert list(held) == list(np_held)  # fixed: independent of any seed
  assert sorted(held) != list(range(90, 100))  # not the file's tail: a pseudo-random part
  assert len(sources.heldout_split(6, 10)[1]) == 3  # at most half the file
