"""Tiny random arithmetic-vocabulary student/teacher HF directories and a fast train config."""

import json
import os
import subprocess
import sys
from pathlib import Path

from flax import nnx

from kat_jax import hf
from kat_jax.config import defaults
from kat_jax.data import arith
from kat_jax.models import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]


def make_models(root: Path) -> tuple[Path, Path]:
  tok = root / "tok"
  arith.save_tokenizer(tok)
  dirs = []
  for name, hidden, layers, seed in (("student", 32, 2, 0), ("teacher", 48, 2, 1)):
    cfg = ModelConfig(family="qwen3", vocab_size=len(arith.VOCAB), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_layers=layers, num_heads=4,
                      num_kv_heads=2, head_dim=8, qk_norm=True, tie_embeddings=False,
                      bos_token_id=arith.BOS_ID, eos_token_ids=(arith.EOS_ID,),
                      pad_token_id=arith.PAD_ID)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Peaky, model-specific distributions: real KL, varied lengths, some EOS.
    model.embed[...] = model.embed[...] * 40
    model.lm_head[...] = model.lm_head[...] * 10
    dirs.append(hf.save(model, cfg, root / name, tokenizer_dir=tok))
  return dirs[0], dirs[1]


def tiny_config(student: Path, teacher: Path, steps: int = 4):
  c = defaults()
  c.student, c.teacher = str(student), str(teacher)
  c.steps = steps
  c.prompts_per_step = 4
  c.samples_per_prompt = 2
  c.max_new_tokens = 16
  c.optim.learning_rate = 1e-3
  c.optim.total_steps = 4
  c.kat.window = 4
  c.kat.patience = 2
  c.kat.min_len = 4
  c.threshold.warmup_steps = 1
  c.checkpoint_every = 2
  c.eval_size = 8
  c.compact_multiple = -1
  return c


def run_main(args, cwd=ROOT):
  """`python -m kat_jax.main ARGS` in a fresh process with one CPU device (a 1-device and an
  8-device mesh differ in the last bits of cross-device sums) and the suite's compile flags."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS=os.environ["KAT_JAX_TEST_XLA_FLAGS"])
  return subprocess.run([sys.executable, "-m", "kat_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def step_metrics(workdir):
  """{step: its metrics.jsonl record} of the training steps a run logged."""
  lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in lines if "loss" in r}
