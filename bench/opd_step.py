"""Benchmark: seconds per OPD training step (rollout + loss + update), kat_jax vs TRL's GKDTrainer.

Run:  pip install "trl==1.16.0" "transformers==5.24.0" "torch==2.13.0"   (bench-only deps)
      python bench/opd_step.py          (~1.5 min on 2 CPU cores; --no-trl: ~1 min)

Same tiny Qwen3 pair for both (random init, exported once and loaded by both frameworks):
student hidden 128 / 4 layers / 4 heads / 2 kv heads / head_dim 32 / MLP 512 (1.05M params),
teacher hidden 512 / 6 layers / 8 heads / 4 kv heads / head_dim 64 / MLP 1536 (19.1M), vocab 512,
tied embeddings; batch 32, 32-token prompts, 128 new tokens (every row runs to 128: EOS is never
sampled), sampling at temperature 1, fp32.
  kat_jax   fused rollout (KAT off, W=32) + one `opd.update` (default settings: update rows in
            cache-sized micro-batches on CPU, positions trimmed to the longest trained row), for
            the objectives `reverse_kl` (full-vocabulary reverse KL: the same loss as TRL with
            beta=1; needs a teacher forward in the update) and `sampled_pg` (the default; reuses
            the rollout's teacher log-probs); then `sampled_pg` with KAT on at a fixed tau that
            stops rows part-way, to show the step shrinking with the tokens KAT saves, without
            and with the adaptive threshold's probe rows (1/8 of the rows run uncut: their cost);
  TRL       `trl.experimental.gkd.GKDTrainer`, lmbda=1 (fully on-policy), beta=1 (reverse KL),
            fp32, gradient checkpointing off, timed per optimizer step by a callback.
The first steps (compilation, warm-up) are excluded; the median of the rest is reported.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kat_jax import hf, kat, opd, rollout, threshold  # noqa: E402
from rollout import PAIRS, _model  # noqa: E402  (bench/rollout.py: the same size pair)

B, P, N = 32, 32, 128


def bench_kat_jax(student, teacher, prompt, objective, steps, kat_cfg=None, tau=0.0, warmup=2,
                  probes=0):
  """Median seconds per step (rollout + trim + update) after `warmup` steps, the last loss, the
  last rollout."""
  vocab = student.cfg.vocab_size - 1  # EOS (the last id) is outside the sampled vocabulary
  kat_cfg = kat_cfg or kat.KATConfig(mode="none", window=32)
  cfg = rollout.RolloutConfig(max_new_tokens=N, eos_ids=(vocab,), pad_id=0, vocab_size=vocab,
                              kat=kat_cfg)
  tx = opd.make_optimizer(opd.OptimConfig(learning_rate=5e-5, clip_norm=1.0))
  loss_cfg = opd.LossConfig(objective=objective, vocab_size=vocab)  # microbatches: auto
  s_graph, s_params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  opt_state = tx.init(s_params)
  start = jnp.zeros((B,), jnp.int32)
  times = []
  for step in range(warmup + steps):
    t0 = time.perf_counter()
    probe_B = threshold.probe_mask(B, probes, 0, step)  # as training draws them
    res = rollout.rollout(student, teacher, prompt, start, jax.random.key(step), cfg, tau=tau,
                          probe_B=probe_B)
    s_params, opt_state, m = opd.update(s_graph, nnx.state(student), t_graph, t_params, opt_state,
                                        prompt, start, opd.trim(res, kat_cfg.window), tx=tx,
                                        cfg=loss_cfg)
    nnx.update(student, s_params)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return statistics.median(times[warmup:]), float(m["loss"]), res


def bench_trl(student_dir, teacher_dir, prompt, steps):
  import datasets
  import torch
  import transformers
  from tokenizers import Tokenizer, models
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  from trl.experimental.gkd import GKDConfig, GKDTrainer

  torch.set_num_threads(os.cpu_count() or 1)
  vocab = 512
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, "t0")),
      pad_token="t0", eos_token=f"t{vocab - 1}")
  student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
  teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
  prompts = np.asarray(prompt)
  data = datasets.Dataset.from_dict({"ids": [p.tolist() for p in prompts] * steps})

  def collate(rows):
    ids = torch.tensor([r["ids"] for r in rows], dtype=torch.long)
    ones = torch.ones_like(ids)
    # Trainer computes num_items_in_batch from these labels *before* GKD swaps in the generated
    # ones; all -100 would divide the loss by 0 (NaN params). Any non-empty labels do for timing.
    return dict(prompts=ids, prompt_attention_mask=ones, input_ids=ids, attention_mask=ones,
                labels=ids.clone())

  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)

  with tempfile.TemporaryDirectory() as out:
    args = GKDConfig(output_dir=out, per_device_train_batch_size=B, max_steps=steps, lmbda=1.0,
                     beta=1.0, temperature=1.0, max_new_tokens=N, learning_rate=5e-5,
                     bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to=[], save_strategy="no", logging_steps=10**6,
                     dataloader_num_workers=0, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                         train_dataset=data, processing_class=tok, callbacks=[Timer()])
    # Full-length completions, like the kat_jax side (random models would otherwise stop at
    # random EOS draws).
    trainer.generation_config.min_new_tokens = N
    trainer.generation_kwargs["min_new_tokens"] = N
    trainer.train()
  return statistics.median(times[2:])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  ap.add_argument("--kat-warmup", type=int, default=10)
  ap.add_argument("--no-trl", action="store_true")
  ap.add_argument("--kat-quantile", type=float, default=0.6,
                  help="KAT row: fixed tau at this quantile of the uncut window means")
  args = ap.parse_args()
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; JAX {jax.__version__} on "
        f"{jax.device_count()} {jax.default_backend()} device(s)", flush=True)
  spec = PAIRS["small"]
  student, s_cfg = _model(spec["vocab"], 0, **spec["student"])
  teacher, t_cfg = _model(spec["vocab"], 1, **spec["teacher"])
  prompt = jax.random.randint(jax.random.key(0), (B, P), 0, spec["vocab"] - 1, jnp.int32)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(student, s_cfg, Path(tmp) / "s")
    hf.save(teacher, t_cfg, Path(tmp) / "t")
    for objective in ("reverse_kl", "sampled_pg"):
      fresh, _ = hf.load(Path(tmp) / "s")
      sec, loss, uncut = bench_kat_jax(fresh, teacher, prompt, objective, args.steps)
      rows.append((f"kat_jax fused rollout + {objective}", sec))
      print(f"{rows[-1][0]}: {sec:.3f} s/step (loss {loss:.4f})", flush=True)
    # KAT on: a fixed tau at a quantile of the uncut rollout's window means stops rows part-way
    # (patience 2, no stop before 64 tokens); the step should shrink with the tokens it saves.
    means = np.asarray(uncut.window_mean_BxN)[np.asarray(uncut.window_complete_BxN)]
    kat_cfg = kat.KATConfig(mode="kat", window=32, patience=2, min_len=64)
    for probes in (0, B // 8):
      fresh, _ = hf.load(Path(tmp) / "s")
      # More warm-up: each new number of live rows compiles a compacted decode loop (~3 s) once.
      sec_kat, loss, res = bench_kat_jax(fresh, teacher, prompt, "sampled_pg", args.steps,
                                         kat_cfg, tau=float(np.quantile(means, args.kat_quantile)),
                                         warmup=args.kat_warmup, probes=probes)
      generated = float(np.sum(res.length_B)) / (B * N)
      trained = float(np.sum(res.trained_len_B)) / (B * N)
      rows.append((f"kat_jax fused rollout + sampled_pg, KAT on, {probes} probe rows "
                   f"({generated:.0%} of the tokens generated)", sec_kat))
      print(f"{rows[-1][0]}: {sec_kat:.3f} s/step (loss {loss:.4f}); trap rate "
            f"{float(np.mean(res.terminated_B)):.2f}, tokens generated {generated:.1%} and "
            f"trained {trained:.1%} of KAT off, step time {sec_kat / sec:.1%} of KAT off",
            flush=True)
    if not args.no_trl:
      sec = bench_trl(Path(tmp) / "s", Path(tmp) / "t", prompt, args.steps + 2)  # 2 warm-up
      rows.append(("TRL GKDTrainer (lambda=1, beta=1, fp32)", sec))
      print(f"{rows[-1][0]}: {sec:.3f} s/step", flush=True)
  base = rows[-1][1] if not args.no_trl else None
  print("\n| step (B=32, 32 + 128 tokens) | s / step | speed-up vs TRL |")
  print("|---|---|---|")
  for name, sec in rows:
    print(f"| {name} | {sec:.3f} | {base / sec:.2f}x |" if base else f"| {name} | {sec:.3f} | - |")


if __name__ == "__main__":
  main()
