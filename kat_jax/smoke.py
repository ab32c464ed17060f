"""`mode=smoke`: exercises the install end to end without any download.

Builds a random model, exports it as a Hugging Face directory, loads it back through the same
`kat_jax.hf.load` path used for real checkpoints, greedy-decodes with the KV cache, and checks the
cached logits against a full-sequence forward over the decoded tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from kat_jax import hf
from kat_jax.models import ModelConfig, Transformer


def run(config, workdir: str) -> float:
  m = config.model
  cfg = ModelConfig(family=m.family, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                    intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                    num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                    tie_embeddings=m.tie_embeddings, qkv_bias=m.family == "qwen2",
                    qk_norm=m.family == "qwen3", eos_token_ids=(1,), bos_token_id=0)
  t0 = time.perf_counter()
  export = Path(workdir) / "smoke_model"
  hf.save(Transformer(cfg, rngs=nnx.Rngs(config.seed)), cfg, export, overwrite=True)
  model, cfg = hf.load(export)
  logging.info("exported and reloaded a %s model (%d params) at %s", cfg.family,
               cfg.num_params(), export)

  b, p, n = config.batch_size, config.prompt_len, config.new_tokens
  rng = np.random.RandomState(config.seed)
  prompt = rng.randint(2, cfg.vocab_size, (b, p)).astype(np.int32)
  pads = np.arange(b) % p  # row i has i left pads
  prompt[np.arange(p)[None, :] < pads[:, None]] = 0

  @nnx.jit
  def greedy(model, prompt_BxP, start_B):
    cache = model.init_cache(b, p + n, start_B)
    logits, cache = model.decode(prompt_BxP, cache)
    tok_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
      tok_B, cache = carry
      logits, cache = model.decode(tok_B[:, None], cache)
      return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), (tok_B, logits[:, 0])

    _, (toks_NxB, logits_NxBxV) = jax.lax.scan(step, (tok_B, cache), None, length=n)
    return toks_NxB.T, logits_NxBxV.transpose(1, 0, 2)

  tokens_BxN, cached_BxNxV = greedy(model, jnp.asarray(prompt), jnp.asarray(pads, jnp.int32))
  seq = jnp.concatenate([jnp.asarray(prompt), tokens_BxN], axis=1)
  mask = jnp.arange(p + n)[None, :] >= jnp.asarray(pads)[:, None]
  full = nnx.jit(lambda m, s, k: m(s, k))(model, seq, mask)
  # Logits at the position of token t+1 predict it; cached step t scored tokens_BxN[:, t].
  diff = float(jnp.abs(full[:, p:] - cached_BxNxV).max())
  print("decoded tokens:\n", np.asarray(tokens_BxN))
  print(f"max |cached - full| logit difference: {diff:.2e}   ({time.perf_counter() - t0:.1f} s, "
        f"{jax.device_count()} {jax.default_backend()} device(s))")
  if not diff < 1e-3 * float(jnp.abs(full).max()):
    raise SystemExit(f"smoke: FAILED (cached decode disagrees with the full forward by {diff})")
  print("smoke: OK")
  return diff
