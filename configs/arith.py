"""The main job: OPD with KAT on the embedded arithmetic task, on a fresh machine, no downloads.

Run:      python -m kat_jax.main --config configs/arith.py --workdir /tmp/kat
Variants: configs/arith.py:vanilla (KAT off), :plain (the paper's rule without the spike gate),
          :fixed (truncate every rollout at 24 tokens), :lora (rank-8 LoRA adapters on every
          projection of the frozen student, lr 3e-4: avg@4 0.402 -> 0.503 against full
          fine-tuning's 0.506; README "LoRA students")
Expected: ~2-3.5 min on 2 CPU cores (107 s on one host, 180-197 s on slower ones); ends with a
          table of held-out avg@4 / pass@4 before and after (0.402 -> 0.485 / 0.676 -> 0.742 on
          the 2026-12-02 host, bit for bit the same before and after that day's refactor; another
          host gave 0.502 / 0.754 -- XLA:CPU's floats differ between CPUs and 400 steps of
          sampling amplify it), mean rollout length (35.4), trap rate (0.013) and tokens saved,
          and writes WORKDIR/report.html (the trap dashboard). The 7-variant x 3-seed
          comparison: configs/arith_compare.py.

Teacher (1.24M params, >= 97% greedy) and student (0.33M, ~45% at temperature 1) ship in
kat_jax/assets; configs/arith_sft.py made them. KAT settings for this task (its completions are
~36 tokens, so the LLM-scale W=32 / K=4 / min_len=256 would never fire): windows of 4 tokens,
patience 2, no minimum length beyond the first two windows.
"""

from kat_jax.config import defaults


def get_config(arg: str | None = None):
  c = defaults()
  c.steps = 400
  c.prompts_per_step = 16
  c.samples_per_prompt = 4
  c.max_new_tokens = 48
  c.max_prompt_len = 16  # `25+91-20+22=`: 12 tokens (the memory plan and the prompt padding)
  c.optim.learning_rate = 1e-4
  c.optim.total_steps = c.steps
  c.optim.warmup_steps = 5
  c.kat.window = 4
  c.kat.patience = 2
  c.kat.min_len = 8
  c.kat.spike_gate = True
  c.kat.spike_tau = 2.0
  c.threshold.warmup_steps = 3
  c.checkpoint_every = 100
  c.eval_size = 256
  if arg == "vanilla":
    c.kat.mode = "none"
  elif arg == "plain":
    c.kat.spike_gate = False
  elif arg == "fixed":
    c.kat.mode = "fixed"
    c.kat.fixed_len = 24
  elif arg == "lora":
    # Adapters want a larger learning rate than full fine-tuning (B starts at 0, the alpha / rank
    # scale is fixed). Held-out avg@4 after 400 steps: 3e-4 0.503, 1e-3 0.489, 3e-3 0.419
    # (full fine-tuning at 1e-4: 0.506; README "LoRA students").
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.optim.learning_rate = 3e-4
  elif arg not in (None, ""):
    raise ValueError(f"configs/arith.py:{arg}: use :vanilla, :plain, :fixed or :lora.")
  return c
