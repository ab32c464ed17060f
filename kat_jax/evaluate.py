"""Math evaluation: n sampled completions per problem, graded; avg@k and unbiased pass@k with CIs.

  avg@k   mean correctness over the samples (with n >= k samples this is the unbiased estimate of
          the mean over k samples, i.e. pass@1);
  pass@k  Chen et al. 2021's unbiased estimator 1 - C(n - c, k) / C(n, k) per problem (c correct
          of n), computed as a product of ratios so that it never forms a huge binomial;
  95% intervals: percentile bootstrap over problems (problems resampled with replacement; the
          macro average resamples every benchmark with the same replicate index).

Sampling uses the student-only decode loop (`rollout.generate`: no teacher), at the evaluation's
own temperature / top-p / top-k. Grading is `kat_jax.grading.grade_many` (the benchmark's answer
extraction -- last `\\boxed{}` or last number --, a fast numeric path, math-verify in worker
processes); a completion without an answer is wrong and counted as no-answer; completions with a
repetition loop (kat_jax.loops) are counted too.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from kat_jax import loops, rollout
from kat_jax.errors import ConfigError
from kat_jax.grading import extract_answer, extract_boxed, grade, grade_many  # noqa: F401
from kat_jax.sharding import to_host


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  n: int = 4  # samples per problem
  k: int = 4  # the k of avg@k / pass@k
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 64
  batch_size: int = 256  # rows per generate call (the last call is padded to it: one compile)
  workers: int = 2  # math-verify processes (0: grade in this process)
  bootstrap: int = 1000  # bootstrap replicates for the intervals (0: no intervals)

  def __post_init__(self):
    if not 1 <= self.k <= self.n:
      raise ConfigError(f"eval.k={self.k} must be between 1 and eval.n={self.n} (pass@k needs "
                        "n >= k samples per problem).")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ConfigError(f"eval.temperature={self.temperature} must be >= 0, eval.top_k="
                        f"{self.top_k} >= 0 and eval.top_p={self.top_p} in (0, 1].")
    if self.batch_size < 1 or self.max_new_tokens < 1 or self.bootstrap < 0 or self.workers < 0:
      raise ConfigError("eval.batch_size and eval.max_new_tokens must be >= 1, eval.bootstrap and "
                        "eval.workers >= 0.")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
  if not (0 <= c <= n and 1 <= k <= n):
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
  if n - c < k:
    return 1.0  # every k-subset holds a correct sample
  # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i): no factorials, no overflow.
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def problem_scores(correct_PxN: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-problem (avg correctness, pass@k) from a [problems, samples] boolean matrix."""
  correct_PxN = np.asarray(correct_PxN, bool)
  n = correct_PxN.shape[1]
  c_P = correct_PxN.sum(axis=1)
  return c_P / n, np.array([pass_at_k(n, int(c), k) for c in c_P])


def bootstrap_means(values: list[np.ndarray], replicates: int, seed: int = 0) -> np.ndarray:
  """[replicates, len(values)] means of problem-resampled copies of each per-problem array."""
  rng = np.random.default_rng(seed)
  out = np.empty((replicates, len(values)))
  for r in range(replicates):
    for j, v in enumerate(values):
      out[r, j] = v[rng.integers(0, len(v), len(v))].mean()
  return out


def _interval(samples: np.ndarray) -> list[float]:
  lo, hi = np.percentile(samples, [2.5, 97.5])
  return [float(lo), float(hi)]


def summarize(results: dict[str, dict], k: int, replicates: int, seed: int = 0) -> dict:
  """Report from per-benchmark arrays: correct_PxN, answered_PxN, length_PxN (see `evaluate`)."""
  names = list(results)
  per = {}
  avg_vals, pass_vals = [], []
  for name in names:
    r = results[name]
    avg_P, pass_P = problem_scores(r["correct_PxN"], k)
    avg_vals.append(avg_P)
    pass_vals.append(pass_P)
    per[name] = {"problems": int(avg_P.size), "samples": int(np.size(r["correct_PxN"])),
                 f"avg@{k}": float(avg_P.mean()), f"pass@{k}": float(pass_P.mean()),
                 "no_answer_rate": float(1.0 - np.mean(r["answered_PxN"])),
                 "mean_length": float(np.mean(r["length_PxN"]))}
    if "loop_PxN" in r:  # completions with a repetition loop (kat_jax.loops)
      per[name]["loop_rate"] = float(np.mean(r["loop_PxN"]))
  macro = {f"avg@{k}": float(np.mean([per[n][f"avg@{k}"] for n in names])),
           f"pass@{k}": float(np.mean([per[n][f"pass@{k}"] for n in names]))}
  if replicates:
    boot = bootstrap_means(avg_vals + pass_vals, replicates, seed)
    b = len(names)
    for j, name in enumerate(names):
      per[name][f"avg@{k}_ci"] = _interval(boot[:, j])
      per[name][f"pass@{k}_ci"] = _interval(boot[:, b + j])
    macro[f"avg@{k}_ci"] = _interval(boot[:, :b].mean(axis=1))
    macro[f"pass@{k}_ci"] = _interval(boot[:, b:].mean(axis=1))
  return {"k": k, "benchmarks": per, "macro": macro}


