"""OPD objectives: values and gradients against float64 numpy references and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kat_jax import losses

B, T, V = 3, 5, 7


def _np_logsoftmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(lp_a, lp_b):
  return (np.exp(lp_a) * (lp_a - lp_b)).sum(-1)


def _np_loss(objective, s_logits, t_logits, tokens, lp_s_roll, lp_t_roll, lp_behavior, mask,
             beta=0.5, temperature=1.0, weight=None):
  """Float64 reference, written from the formulas (no shared code with kat_jax.losses)."""
  lp_s = _np_logsoftmax(s_logits / temperature)
  lp_t = _np_logsoftmax(t_logits / temperature)
  if objective == "sampled_pg":
    lp_new = np.take_along_axis(lp_s, tokens[..., None], -1)[..., 0]
    adv = -(lp_s_roll - lp_t_roll)
    per = -np.exp(lp_new - lp_behavior) * adv
  elif objective == "reverse_kl":
    per = _np_kl(lp_s, lp_t)
  elif objective == "forward_kl":
    per = _np_kl(lp_t, lp_s)
  elif beta == 0:  # the endpoints are defined as the KL directions (TRL's convention)
    per = _np_kl(lp_t, lp_s)
  elif beta == 1:
    per = _np_kl(lp_s, lp_t)
  else:
    m = beta * np.exp(lp_t) + (1 - beta) * np.exp(lp_s)
    per = beta * _np_kl(lp_t, np.log(m)) + (1 - beta) * _np_kl(lp_s, np.log(m))
  if weight is not None:  # a truncation policy's per-token weights; the count stays the normaliser
    per = per * weight
  return (per * mask).sum() / max(mask.sum(), 1)


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  s = rng.randn(B, T, V) * 2
  t = rng.randn(B, T, V) * 2
  tokens = rng.randint(0, V, (B, T))
  lp_s_roll = np.take_along_axis(_np_logsoftmax(s), tokens[..., None], -1)[..., 0]
  lp_t_roll = np.take_along_axis(_np_logsoftmax(t), tokens[..., None], -1)[..., 0]
  # Behaviour policy slightly off the current student (as after an update, or at T != 1).
  lp_b = lp_s_roll + rng.randn(B, T) * 0.1
  mask = np.arange(T)[None, :] < np.array([5, 2, 0])[:, None]  # row 2 has no trained token
  return s, t, tokens, lp_s_roll, lp_t_roll, lp_b, mask


def _jax_loss(objective, s, t, tokens, lp_s_roll, lp_t_roll, lp_b, mask, beta=0.5, temperature=1.0):
  return losses.opd_loss(objective, jnp.asarray(s, jnp.float32), jnp.asarray(mask),
                         tokens_BxT=jnp.asarray(tokens),
                         logp_student_BxT=jnp.asarray(lp_s_roll, jnp.float32),
                         logp_teacher_BxT=jnp.asarray(lp_t_roll, jnp.float32),
                         logp_behavior_BxT=jnp.asarray(lp_b, jnp.float32),
                         teacher_logits_BxTxV=jnp.asarray(t, jnp.float32), beta=beta,
                         temperature=temperature)


CASES = [("sampled_pg", 0.5, 1.0), ("sampled_pg", 0.5, 0.7), ("reverse_kl", 0.5, 1.0),
         ("forward_kl", 0.5, 1.0), ("jsd", 0.5, 1.0), ("jsd", 0.1, 2.0), ("jsd", 0.0, 1.0),
         ("jsd", 1.0, 1.0)]


@pytest.mark.parametrize("objective,beta,temperature", CASES)
def test_value_and_gradient_match_numpy(objective, beta, temperature):
  s, t, tokens, lp_s, lp_t, lp_b, mask = _inputs()
  ref = _np_loss(objective, s, t, tokens, lp_s, lp_t, lp_b, mask, beta, temperature)
  val, grad = jax.value_and_grad(
      lambda x: _jax_loss(objective, x, t, tokens, lp_s, lp_t, lp_b, mask, beta, temperature))(
          jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(float(val), ref, rtol=1e-5, atol=1e-6)
  # Central finite differences of the float64 reference, one logit at a time.
  eps = 1e-5
  fd = np.zeros_like(s)
  for idx in np.ndindex(s.shape):
    d = np.zeros_like(s)
    d[idx] = eps
    fd[idx] = (_np_loss(objective, s + d, t, tokens, lp_s, lp_t, lp_b, mask, beta, temperature)
               - _np_loss(objective, s - d, t, tokens, lp_s, lp_t, lp_b, mask, beta,
                          temperature)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(grad), fd, atol=2e-5)
  assert np.all(np.asarray(grad)[2] == 0), "a row with no trained token gets no gradient"


@pytest.mark.parametrize("objective", ["sampled_pg", "reverse_kl"])
def test_weighted_loss_and_gradient_match_numpy(objective):
  """Policy weights (IW-OPD, Prune-OPD) scale each token's loss; they are constants."""
  s, t, tokens, lp_s, lp_t, lp_b, mask = _inputs(1)
  weight = np.random.RandomState(2).uniform(0.5, 1.5, size=mask.shape) * mask
  ref = _np_loss(objective, s, t, tokens, lp_s, lp_t, lp_b, mask, weight=weight)

  def loss(x, w):
    return losses.opd_loss(objective, x, jnp.asarray(mask), tokens_BxT=jnp.asarray(tokens),
                           logp_student_BxT=jnp.asarray(lp_s, jnp.float32),
                           logp_teacher_BxT=jnp.asarray(lp_t, jnp.float32),
                           logp_behavior_BxT=jnp.asarray(lp_b, jnp.float32),
                           teacher_logits_BxTxV=jnp.asarray(t, jnp.float32), weight_BxT=w)
  x = jnp.asarray(s, jnp.float32)
  val, grad = jax.value_and_grad(loss)(x, jnp.asarray(weight, jnp.float32))
  np.testing.assert_allclose(float(val), ref, rtol=1e-5, atol=1e-6)
  assert abs(float(val) - float(loss(x, None))) > 1e-3, "the weights should matter here"
  # Per token, the gradient is the weight times the unweighted token's gradient.
  for r, c in ((0, 1), (1, 0), (0, 4)):
    one = np.zeros(mask.shape, np.float32)
    one[r, c] = 1.0
    g1 = np.asarray(jax.grad(loss)(x, jnp.asarray(one)))
    gw = np.asarray(jax.grad(loss)(x, jnp.asarray(one * weight)))
    np.testing.assert_allclose(gw, g1 * weight[r, c], rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(
      np.asarray(grad), sum(np.asarray(jax.grad(loss)(x, jnp.asarray(
          np.eye(mask.size)[i].reshape(mask.shape) * weight, jnp.float32)))
          for i in range(mask.size)), rtol=1e-4, atol=1e-6)


def test_kl_terms_match_optax():
  s, t, *_ = _inputs(1)
  lp_s = jax.nn.log_softmax(jnp.asarray(s, jnp.float32))
  lp_t = jax.nn.log_softmax(jnp.asarray(t, jnp.float32))
  # optax.kl_divergence_with_log_targets(log_predictions, log_targets) = KL(targets || predictions)
  np.testing.assert_allclose(losses.reverse_kl(s, t),
                             optax.losses.kl_divergence_with_log_targets(lp_t, lp_s), rtol=1e-5)
  np.testing.assert_allclose(losses.forward_kl(s, t),
                             optax.losses.kl_divergence_with_log_targets(lp_s, lp_t), rtol=1e-5)


def test_jsd_is_nonnegative_and_symmetric_at_half():
  s, t, *_ = _inputs(2)
  big = jnp.asarray(s * 30, jnp.float32)  # near one-hot distributions: the bf16-era failure case
  v = losses.jsd(big, jnp.asarray(t * 30, jnp.float32), beta=0.5)
  assert np.all(np.asarray(v) >= -1e-6)
  np.testing.assert_allclose(losses.jsd(s, t, 0.5), losses.jsd(t, s, 0.5), rtol=1e-5)
  assert np.all(np.asarray(losses.jsd(s, t, 0.5)) <= np.log(2) + 1e-6)


def test_sampled_pg_on_policy_gradient_is_advantage_weighted_score():
  """At ratio 1 the gradient is -A_t (onehot(y_t) - p_t) / N: the REINFORCE form."""
  s, t, tokens, lp_s, lp_t, _, mask = _inputs(3)
  grad = jax.grad(lambda x: _jax_loss("sampled_pg", x, t, tokens, lp_s, lp_t, lp_s, mask))(
      jnp.asarray(s, jnp.float32))
  p = np.exp(_np_logsoftmax(s))
  onehot = np.eye(V)[tokens]
  adv = -(lp_s - lp_t)
  expected = -(adv[..., None] * (onehot - p)) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)


