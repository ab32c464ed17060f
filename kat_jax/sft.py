"""Supervised fine-tuning (teacher-forced cross-entropy on completion tokens).

Used to make the embedded task's teacher and student from scratch; the same masked loss serves any
(prompt, completion) data. Prompts are left-padded, completions right-padded, so one batch is
[B, P + C] with the completion's first token at column P.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
               prompt_len: int, completion_len: int):
  """(tokens [B, P + C], attention mask [B, P + C], loss mask [B, C]) as numpy int32 / bool."""
  import numpy as np
  b = len(prompts)
  tokens = np.full((b, prompt_len + completion_len), pad_id, np.int32)
  attn = np.zeros(tokens.shape, bool)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    if len(p) > prompt_len or len(c) > completion_len:
      raise ValueError(f"example {i}: prompt {len(p)} / completion {len(c)} tokens exceed "
                       f"prompt_len={prompt_len} / completion_len={completion_len}.")
    tokens[i, prompt_len - len(p):prompt_len] = p
    tokens[i, prompt_len:prompt_len + len(c)] = c
    attn[i, prompt_len - len(p):prompt_len + len(c)] = True
  return tokens, attn, attn[:, prompt_len:]


def sft_loss(model, tokens, attn, loss_mask, prompt_len: int):
  """Mean cross-entropy of the completion tokens (teacher forcing)."""
  hidden = model.hidden(tokens, attn)[:, prompt_len - 1:-1]
  logits = model.logits(hidden)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, prompt_len:])
  return jnp.sum(jnp.where(loss_mask, ce, 0.0)) / jnp.maximum(jnp.sum(loss_mask), 1)


@functools.partial(jax.jit, static_argnames=("graph", "tx", "prompt_len"),
                   donate_argnames=("params", "opt_state"))
def sft_update(graph, params, opt_state, tokens, attn, loss_mask, *, tx, prompt_len: int):
  def loss_fn(params):
    return sft_loss(nnx.merge(graph, params), tokens, attn, loss_mask, prompt_len)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss
