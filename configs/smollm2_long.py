"""Long rollouts on the real model: configs/smollm2_opd.py at 512 new tokens, where traps live.

SmolLM2-135M-Instruct teaches its 20-block pruned copy (setup: launch/smollm2_setup.sh) on one-digit
sums, asked for a detailed answer. With 512 new tokens the pruned student mostly answers in a few
dozen tokens and ends, but ~15% of its rollouts run to the limit -- repetition loops (~19% of
rollouts at T = 0.7 contain one) and word salad -- and those rows hold most of the generated tokens:
the setting in which a truncation policy decides what OPD trains on.

Run:      python -m kat_jax.main --config configs/smollm2_long.py --workdir /tmp/long
Policies: configs/smollm2_long.py:POLICY with POLICY one of vanilla, kat, spike, floor, esr, popd,
          topk, iw (the knobs below; kat_jax/kat.py defines each); the matched-budget sweep over
          them is configs/smollm2_long_compare.py.
Uncut study (~10 min): python -m kat_jax.studies.policies --config configs/smollm2_long.py \
          --prompts 64 --samples 4 --out /tmp/long_uncut
Expected: 40 OPD steps of 8 rollouts on 2 CPU cores: vanilla ~67 s per step once its rollouts
          loop to 512 tokens (~55 min with both evaluations), KAT ~52 s (~45 min); the held-out
          loop rate goes 0.13 -> ~0.95 under both (docs/results.md, the long-rollout section).

KAT settings for 512-token rollouts (the paper's are for thousands of tokens and not public):
windows of 16 tokens, 4 low windows in a row (64 tokens of persistent agreement), nothing stopped
before token 64.
"""

import importlib.util
from pathlib import Path

POLICIES = {
    "vanilla": {"mode": "none"},
    "kat": {"mode": "kat"},
    "spike": {"mode": "kat", "spike_gate": True},
    "floor": {"mode": "kat", "cut": "onset_floor"},
    "esr": {"mode": "fixed", "fixed_len": 100},  # ESR's N = 100
    # POPD: the horizon grows 64 -> 512 in four stages over the 40 steps.
    "popd": {"mode": "horizon", "horizon_start": 64, "horizon_step": 149, "horizon_every": 10},
    "topk": {"mode": "topk", "topk_k": 16, "topk_threshold": 0.7, "topk_drop": 0.01,
             "topk_base": 0.0},
    "iw": {"mode": "iw", "iw_gamma": 0.5},
}


def _base():
  spec = importlib.util.spec_from_file_location(
      "smollm2_opd", Path(__file__).with_name("smollm2_opd.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def get_config(arg: str | None = None):
  c = _base()
  c.data.instruction = ("Explain your reasoning in detail, one step per line, then give the "
                        "final answer.")
  c.max_new_tokens = 512
  c.steps = 40
  c.optim.total_steps = c.steps
  c.kat.window = 16
  c.kat.patience = 4
  c.kat.min_len = 64
  c.loss.chunk = 64
  c.checkpoint_every = 10
  c.eval_size = 32
  c.eval.batch_size = 32
  if arg not in (None, ""):
    if arg not in POLICIES:
      raise ValueError(f"configs/smollm2_long.py:{arg}: use one of {sorted(POLICIES)}.")
    c.kat.update(POLICIES[arg])
  return c
