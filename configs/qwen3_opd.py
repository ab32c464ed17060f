"""Paper-scale OPD with KAT: Qwen3-1.7B student, Qwen3-8B teacher, DeepMath / DAPO-style prompts.

Data: a JSONL of {"prompt": ..., "answer": ...} (e.g. DeepMath-103K or DAPO-Math-17k exported once
where there is internet); the benchmarks as local JSONL copies (see kat_jax/data/benchmarks.py).
Models: local Hugging Face directories (config.json + safetensors + tokenizer).

Memory plan, no weights needed (prints the per-device plan of every mesh that fits):
  python -m kat_jax.memory --config configs/qwen3_opd.py --devices 16 --device-memory-gb 16  # v5e-16
  python -m kat_jax.memory --config configs/qwen3_opd.py --devices 16 --device-memory-gb 32  # v4-32
  python -m kat_jax.memory --config configs/qwen3_opd.py --devices 8 --device-memory-gb 80   # 8xH100
Run on every worker of a TPU slice (see README "TPU pods"):
  bash launch/tpu.sh run NAME ZONE -- --config configs/qwen3_opd.py --workdir /mnt/kat \
      --config.student=/mnt/models/Qwen3-1.7B --config.teacher=/mnt/models/Qwen3-8B \
      --config.data.path=/mnt/data/deepmath.jsonl
TPU compile check and roofline, on any CPU host with libtpu (README "TPU"; ~10 min):
  python -m kat_jax.aot --config configs/qwen3_opd.py --topology v5e:4x4 --roofline
Variant :lora -- a Qwen3-8B LoRA student of Qwen3-32B (below; README "LoRA students").
Expected (that roofline, every row generating all 4096 tokens, so an upper bound): ~53 s per step
on 16 v5e chips, ~38 s on 16 v4, ~17 s on 16 v5p, ~26 s on 16 v6e; per-device peak 89% of a
v5e's HBM (the rollout prefill, with the fp32 master weights of optim.master='auto'; 84% without). Checkpoints every 50 steps; rerunning resumes.
"""

from kat_jax.config import defaults

BENCHMARKS = ("math500=/mnt/data/math500.jsonl,aime24=/mnt/data/aime24.jsonl,"
              "aime25=/mnt/data/aime25.jsonl,amc23=/mnt/data/amc23.jsonl")


def get_config(arg=None):
  c = defaults()
  c.student = "/mnt/models/Qwen3-1.7B"
  c.teacher = "/mnt/models/Qwen3-8B"
  c.dtype = "bfloat16"
  c.data.source = "jsonl"
  c.data.path = "/mnt/data/deepmath.jsonl"
  c.steps = 500
  c.prompts_per_step = 32
  c.samples_per_prompt = 4  # 128 rollouts per step
  c.max_new_tokens = 4096
  c.max_prompt_len = 512
  c.sampling.temperature = 1.0
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.optim.schedule = "cosine"
  c.optim.total_steps = c.steps
  # KAT at LLM scale: windows of 32 tokens, 4 low windows in a row, nothing cut before 256 tokens,
  # adaptive tau (EMA of the 20th percentile of window means), the paper's rule (no spike gate).
  c.kat.window = 32
  c.kat.patience = 4
  c.kat.min_len = 256
  c.threshold.warmup_steps = 5
  # Memory: the update's rows one at a time per device (128 rows / 16 devices / 8 micro-batches),
  # attention over 512 queries and the LM head + loss over 256 positions at a time, each block
  # rematerialised in the backward pass, the blocks as one scan. From the TPU compiler (python -m
  # kat_jax.aot, README "TPU"), the update's peak on v5e:4x4 with the 8B teacher resident beside
  # it: 15.70 of 15.75 GiB unrolled without remat, 12.13 with remat, 6.50 (41%) scanned with remat
  # (FSDP then gathers one layer's weights at a time; compile 225 -> 72 s); 7.84 (50%) with the
  # fp32 master weights the bf16 student keeps by default (lr 1e-6 steps are below bf16's ulp).
  c.remat = True
  c.scan_layers = True
  c.attn_chunk = 512  # query chunks in the update's forward: no [H, S, S] scores
  c.loss.microbatches = 8
  c.loss.chunk = 256
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP: the 8B teacher does not fit one chip
  # Long rollouts (README "Long rollouts"): length buckets on (attention reads the filled 128,
  # 256, ... 4096 slots: 0.49x the HBM bytes of a window at 512 of 4096 tokens, per XLA:TPU);
  # one decode slot per rollout, since the 128 rows' caches fit (89% of v5e HBM at the peak) and
  # a window costs nearly the same for 32 rows as for 128 (predicted rollout 22 s vs 60-66 s
  # with 32 slots). Out of HBM (a larger batch, longer rollouts, fewer chips): e.g.
  # --config.rollout.slots=32 (caches 4x smaller), which refills slots as KAT stops rows.
  c.rollout.length_bucket = 128
  c.rollout.slots = 0
  c.distributed = True
  c.checkpoint_every = 50
  c.eval_every = 50
  c.eval_size = 0  # every problem of each benchmark
  c.eval.benchmarks = BENCHMARKS
  c.eval.n, c.eval.k = 16, 16
  c.eval.temperature, c.eval.top_p = 0.6, 0.95
  c.eval.max_new_tokens = 4096
  c.eval.batch_size = 128
  if arg == "lora":
    # An 8B student distilled from Qwen3-32B, training rank-32 adapters on every projection
    # (87M float32 params) instead of 8.2B params with fp32 master weights and moments. Memory
    # plan on 16 chips of 32 GiB (v4-32; `python -m kat_jax.memory --config
    # configs/qwen3_opd.py:lora --devices 16 --device-memory-gb 32 --mesh 1,16,1`): peak 15.0
    # GiB per chip, against 24.5 GiB for full fine-tuning of the same pair (--config.lora.rank=0;
    # master weights 1.9, AdamW 3.8 and gradients 1.9 GiB become 0.4 + 0.2). XLA:TPU for
    # v4:2x2x4 (`python -m kat_jax.aot --config configs/qwen3_opd.py:lora --topology v4:2x2x4`,
    # ~40 min on 2 CPU cores, 14 GB of host memory): peaks 15.5 (prefill), 16.3 (decode loop),
    # 16.4 (update) and 21.2 GiB (eval generation, B=128) of 30.75 per chip. Adapters take a
    # larger learning rate than full fine-tuning (10x here; the embedded task's best was 3x).
    c.student = "/mnt/models/Qwen3-8B"
    c.teacher = "/mnt/models/Qwen3-32B"
    c.lora.rank, c.lora.alpha = 32, 32.0
    c.optim.learning_rate = 1e-5
    # The 32B teacher's KV caches for 128 rows of 4608 slots are 9.7 GiB per chip: 32 decode
    # slots (refilled as rows finish) keep the rollout in a v5e's HBM.
    c.rollout.slots = 32
  elif arg not in (None, ""):
    raise ValueError(f"configs/qwen3_opd.py:{arg}: the only variant is :lora; override "
                     "anything else with --config.KEY=VALUE.")
  return c
