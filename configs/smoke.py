"""Smoke test of a fresh install: random tiny model -> HF export -> reload -> cached greedy decode.

Run:      python -m kat_jax.main --config configs/smoke.py --workdir /tmp/kat_smoke
Variants: --config configs/smoke.py:llama   (or qwen2, qwen3; default qwen3)
Expected: ~10 s on 2 CPU cores; prints the decoded tokens, the cached-vs-full logit difference
          (~1e-6) and `smoke: OK`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "smoke"
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      family=arg or "qwen3",
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      tie_embeddings=True,
  ))
  c.batch_size = 4
  c.prompt_len = 8
  c.new_tokens = 16
  return c
