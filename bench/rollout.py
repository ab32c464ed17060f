"""Benchmark: the fused student+teacher rollout vs generate-then-score, and what KAT saves.

Run:  python bench/rollout.py                  (both size pairs, ~8 min on 2 CPU cores)
      python bench/rollout.py --pairs small    (the ~1M / ~20M pair only, ~1 min)

For each pair (batch 32, 32-token prompts, 128 new tokens, temperature 1, fp32), all in one process:
  fused   kat_jax.rollout.rollout, KAT off: per-token log-probs and full-vocab KL included;
  (a)     the same JAX models, generate-then-score: a Python loop of jitted single student steps
          (cache donated), then one jitted teacher forward over the finished sequences + the KL;
  (b)     transformers PyTorch: `generate` (keeping the logits), then a teacher forward + the KL.
and then KAT on the fused rollout at thresholds that stop some rows: the fraction of generated
tokens saved next to the fraction of wall-clock saved (rows that stop must stop costing compute).
Compilation and warm-up are excluded (every variant runs once before it is timed); times are the
median of --repeats runs. Prints a markdown table with the ratios and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kat_jax import hf, kat, rollout  # noqa: E402
from kat_jax.models import ModelConfig, Transformer  # noqa: E402

PAIRS = {
    # The OPD-step pair of the training benchmark: ~1.05M student, ~19.1M teacher, vocab 512.
    "small": dict(
        vocab=512,
        student=dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                     intermediate_size=512),
        teacher=dict(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                     intermediate_size=1536)),
    # ~19M student (the small pair's teacher) and a ~110M teacher with a larger vocabulary.
    "large": dict(
        vocab=4096,
        student=dict(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                     intermediate_size=1536),
        teacher=dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8, head_dim=64,
                     intermediate_size=3072)),
}


def _model(vocab, seed, **dims):
  cfg = ModelConfig(family="qwen3", vocab_size=vocab, qk_norm=True, tie_embeddings=True,
                    eos_token_ids=(vocab - 1,), **dims)
  return Transformer(cfg, rngs=nnx.Rngs(seed)), cfg


def _timed(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ------------------------------------------------------------------ (a) generate, then score


def make_generate_then_score(student, teacher, b, p, n, vocab):
  s_graph, s_params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)

  @jax.jit
  def prefill(s_params, prompt, key):
    model = nnx.merge(s_graph, s_params)
    cache = model.init_cache(b, p + n)
    logits, cache = model.decode(prompt, cache)
    return logits[:, -1, :vocab], cache

  def step(s_params, logits_BxV, cache, key):
    model = nnx.merge(s_graph, s_params)
    tok = jax.random.categorical(key, logits_BxV).astype(jnp.int32)
    logits, cache = model.decode(tok[:, None], cache)
    return tok, logits[:, 0, :vocab], cache

  step = jax.jit(step, donate_argnums=(2,))

  @jax.jit
  def score(t_params, prompt, tokens_BxN, s_logits_BxNxV):
    model = nnx.merge(t_graph, t_params)
    seq = jnp.concatenate([prompt, tokens_BxN], axis=1)
    t_logits = model(seq)[:, p - 1:-1, :vocab]
    s_lp = jax.nn.log_softmax(s_logits_BxNxV, -1)
    t_lp = jax.nn.log_softmax(t_logits, -1)
    pick = lambda lp: jnp.take_along_axis(lp, tokens_BxN[..., None], -1)[..., 0]  # noqa: E731
    kl = jnp.sum(jnp.exp(s_lp) * (s_lp - t_lp), -1)
    return pick(s_lp), pick(t_lp), kl

  def run(prompt, key):
    logits, cache = prefill(s_params, prompt, key)
    toks, all_logits = [], []
    for i in range(n):
      all_logits.append(logits)
      tok, logits, cache = step(s_params, logits, cache, jax.random.fold_in(key, i))
      toks.append(tok)
    out = score(t_params, prompt, jnp.stack(toks, 1), jnp.stack(all_logits, 1))
    jax.block_until_ready(out)
    return out

  return run


# --------------------------------------------------------------------- (b) transformers


def make_torch(student_dir, teacher_dir, prompt, n):
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  s = transformers.AutoModelForCausalLM.from_pretrained(student_dir).eval()
  t = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
  ids = torch.tensor(np.asarray(prompt), dtype=torch.long)

  def run():
    with torch.no_grad():
      out = s.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                       temperature=1.0, max_new_tokens=n, min_new_tokens=n,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
      s_lp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
      t_lp = torch.log_softmax(t(out.sequences).logits[:, ids.shape[1] - 1:-1].float(), -1)
      kl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    return kl

  return run


# ------------------------------------------------------------------------------------ KAT


def bench_kat(student, teacher, prompt, start, key, vocab, new_tokens, args):
  """Fraction of generated tokens KAT saves vs fraction of wall-clock, compaction on and off.

  Thresholds sit at quantiles of this batch's own window means, so rows stop at varied times
  (random models have no real traps; only where rows stop matters for cost).
  """
  base = dict(max_new_tokens=new_tokens, eos_ids=(vocab - 1,), pad_id=0, vocab_size=vocab - 1)

  def fused(cfg, tau=0.0):
    res = rollout.rollout(student, teacher, prompt, start, key, cfg, tau=tau)
    jax.block_until_ready(res)
    return res

  out = []
  for compact in (0, -1):
    kat_cfg = dict(window=args.window, patience=args.patience, min_len=args.min_len)
    cfg_none = rollout.RolloutConfig(**base, compact_multiple=compact,
                                     kat=kat.KATConfig(mode="none", **kat_cfg))
    t_none = _timed(lambda: fused(cfg_none), args.repeats)
    uncut = fused(cfg_none)
    means = np.asarray(uncut.window_mean_BxN)[np.asarray(uncut.window_complete_BxN)]
    for q in args.kat_quantiles:
      tau = float(np.quantile(means, q))
      cfg_kat = rollout.RolloutConfig(**base, compact_multiple=compact,
                                      kat=kat.KATConfig(mode="kat", **kat_cfg))
      t_kat = _timed(lambda: fused(cfg_kat, tau), args.repeats)
      res = fused(cfg_kat, tau)
      saved_tok = 1 - float(np.sum(res.length_B)) / float(np.sum(uncut.length_B))
      saved_wall = 1 - t_kat / t_none
      row = dict(new=new_tokens, compact="on (B/8)" if compact == 0 else "off", q=q,
                 trap=float(np.mean(res.terminated_B)), tok=saved_tok, wall=saved_wall,
                 ratio=saved_wall / saved_tok if saved_tok else float("nan"), t_none=t_none,
                 t_kat=t_kat)
      out.append(row)
      print(f"KAT {new_tokens} new tokens, compaction {row['compact']}, tau=q{q:.2f}: trap rate "
            f"{row['trap']:.2f}, tokens saved {saved_tok:.1%}, wall-clock saved {saved_wall:.1%} "
            f"({t_none:.2f} -> {t_kat:.2f} s) -> ratio {row['ratio']:.2f}", flush=True)
  return out


# ------------------------------------------------------------------------------------ main


def bench_pair(name, spec, args, rows):
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  vocab = spec["vocab"]
  student, s_cfg = _model(vocab, 0, **spec["student"])
  teacher, t_cfg = _model(vocab, 1, **spec["teacher"])
  print(f"\n== {name}: student {s_cfg.num_params() / 1e6:.2f}M, teacher "
        f"{t_cfg.num_params() / 1e6:.2f}M params, vocab {vocab}, B={b}, prompt {p}, new {n}",
        flush=True)
  prompt = jax.random.randint(jax.random.key(0), (b, p), 0, vocab - 1, jnp.int32)
  start = jnp.zeros((b,), jnp.int32)
  # The shared vocabulary excludes the EOS id, so every row runs the full 128 tokens in every
  # variant (torch: min_new_tokens) and the comparison is token for token.
  base = dict(max_new_tokens=n, eos_ids=(vocab - 1,), pad_id=0, vocab_size=vocab - 1)
  cfg_none = rollout.RolloutConfig(**base, kat=kat.KATConfig(mode="none", window=args.window))
  key = jax.random.key(1)

  def fused(cfg, tau=0.0):
    res = rollout.rollout(student, teacher, prompt, start, key, cfg, tau=tau)
    jax.block_until_ready(res)
    return res

  t_fused = _timed(lambda: fused(cfg_none), args.repeats)
  gts = make_generate_then_score(student, teacher, b, p, n, vocab - 1)
  t_gts = _timed(lambda: gts(prompt, key), args.repeats)
  tokens = b * n
  result = dict(pair=name, fused=t_fused, gts=t_gts)
  if not args.no_torch:
    with tempfile.TemporaryDirectory() as tmp:
      hf.save(student, s_cfg, Path(tmp) / "s")
      hf.save(teacher, t_cfg, Path(tmp) / "t")
      t_torch = _timed(make_torch(Path(tmp) / "s", Path(tmp) / "t", prompt, n), args.repeats)
    result["torch"] = t_torch
  print(f"fused {t_fused:.3f} s ({tokens / t_fused:,.0f} tok/s) | generate-then-score (JAX) "
        f"{t_gts:.3f} s ({tokens / t_gts:,.0f} tok/s)"
        + (f" | transformers {result['torch']:.3f} s ({tokens / result['torch']:,.0f} tok/s)"
           if "torch" in result else ""), flush=True)

  result["kat"] = []
  for new_tokens in args.kat_new_tokens if name == "small" else []:
    result["kat"] += bench_kat(student, teacher, prompt, start, key, vocab, new_tokens, args)
  rows.append(result)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pairs", default="small,large")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--window", type=int, default=32)
  ap.add_argument("--patience", type=int, default=2)
  ap.add_argument("--min-len", type=int, default=64)
  ap.add_argument("--kat-quantiles", type=float, nargs="+", default=[0.3, 0.6])
  ap.add_argument("--kat-new-tokens", type=int, nargs="+", default=[128, 512],
                  help="generation lengths for the KAT measurement (small pair)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU "
        f"cores; JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} "
        f"device(s): {jax.devices()[0].device_kind}")
  rows = []
  for name in args.pairs.split(","):
    bench_pair(name, PAIRS[name], args, rows)

  print("\n| pair | fused s | (a) JAX gen-then-score s | fused vs (a) | (b) transformers s | "
        "fused vs (b) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    torch_cols = (f"{r['torch']:.3f} | {r['torch'] / r['fused']:.2f}x" if "torch" in r
                  else "- | -")
    print(f"| {r['pair']} | {r['fused']:.3f} | {r['gts']:.3f} | {r['gts'] / r['fused']:.2f}x | "
          f"{torch_cols} |")
  print("\n| pair | new tokens | compaction | KAT tau (quantile) | trap rate | tokens saved | "
        "wall-clock saved | wall / tokens |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    for k in r["kat"]:
      print(f"| {r['pair']} | {k['new']} | {k['compact']} | q{k['q']:.2f} | {k['trap']:.2f} | "
            f"{k['tok']:.1%} | {k['wall']:.1%} ({k['t_none']:.2f} -> {k['t_kat']:.2f} s) | "
            f"{k['ratio']:.2f} |")


if __name__ == "__main__":
  main()
