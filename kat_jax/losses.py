"""OPD objectives over masked per-token signals.

Every objective is a per-token loss [B, T] on the student's own rollout tokens; `masked_mean` sums it
over the trained tokens and divides by their number over the *global* batch (pass `num_tokens` when
the batch is split into micro-batches). The mask comes from lengths (`token_mask`), never from token
ids, so the EOS token is trained even when pad id == EOS id, and a row with no trained token adds 0.

Conventions (one meaning each):
  * `sampled_pg` (default; Thinking Machines' OPD / Tinker cookbook): advantage
    A_t = -(log p_s(y_t) - log p_T(y_t)) from the rollout (temperature 1, stop-gradient, discount 0);
    loss_t = -exp(log pi_theta(y_t) - log pi_behavior(y_t)) * A_t, where pi_theta is the student at
    `temperature` and pi_behavior the rollout's sampling distribution. The training config sets
    `temperature` to the sampling temperature and refuses top-k / top-p / greedy sampling with
    this objective, so pi_theta is the behaviour policy itself: the ratio is 1 on-policy and the
    gradient is -A_t * grad log pi_theta(y_t) -- the policy gradient of the sampling policy with
    the per-token reverse-KL advantage of the (untempered) student against the teacher.
    `ratio_clip` C > 0: truncated importance sampling, loss_t = -sg(min(ratio, C)) * A_t with the
    gradient -min(ratio, C) * A_t * grad log pi_theta(y_t) (for sampling / training numerics that
    differ, e.g. bf16 rollouts).
  * `reverse_kl`: exact KL(pi_theta || p_T) over the shared vocabulary at every trained position.
  * `forward_kl`: KL(p_T || pi_theta).
  * `jsd`: GKD's generalised Jensen-Shannon divergence in TRL's convention:
    beta * KL(p_T || M) + (1 - beta) * KL(pi_theta || M) with M = beta * p_T + (1 - beta) * pi_theta;
    beta = 0 is forward KL(p_T || pi_theta), beta = 1 is reverse KL(pi_theta || p_T) (the limits
    TRL special-cases; EasyDeL's beta is the opposite).
  For the full-vocabulary objectives `temperature` divides both models' logits (GKD's convention).
All arithmetic is fp32 whatever the compute dtype (bf16 JSD goes negative in peers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OBJECTIVES = ("sampled_pg", "reverse_kl", "forward_kl", "jsd")


def token_mask(length_B, t: int):
  """[B, T] bool: the first `length_B` tokens of each row."""
  return jnp.arange(t)[None, :] < length_B[:, None]


def _log_probs(logits_BxTxV, temperature):
  return jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)


def _kl(logp_a, logp_b):
  """KL(a || b) over the last axis from log-probabilities; 0 * log 0 terms are 0."""
  p_a = jnp.exp(logp_a)
  return jnp.sum(jnp.where(p_a > 0, p_a * (logp_a - logp_b), 0.0), axis=-1)


def sampled_pg(student_logits_BxTxV, tokens_BxT, logp_student_BxT, logp_teacher_BxT,
               logp_behavior_BxT, mask_BxT, temperature: float = 1.0, ratio_clip: float = 0.0):
  """Per-token importance-weighted policy-gradient loss with the OPD advantage."""
  logp = _log_probs(student_logits_BxTxV, temperature)
  logp_new = jnp.take_along_axis(logp, tokens_BxT[..., None], axis=-1)[..., 0]
  advantage = jnp.where(mask_BxT, jax.lax.stop_gradient(-(logp_student_BxT - logp_teacher_BxT)),
                        0.0)
  # Masked positions get log-ratio 0 *before* exp, so nothing there can overflow into NaN grads.
  log_ratio = jnp.where(mask_BxT, logp_new - jax.lax.stop_gradient(logp_behavior_BxT), 0.0)
  if ratio_clip > 0:
    # exp(x - sg(x)) is 1 with the gradient of x: the weight min(ratio, C) stays a constant.
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), ratio_clip))
    return -weight * jnp.exp(log_ratio - jax.lax.stop_gradient(log_ratio)) * advantage
  return -jnp.exp(log_ratio) * advantage


def reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV, temperature: float = 1.0):
  return _kl(_log_probs(student_logits_BxTxV, temperature),
             _log_probs(teacher_logits_BxTxV, temperature))


def forward_kl(student_logits_BxTxV, teacher_logits_BxTxV, temperature: float = 1.0):
  return _kl(_log_probs(teacher_logits_BxTxV, temperature),
             _log_probs(student_logits_BxTxV, temperature))


def jsd(student_logits_BxTxV, teacher_logits_BxTxV, beta: float, temperature: float = 1.0):
  logp_s = _log_probs(student_logits_BxTxV, temperature)
  logp_t = _log_probs(teacher_logits_BxTxV, temperature)
  if beta == 0:
    return _kl(logp_t, logp_s)
  if beta == 1:
    return _kl(logp_s, logp_t)
  # log M = logsumexp(log beta + log p_T, log(1 - beta) + log p_s): stable, never log(0) of a sum.
  logp_m = jnp.logaddexp(jnp.log(beta) + logp_t, jnp.log1p(-beta) + logp_s)
  return beta * _kl(logp_t, logp_m) + (1 - beta) * _kl(logp_s, logp_m)


def masked_mean(loss_BxT, mask_BxT, num_tokens=None):
  """Sum over trained tokens / their count (global batch, or `num_tokens`); 0 if none."""
  total = jnp.sum(jnp.where(mask_BxT, loss_BxT.astype(jnp.float32), 0.0))
  if num_tokens is None:
    num_tokens = jnp.sum(mask_BxT)
  return total / jnp.maximum(num_tokens, 1).astype(jnp.float32)


def opd_loss(objective: str, student_logits_BxTxV, mask_BxT, *, tokens_BxT=None,
             logp_student_BxT=None, logp_teacher_BxT=None, logp_behavior_BxT=None,
             teacher_logits_BxTxV=None, beta: float = 0.5, temperature: float = 1.0,
             ratio_clip: float = 0.0, num_tokens=None, weight_BxT=None):
  """One entry point: the objective's per-token loss, masked and normalised. Returns a scalar.

  weight_BxT: per-token loss weights (a truncation policy's, kat.loss_weights); the normaliser
  stays the number of trained tokens, not the weights' sum."""
  if objective == "sampled_pg":
    per_token = sampled_pg(student_logits_BxTxV, tokens_BxT, logp_student_BxT, logp_teacher_BxT,
                           logp_behavior_BxT, mask_BxT, temperature, ratio_clip)
  elif objective == "reverse_kl":
    per_token = reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV, temperature)
  elif objective == "forward_kl":
    per_token = forward_kl(student_logits_BxTxV, teacher_logits_BxTxV, temperature)
  elif objective == "jsd":
    per_token = jsd(student_logits_BxTxV, teacher_logits_BxTxV, beta, temperature)
  else:
    raise ValueError(f"objective={objective!r}; use one of {OBJECTIVES}.")
  if weight_BxT is not None:
    per_token = per_token * jax.lax.stop_gradient(weight_BxT)
  # Zero masked positions before the sum so a non-finite value there cannot poison the gradient.
  per_token = jnp.where(mask_BxT, per_token, 0.0)
  return masked_mean(per_token, mask_BxT, num_tokens)