def sample(model, prompts_ids: list[list[int]], n: int, key, cfg: EvalConfig, *, eos_ids,
           pad_id: int, vocab_size: int) -> tuple[np.ndarray, list[list[int]]]:
  """n completions per prompt: (lengths [P, n], token lists [P * n] in problem-major order)."""

  rows = [p for p in prompts_ids for _ in range(n)]
  sampling = rollout.SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p)
  prompt_len = rollout.bucket_length(max(len(r) for r in rows))
  lengths, outputs = [], []
  for c, lo in enumerate(range(0, len(rows), cfg.batch_size)):
    chunk = rows[lo:lo + cfg.batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (cfg.batch_size - real) if len(rows) > cfg.batch_size else chunk
    prompt, start = rollout.pad_prompts(chunk, pad_id, prompt_len)
    tokens, length = rollout.generate(model, prompt, start, jax.random.fold_in(key, c),
                                      max_new_tokens=cfg.max_new_tokens, eos_ids=tuple(eos_ids),
                                      pad_id=pad_id, vocab_size=vocab_size, sampling=sampling)
    tokens, length = to_host((tokens, length))  # gathered when the params span hosts
    tokens, length = np.asarray(tokens)[:real], np.asarray(length)[:real]
    lengths.extend(int(x) for x in length)
    outputs.extend([int(t) for t in row[:m] if int(t) not in eos_ids]
                   for row, m in zip(tokens, length))
  return np.asarray(lengths).reshape(len(prompts_ids), n), outputs


def evaluate(model, tokenizer, benchmarks, cfg: EvalConfig, key, *, eos_ids, pad_id: int,
             vocab_size: int, seed: int = 0) -> dict:
  """Samples, grades and summarises every benchmark (`kat_jax.data.benchmarks.Benchmark`s).

  `tokenizer` is a `tokenizers.Tokenizer`. Returns the report (see `summarize`) plus, per
  benchmark, nothing heavier than numbers -- completions are not kept.
  """

  results = {}
  for i, bench in enumerate(benchmarks):
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in bench.prompts]
    length_PxN, outputs = sample(model, ids, cfg.n, jax.random.fold_in(key, i), cfg,
                                 eos_ids=eos_ids, pad_id=pad_id, vocab_size=vocab_size)
    texts = tokenizer.decode_batch(outputs, skip_special_tokens=True)
    golds = [g for g in bench.golds for _ in range(cfg.n)]
    extract = bench.extract
    correct = grade_many(texts, golds, workers=cfg.workers, extract=extract)
    answered = [extract_answer(t, extract) is not None for t in texts]
    shape = (len(bench.prompts), cfg.n)
    looped = [loops.find_loop(o) >= 0 for o in outputs]
    results[bench.name] = dict(correct_PxN=np.reshape(correct, shape),
                               answered_PxN=np.reshape(answered, shape), length_PxN=length_PxN,
                               loop_PxN=np.reshape(looped, shape))
  report = summarize(results, cfg.k, cfg.bootstrap, seed)
  report.update(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens)
  return report


def flat_metrics(report: dict) -> dict[str, float]:
  """Scalars for JSONL / TensorBoard: macro and per-benchmark avg@k, pass@k, no-answer, length."""
  k = report["k"]
  out = {f"avg@{k}": report["macro"][f"avg@{k}"], f"pass@{k}": report["macro"][f"pass@{k}"]}
  for name, r in report["benchmarks"].items():
    for field in (f"avg@{k}", f"pass@{k}", "no_answer_rate", "mean_length", "loop_rate"):
      if field in r:
        out[f"{name}/{field}"] = r[field]
  return out


def format_table(report: dict) -> str:
  """A readable table of the report: one row per benchmark, then the macro average."""
  k = report["k"]

  def cell(r, field):
    ci = r.get(f"{field}_ci")
    return f"{r[field]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

  head = (f"{'benchmark':<14} {'problems':>8} {'n':>3}  {f'avg@{k} [95% CI]':<24} "
          f"{f'pass@{k} [95% CI]':<24} {'no-answer':>9} {'mean len':>8} {'loops':>6}")
  lines = [head, "-" * len(head)]
  for name, r in report["benchmarks"].items():
    lines.append(f"{name:<14} {r['problems']:>8} {report['n']:>3}  {cell(r, f'avg@{k}'):<24} "
                 f"{cell(r, f'pass@{k}'):<24} {r['no_answer_rate']:>9.3f} "
                 f"{r['mean_length']:>8.1f} {r.get('loop_rate', float('nan')):>6.3f}")
  if len(report["benchmarks"]) > 1:
    m = report["macro"]
    lines.append(f"{'macro':<14} {'':>8} {'':>3}  {cell(m, f'avg@{k}'):<24} "
                 f"{cell(m, f'pass@{k}'):<24}")
  return "\n".join(lines)
