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

from kat_jax import hf, rollout
from kat_jax.data import arith, sources
from kat_jax.models import ModelConfig, Transformer


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


# ------------------------------------------------------------------------ the SFT job


def evaluate_arith(model, source, n: int, key, temperature: float, max_new_tokens: int = 48):
  """Accuracy and mean completion length of `model` on n problems of `source`."""
  import numpy as np

  problems = source.batch(0, n)
  prompt, start = rollout.pad_prompts([arith.encode(p) for p, _ in problems], arith.PAD_ID)
  tokens, length = rollout.generate(
      model, prompt, start, key, max_new_tokens=max_new_tokens, eos_ids=(arith.EOS_ID,),
      pad_id=arith.PAD_ID, sampling=rollout.SamplingConfig(temperature=temperature))
  tokens = np.asarray(tokens)
  correct = [arith.score(arith.decode(t), a) for t, (_, a) in zip(tokens, problems)]
  return float(np.mean(correct)), float(np.mean(np.asarray(length)))


def train(config, workdir: str) -> dict:
  """Trains a model from scratch on the arithmetic task and exports the selected checkpoint.

  Selection: `select='last'` keeps the final params; `select='target'` keeps the evaluated
  checkpoint whose accuracy is closest to `target_accuracy` (students for OPD should still slip).
  """
  import json
  import tempfile
  import time
  from pathlib import Path



  m = config.model
  cfg = ModelConfig(family="qwen3", vocab_size=len(arith.VOCAB), hidden_size=m.hidden_size,
                    intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                    num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                    qk_norm=True, tie_embeddings=True, max_position_embeddings=128,
                    bos_token_id=arith.BOS_ID, eos_token_ids=(arith.EOS_ID,),
                    pad_token_id=arith.PAD_ID)
  model = Transformer(cfg, rngs=nnx.Rngs(config.seed))
  graph, params = nnx.split(model)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                         config.steps, config.learning_rate * 0.1),
      weight_decay=config.weight_decay))
  opt_state = tx.init(params)
  eval_src = sources.ArithSource(seed=config.seed + 1, n_ops=config.n_ops, split="eval")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = open(workdir / "sft_metrics.jsonl", "a")
  best = None  # (distance to target, step, accuracy, params on host)
  t0 = time.perf_counter()
  for step in range(1, config.steps + 1):
    probs = [arith.make_problem(config.seed, i, config.n_ops) for i in
             range((step - 1) * config.batch_size, step * config.batch_size)]
    tokens, attn, mask = make_batch([arith.encode(p) for p, _, _ in probs],
                                    [arith.encode(c) + [arith.EOS_ID] for _, c, _ in probs],
                                    arith.PAD_ID, 16, 48)
    params, opt_state, loss = sft_update(graph, params, opt_state, tokens, attn, mask, tx=tx,
                                         prompt_len=16)
    if step % config.eval_every == 0 or step == config.steps:
      acc, length = evaluate_arith(nnx.merge(graph, params), eval_src, config.eval_size,
                                   jax.random.key(step), config.eval_temperature)
      rec = dict(step=step, loss=float(loss), accuracy=acc, mean_length=length,
                 seconds=time.perf_counter() - t0)
      log.write(json.dumps(rec) + "\n")
      log.flush()
      print(json.dumps(rec), flush=True)
      target = config.target_accuracy if config.select == "target" else 2.0
      dist = abs(acc - target)
      if best is None or dist <= best[0]:
        best = (dist, step, acc, jax.device_get(params))
      if config.select == "last" and acc >= config.stop_accuracy:
        break
  _, step, acc, host_params = best if config.select == "target" else (0, step, acc, params)
  with tempfile.TemporaryDirectory() as tok_dir:
    arith.save_tokenizer(tok_dir)
    out = hf.save(nnx.merge(graph, host_params), cfg, workdir / "model", tokenizer_dir=tok_dir,
                  overwrite=True)
  summary = dict(step=step, accuracy=acc, params=cfg.num_params(),
                 seconds=time.perf_counter() - t0, export=str(out))
  print("sft done:", json.dumps(summary), flush=True)
  return summary
