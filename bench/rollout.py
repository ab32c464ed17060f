"""Benchmark: the fused student+teacher rollout vs generate-then-score, and what KAT saves.

Run:  python bench/rollout.py                  (both size pairs, ~8 min on 2 CPU cores)
      python bench/rollout.py --pairs small    (the ~1M / ~20M pair only, ~1 min)
      python bench/rollout.py --long           (long rollouts, small pair, ~15 min; below)
      python bench/rollout.py --tpu v5e:4x4    (HBM bytes per window from the TPU compiler and
                                                the predicted step of configs/qwen3_opd.py, ~6 min)

For each pair (batch 32, 32-token prompts, 128 new tokens, temperature 1, fp32), all in one process:
  fused   kat_jax.rollout.rollout, KAT off: per-token log-probs and full-vocab KL included;
  (a)     the same JAX models, generate-then-score: a Python loop of jitted single student steps
          (cache donated), then one jitted teacher forward over the finished sequences + the KL;
  (b)     transformers PyTorch: `generate` (keeping the logits), then a teacher forward + the KL.
and then KAT on the fused rollout at thresholds that stop some rows: the fraction of generated
tokens saved next to the fraction of wall-clock saved (rows that stop must stop costing compute).
Compilation and warm-up are excluded (every variant runs once before it is timed); times are the
median of --repeats runs. Prints a markdown table with the ratios and the machine it ran on.

--long (the paper's regime; small pair, B=32, W=32, no EOS so every row runs to the end):
  lengths  tokens/s at 128, 512, 1024 and 2048 new tokens with filled-length buckets
           (rollout.length_bucket=128) and with attention over the whole cache (=0, the loop
           before buckets); per-token cost relative to 128 tokens;
  refill   KAT at 1024 new tokens, tau at quantiles of the batch's own window means, 32 rollouts
           through 32 slots (compaction only) and through 8 slots (slot refill): tokens saved
           next to wall-clock saved against the same layout's uncut rollout.
--tpu TOPOLOGY (no TPU needed: libtpu compiles for it on this CPU, kat_jax.aot):
  bytes    HBM bytes per decode window of configs/qwen3_opd.py at a 4096-token buffer with 512
           tokens filled, bucketed vs the whole cache;
  step     the roofline step time with and without refill at given trap rates (rollout lengths
           modelled: untrapped rows run to the end, trapped rows stop uniformly in
           [min_len, max_new_tokens)); window costs are linear in the filled length and the
           rows, fitted to compiled windows at two fills and two row counts.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# ------------------------------------------------------------------------- long rollouts


def bench_lengths(student, teacher, prompt, start, key, vocab, args):
  """Tokens/s per generation length, filled-length buckets on and off (same process)."""
  b = prompt.shape[0]
  out = []
  for n in args.lengths:
    row = dict(new=n)
    for name, bucket in (("on", 128), ("off", 0)):
      cfg = rollout.RolloutConfig(max_new_tokens=n, eos_ids=(vocab - 1,), pad_id=0,
                                  vocab_size=vocab - 1, length_bucket=bucket,
                                  kat=kat.KATConfig(mode="none", window=args.window))

      def run(cfg=cfg):
        jax.block_until_ready(rollout.rollout(student, teacher, prompt, start, key, cfg))

      row[name] = _timed(run, args.long_repeats)
      print(f"{n} new tokens, buckets {name}: {row[name]:.2f} s "
            f"({b * n / row[name]:,.0f} tok/s)", flush=True)
    out.append(row)
  base = {k: out[0][k] / out[0]["new"] for k in ("on", "off")}
  print(f"\n| new tokens | tok/s, buckets | per-token cost vs {out[0]['new']} | tok/s, whole "
        "cache | per-token cost vs 128 | buckets speed-up |")
  print("|---|---|---|---|---|---|")
  for r in out:
    n = r["new"]
    print(f"| {n} | {b * n / r['on']:,.0f} | {r['on'] / n / base['on']:.2f}x | "
          f"{b * n / r['off']:,.0f} | {r['off'] / n / base['off']:.2f}x | "
          f"{r['off'] / r['on']:.2f}x |")
  return out


def bench_refill(student, teacher, prompt, start, key, vocab, args):
  """KAT's token saving as wall-clock saving, with and without slot refill."""
  b, n = prompt.shape[0], args.refill_new_tokens
  base = dict(max_new_tokens=n, eos_ids=(vocab - 1,), pad_id=0, vocab_size=vocab - 1)
  kat_kw = dict(window=args.window, patience=args.patience, min_len=args.min_len)

  def timed(cfg, tau=0.0):
    sched = rollout.Schedule()
    run = lambda: jax.block_until_ready(rollout.rollout(  # noqa: E731
        student, teacher, prompt, start, key, cfg, tau=tau))
    t = _timed(run, args.long_repeats)
    res = jax.device_get(rollout.rollout(student, teacher, prompt, start, key, cfg, tau=tau,
                                         schedule=sched))
    return t, res, sched

  rows = []
  taus = None
  for slots in (0, b // 4):
    layout = f"{b} slots (compaction)" if not slots else f"{slots} slots (refill)"
    t_none, uncut, _ = timed(rollout.RolloutConfig(**base, slots=slots,
                                                   kat=kat.KATConfig(mode="none", **kat_kw)))
    if taus is None:
      means = np.asarray(uncut.window_mean_BxN)[np.asarray(uncut.window_complete_BxN)]
      taus = [(q, float(np.quantile(means, q))) for q in args.refill_quantiles]
    for q, tau in taus:
      t_kat, res, sched = timed(rollout.RolloutConfig(**base, slots=slots,
                                                      kat=kat.KATConfig(mode="kat", **kat_kw)),
                                tau)
      tok = 1 - float(np.sum(res.length_B)) / float(np.sum(uncut.length_B))
      wall = 1 - t_kat / t_none
      rows.append(dict(layout=layout, q=q, trap=float(np.mean(res.terminated_B)), tok=tok,
                       wall=wall, t_none=t_none, t_kat=t_kat, exits=sched.exits,
                       windows=max(sched.end)))
      print(f"KAT {n} new tokens, {layout}, tau=q{q:.2f}: trap rate {rows[-1]['trap']:.2f}, "
            f"tokens saved {tok:.1%}, wall-clock saved {wall:.1%} ({t_none:.2f} -> {t_kat:.2f} "
            f"s), {sched.exits} loop calls, {max(sched.end)} windows", flush=True)
  print(f"\n| {n} new tokens, {b} rollouts | KAT tau (quantile) | trap rate | tokens saved | "
        "wall-clock saved | wall / tokens | windows run |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['layout']} | q{r['q']:.2f} | {r['trap']:.2f} | {r['tok']:.1%} | {r['wall']:.1%} "
          f"({r['t_none']:.2f} -> {r['t_kat']:.2f} s) | {r['wall'] / r['tok']:.2f} | "
          f"{r['windows']} |")
  return rows


def bench_long(args):
  spec = PAIRS["small"]
  vocab = spec["vocab"]
  student, _ = _model(vocab, 0, **spec["student"])
  teacher, _ = _model(vocab, 1, **spec["teacher"])
  b, p = args.batch, args.prompt_len
  prompt = jax.random.randint(jax.random.key(0), (b, p), 0, vocab - 1, jnp.int32)
  start = jnp.zeros((b,), jnp.int32)
  key = jax.random.key(1)
  print(f"\n== long rollouts, small pair, B={b}, prompt {p}, W={args.window}", flush=True)
  if args.lengths:
    bench_lengths(student, teacher, prompt, start, key, vocab, args)
  if args.refill_new_tokens:
    bench_refill(student, teacher, prompt, start, key, vocab, args)


def figure(args):
  """docs/slots.png: where each rollout ran, one slot per rollout (compaction) vs a quarter of
  the slots (refill), KAT stopping rows of the small pair (real rollouts, this process)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  spec = PAIRS["small"]
  vocab = spec["vocab"]
  student, _ = _model(vocab, 0, **spec["student"])
  teacher, _ = _model(vocab, 1, **spec["teacher"])
  b, p, n = 16, args.prompt_len, args.figure_new_tokens
  prompt = jax.random.randint(jax.random.key(0), (b, p), 0, vocab - 1, jnp.int32)
  start = jnp.zeros((b,), jnp.int32)
  kat_kw = dict(window=args.window, patience=args.patience, min_len=args.min_len)
  base = dict(max_new_tokens=n, eos_ids=(vocab - 1,), pad_id=0, vocab_size=vocab - 1)
  uncut = rollout.rollout(student, teacher, prompt, start, jax.random.key(1), rollout.RolloutConfig(
      **base, kat=kat.KATConfig(mode="none", **kat_kw)))
  means = np.asarray(uncut.window_mean_BxN)[np.asarray(uncut.window_complete_BxN)]
  tau = float(np.quantile(means, 0.5))
  fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
  cmap = plt.get_cmap("tab20")
  for ax, slots in zip(axes, (0, b // 4)):
    sched = rollout.Schedule()
    res = rollout.rollout(student, teacher, prompt, start, jax.random.key(1),
                          rollout.RolloutConfig(**base, slots=slots,
                                                kat=kat.KATConfig(mode="kat", **kat_kw)),
                          tau=tau, schedule=sched)
    cut = np.asarray(res.terminated_B)
    for sl, r, b0, b1 in zip(sched.slot, sched.row, sched.begin, sched.end):
      ax.barh(sl, b1 - b0, left=b0, color=cmap(r % 20), edgecolor="black", height=0.8)
      ax.text(b0 + 0.2, sl, f"{r}" + ("✂" if cut[r] else ""), va="center", fontsize=7)
    total = max(sched.end)
    busy = sum(e - b0 for b0, e in zip(sched.begin, sched.end)) / ((slots or b) * total)
    ax.set_title(f"{b} rollouts through {slots or b} slots"
                 + (" (slot refill)" if slots else " (one per rollout; compaction)")
                 + f": {total} windows, slots busy {busy:.0%} of the time", fontsize=10)
    ax.set_ylabel("slot")
    ax.set_yticks(range(0, slots or b, 1 if slots else 2))
    ax.invert_yaxis()
  axes[-1].set_xlabel(f"decode loop windows ({args.window} tokens each); ✂ = stopped by KAT")
  fig.tight_layout()
  fig.savefig(args.figure, dpi=110)
  print(f"wrote {args.figure}")


def simulated_windows(lengths_N, slots: int, window: int, group: int) -> list[tuple[int, int]]:
  """The decode loop's schedule for rollouts of `lengths_N` tokens (host model of
  rollout.rollout): [(rows run, oldest live row's tokens after it)] per window. slots = len(lengths_N):
  no refill (compaction to multiples of `group`); fewer: finished slots take the next rollout
  once `group` of them are free."""
  todo = [int(-(-x // window)) for x in lengths_N]  # windows each rollout needs
  queue = list(range(slots, len(todo)))
  running = {i: 0 for i in range(slots)}  # rollout -> windows done
  out = []
  while running:
    # Compaction runs the live rows in the smallest multiple of `group` that holds them.
    rows = slots if queue else min(slots, -(-len(running) // group) * group)
    out.append((rows, window * (max(running.values()) + 1)))
    for r in running:
      running[r] += 1
    for r in [r for r, d in running.items() if d >= todo[r]]:
      del running[r]
    free = slots - len(running)
    while queue and free >= min(group, len(queue)):
      for _ in range(min(group, len(queue))):
        running[queue.pop(0)] = 0
      free = slots - len(running)
  return out


def bench_tpu(args):
  from kat_jax import aot, roofline as roofline_lib
  from kat_jax.configfile import load_config
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "qwen3_opd.py"))
  config.max_new_tokens = args.tpu_new_tokens
  batch = config.prompts_per_step * config.samples_per_prompt
  slots = args.tpu_slots or batch // 4
  fill = args.tpu_filled
  t0 = time.perf_counter()
  import json
  saved = Path(args.tpu_costs) if args.tpu_costs else None
  if saved and saved.exists():  # the compiled costs of an earlier run (same arguments)
    costs = {(b, f): roofline_lib.Cost(**c) for b, f, c in json.loads(saved.read_text())}
  else:
    costs = aot.window_costs(config, args.tpu, fills=(fill, None), batches=(batch, slots))
    if saved:
      saved.write_text(json.dumps([(b, f, dataclasses.asdict(c)) for (b, f), c in costs.items()]))
  print(f"\n== {args.tpu}: configs/qwen3_opd.py, {batch} rollouts, max_new_tokens "
        f"{config.max_new_tokens}, windows compiled in {time.perf_counter() - t0:.0f} s",
        flush=True)
  t = -(-config.max_new_tokens // config.kat.window) * config.kat.window
  g = 2**30
  print("| rows | filled | HBM GiB per window per device | TFLOP per window per device |")
  print("|---|---|---|---|")
  for (b, f), c in costs.items():
    print(f"| {b} | {f or t} | {c.hbm_bytes / g:.3f} | {c.flops / 1e12:.3f} |")
  ratio = costs[(batch, fill)].hbm_bytes / costs[(batch, None)].hbm_bytes
  print(f"HBM bytes per window at {fill} of {t} tokens filled, buckets vs whole cache: "
        f"{ratio:.2f}x")

  # Linear model per window: cost(rows, filled) = fixed + rows * (a + c * filled), from the four
  # compiled windows (bytes and flops separately).
  def fit(attr):
    get = lambda b, f: getattr(costs[(b, f)], attr)  # noqa: E731
    per_row = {b: (get(b, None) - get(b, fill)) / (t - fill) for b in (batch, slots)}
    slope = (per_row[batch] - per_row[slots]) / (batch - slots)  # per row per filled token
    at_fill = {b: get(b, fill) for b in (batch, slots)}
    row_cost = (at_fill[batch] - at_fill[slots]) / (batch - slots)  # per row, at `fill`
    fixed = at_fill[batch] - batch * row_cost
    return lambda rows, filled: fixed + rows * (row_cost + slope * (filled - fill))

  flops, hbm = fit("flops"), fit("hbm_bytes")
  coll = costs[(batch, None)].collective_bytes
  chip = roofline_lib.CHIPS[args.tpu.split(":")[0]]

  def seconds(schedule):
    return sum(max(flops(r, f) / chip.flops, hbm(r, f) / chip.hbm_bw) + coll / chip.ici_link_bw
               for r, f in schedule)

  rng = np.random.default_rng(0)
  group = max(slots // 8, 1)
  print(f"\npredicted rollout seconds on {args.tpu} ({chip.name} peaks), {batch} rollouts of up "
        f"to {config.max_new_tokens} tokens, buckets on:")
  print(f"| trap rate | tokens generated | {batch} slots | {batch // slots} x {slots} slots "
        f"(compaction) | {slots} slots (refill) | refill vs {batch // slots} x {slots} | refill vs "
        f"{batch} slots |")
  print("|---|---|---|---|---|---|---|")
  for rate in args.trap_rates:
    trapped = rng.random(batch) < rate
    lengths = np.where(trapped, rng.integers(config.kat.min_len, t, batch), t)
    buckets = rollout.length_buckets(t, 128, config.kat.window)
    def bucketed(sched):
      return [(r, min(x for x in buckets if x >= f)) for r, f in sched]
    full = seconds(bucketed(simulated_windows(lengths, batch, config.kat.window,
                                              max(batch // 8, 1))))
    # Today's way to fit fewer rows: the rollout in batch / slots sequential calls.
    serial = sum(seconds(bucketed(simulated_windows(lengths[i:i + slots], slots,
                                                    config.kat.window, group)))
                 for i in range(0, batch, slots))
    refill = seconds(bucketed(simulated_windows(lengths, slots, config.kat.window, group)))
    print(f"| {rate:.2f} | {lengths.sum() / (batch * t):.0%} | {full:.1f} s | {serial:.1f} s | "
          f"{refill:.1f} s | {serial / refill:.2f}x | {full / refill:.2f}x |")


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
  ap.add_argument("--long", action="store_true", help="the long-rollout measurements only")
  ap.add_argument("--lengths", type=int, nargs="*", default=[128, 512, 1024, 2048])
  ap.add_argument("--long-repeats", type=int, default=1)
  ap.add_argument("--refill-new-tokens", type=int, default=1024)
  ap.add_argument("--refill-quantiles", type=float, nargs="+", default=[0.3, 0.5])
  ap.add_argument("--tpu", default="", help="a TPU topology, e.g. v5e:4x4: the compiled part")
  ap.add_argument("--tpu-new-tokens", type=int, default=4096)
  ap.add_argument("--tpu-filled", type=int, default=512)
  ap.add_argument("--tpu-slots", type=int, default=0, help="default: a quarter of the batch")
  ap.add_argument("--tpu-costs", default="", help="JSON file caching the compiled window costs")
  ap.add_argument("--trap-rates", type=float, nargs="+", default=[0.0, 0.2, 0.32, 0.6])
  ap.add_argument("--figure", default="", help="write the schedule picture (docs/slots.png)")
  ap.add_argument("--figure-new-tokens", type=int, default=512)
  args = ap.parse_args()
  print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU "
        f"cores; JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} "
        f"device(s): {jax.devices()[0].device_kind}")
  if args.figure:
    figure(args)
    return
  if args.tpu:
    bench_tpu(args)
    return
  if args.long:
    bench_long(args)
    return
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
