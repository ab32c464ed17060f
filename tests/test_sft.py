"""SFT loss against a numpy cross-entropy, and a few steps that learn the arithmetic format."""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kat_jax import sft
from kat_jax.data import arith
from kat_jax.models import ModelConfig, Transformer


def _model():
  cfg = ModelConfig(family="qwen3", vocab_size=len(arith.VOCAB), hidden_size=32,
                    intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    qk_norm=True, tie_embeddings=True)
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _batch(n=16, start=0):
  probs = [arith.make_problem(0, i) for i in range(start, start + n)]
  prompts = [arith.encode(p) for p, _, _ in probs]
  comps = [arith.encode(c) + [arith.EOS_ID] for _, c, _ in probs]
  return sft.make_batch(prompts, comps, arith.PAD_ID, 16, 48)


def test_sft_loss_matches_numpy_cross_entropy():
  model = _model()
  tokens, attn, mask = _batch(4)
  loss = float(sft.sft_loss(model, jnp.asarray(tokens), jnp.asarray(attn), jnp.asarray(mask), 16))
  logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(attn)), np.float64)[:, 15:-1]
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, tokens[:, 16:, None], -1)[..., 0]
  np.testing.assert_allclose(loss, ce[mask].mean(), rtol=1e-5)


def test_sft_steps_reduce_loss():
  model = _model()
  graph, params = nnx.split(model)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  losses = []
  for step in range(30):
    tokens, attn, mask = _batch(16, start=16 * step)
    params, opt_state, loss = sft.sft_update(graph, params, opt_state, tokens, attn, mask,
                                             tx=tx, prompt_len=16)
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