def test_truncated_importance_sampling_weights_the_score_by_the_clipped_ratio():
  """ratio_clip C: the value is -min(ratio, C) A_t per token and the gradient
  -min(ratio, C) A_t (onehot(y_t) - p_t) / (T N), the ratio a constant (TIS)."""
  s, t, tokens, lp_s, lp_t, _, mask = _inputs(7)
  temperature, clip = 0.8, 1.1
  lp = _np_logsoftmax(s / temperature)
  lp_new = np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  rng = np.random.RandomState(1)
  lp_b = lp_new + rng.choice([-0.4, -0.05, 0.05, 0.4], size=lp_new.shape)  # ratios both sides
  ratio = np.exp(lp_new - lp_b)
  assert (ratio[mask] > clip).any() and (ratio[mask] < clip).any()
  adv = -(lp_s - lp_t)
  weight = np.minimum(ratio, clip) * mask
  n = mask.sum()

  def loss(x):
    return losses.opd_loss("sampled_pg", x, jnp.asarray(mask), tokens_BxT=jnp.asarray(tokens),
                           logp_student_BxT=jnp.asarray(lp_s, jnp.float32),
                           logp_teacher_BxT=jnp.asarray(lp_t, jnp.float32),
                           logp_behavior_BxT=jnp.asarray(lp_b, jnp.float32),
                           temperature=temperature, ratio_clip=clip)

  val, grad = jax.value_and_grad(loss)(jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(float(val), -(weight * adv).sum() / n, rtol=1e-5)
  expected = -(weight * adv)[..., None] * (np.eye(V)[tokens] - np.exp(lp)) / temperature / n
  np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)


def test_empty_batch_gives_zero_not_nan():
  s, t, tokens, lp_s, lp_t, lp_b, _ = _inputs(5)
  mask = np.zeros((B, T), bool)
  lp_b = np.where(mask, lp_b, -np.inf)  # garbage at masked positions must not leak
  for objective in losses.OBJECTIVES:
    val, grad = jax.value_and_grad(
        lambda x: _jax_loss(objective, x, t, tokens, lp_s, lp_t, lp_b, mask))(
            jnp.asarray(s, jnp.float32))
    assert float(val) == 0.0 and np.all(np.asarray(grad) == 0), objective


def test_global_normaliser_for_micro_batches():
  s, t, tokens, lp_s, lp_t, lp_b, mask = _inputs(6)
  full = _jax_loss("reverse_kl", s, t, tokens, lp_s, lp_t, lp_b, mask)
  n = int(mask.sum())
  parts = [losses.opd_loss("reverse_kl", jnp.asarray(s[i:i + 1], jnp.float32),
                           jnp.asarray(mask[i:i + 1]),
                           teacher_logits_BxTxV=jnp.asarray(t[i:i + 1], jnp.float32),
                           num_tokens=n) for i in range(B)]
  np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6)
