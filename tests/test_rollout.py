"""The fused rollout against independent references: full-forward decoding and numpy signals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kat_jax import kat, rollout, sharding
from kat_jax.models import ModelConfig, Transformer

VOCAB = 32  # shared tokenizer vocabulary; the teacher's embedding is padded to 40
EOS = (1, 2, 3)
PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13] * 7, [4, 5], [20, 21, 22, 23], [30], [7, 7],
           [9, 8, 7, 6, 5, 4]]


def _model(seed, vocab, hidden, layers, family="qwen3"):
  cfg = ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8,
                    qk_norm=family == "qwen3", qkv_bias=family == "qwen2", tie_embeddings=False)
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  # Larger weights than the 0.02 init: peaky, model-specific distributions (non-trivial KL,
  # EOS reached at varied lengths, greedy and sampled).
  model.embed[...] = model.embed[...] * 40
  model.lm_head[...] = model.lm_head[...] * 10
  return model


@pytest.fixture(scope="module")
def models():
  return _model(0, VOCAB, 32, 2), _model(1, 40, 48, 3, family="qwen2")


def _cfg(**kw):
  kat_kw = kw.pop("kat", {})
  return rollout.RolloutConfig(
      max_new_tokens=kw.pop("max_new_tokens", 24), eos_ids=EOS, pad_id=PAD, vocab_size=VOCAB,
      kat=kat.KATConfig(**{"window": 4, "patience": 2, "min_len": 8, **kat_kw}),
      # Two batch sizes (8, 4) instead of eight: each one is a separate compile.
      **{"compact_multiple": 4, **kw})


def _prompts(prompts=PROMPTS):
  return rollout.pad_prompts(prompts, PAD)


def _run(models, cfg, key=0, tau=0.0, spike_tau=np.inf, prompts=PROMPTS, student=None):
  s, t = models
  p, start = _prompts(prompts)
  return jax.device_get(rollout.rollout(student or s, t, p, start, jax.random.key(key), cfg,
                                        tau=tau, spike_tau=spike_tau))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids, mask: m(ids, mask))


def _full_sequences(res, prompts=PROMPTS):
  """Prompt (left-padded) + generated tokens, and its attention mask."""
  p, start = _prompts(prompts)
  seq = np.concatenate([p, res.tokens_BxT], axis=1)
  mask = np.arange(seq.shape[1])[None, :] >= start[:, None]
  gen = np.arange(res.tokens_BxT.shape[1])[None, :] < res.length_B[:, None]
  mask[:, p.shape[1]:] &= gen
  return seq, mask, p.shape[1]


def test_greedy_equals_step_by_step_full_forward(models, forward):
  student, _ = models
  cfg = _cfg(sampling=rollout.SamplingConfig(temperature=0.0), kat={"mode": "none"})
  res = _run(models, cfg)
  p, start = _prompts()
  b, plen = p.shape
  # Reference: greedy decoding with the full-sequence forward, one token at a time. A fixed-size
  # buffer keeps it to one compile; causality makes the not-yet-written tail irrelevant.
  seq = np.concatenate([p, np.full((b, cfg.max_new_tokens), PAD, np.int32)], axis=1)
  mask = (np.arange(seq.shape[1])[None, :] >= start[:, None]).astype(np.int32)
  done = np.zeros(b, bool)
  length = np.zeros(b, np.int32)
  for i in range(cfg.max_new_tokens):
    logits = np.asarray(forward(student, jnp.asarray(seq), jnp.asarray(mask)))
    tok = logits[:, plen + i - 1, :VOCAB].argmax(-1)
    tok = np.where(done, PAD, tok)
    seq[:, plen + i] = tok
    length += ~done
    done |= np.isin(tok, EOS)
  np.testing.assert_array_equal(res.tokens_BxT[:, :cfg.max_new_tokens], seq[:, plen:])
  np.testing.assert_array_equal(res.length_B, length)
  assert res.eos_B.any() and not res.eos_B.all(), "fixture should give varied lengths"


def _log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("rescore", [False, True], ids=["keep", "rescore"])
def test_signals_equal_numpy_reference(models, forward, rescore):
  student, teacher = models
  cfg = _cfg(kat={"mode": "none"}, rescore_student=rescore,
             sampling=rollout.SamplingConfig(temperature=0.8, top_k=20))
  res = _run(models, cfg, key=3)
  seq, mask, plen = _full_sequences(res)
  s_lp = _log_softmax(np.asarray(forward(student, jnp.asarray(seq), jnp.asarray(mask)))[..., :VOCAB])
  t_lp = _log_softmax(np.asarray(forward(teacher, jnp.asarray(seq), jnp.asarray(mask)))[..., :VOCAB])
  # Position plen + i - 1 predicts generated token i.
  s_lp, t_lp = s_lp[:, plen - 1:-1], t_lp[:, plen - 1:-1]
  tok = res.tokens_BxT[..., None]
  valid = mask[:, plen:]
  ref_s = np.take_along_axis(s_lp, tok, -1)[..., 0] * valid
  ref_t = np.take_along_axis(t_lp, tok, -1)[..., 0] * valid
  ref_kl = (np.exp(s_lp) * (s_lp - t_lp)).sum(-1) * valid
  np.testing.assert_allclose(res.logp_student_BxT, ref_s, atol=2e-4)
  np.testing.assert_allclose(res.logp_teacher_BxT, ref_t, atol=2e-4)
  np.testing.assert_allclose(res.kl_BxT, ref_kl, atol=2e-4)
  assert ref_kl.max() > 0.5, "the models should disagree somewhere"
  # Behaviour log-prob: temperature 0.8 and top-20 applied to the student's logits.
  x = np.asarray(forward(student, jnp.asarray(seq), jnp.asarray(mask)))[:, plen - 1:-1, :VOCAB] / 0.8
  kth = np.sort(x, -1)[..., -20:-19]
  ref_b = np.take_along_axis(_log_softmax(np.where(x < kth, -np.inf, x)), tok, -1)[..., 0]
  ref_b = np.where(valid, ref_b, 0.0)  # padding positions may hold tokens outside the top 20
  np.testing.assert_allclose(res.logp_behavior_BxT, ref_b, atol=2e-4)
  assert res.loss_mask_BxT.sum() == res.length_B.sum()
  # Per-window statistics (the adaptive threshold's input) are the window means of the signal.
  b, t = res.kl_BxT.shape
  np.testing.assert_allclose(res.window_mean_BxN, res.kl_BxT.reshape(b, t // 4, 4).mean(-1),
                             atol=1e-6)
  ends = np.arange(4, t + 1, 4)[None, :]
  length, eos = res.length_B[:, None], res.eos_B[:, None]
  np.testing.assert_array_equal(res.window_complete_BxN,
                                (ends < length) | ((ends == length) & ~eos))


def test_teacher_equals_student_kl_zero_and_rule_predicted_stop(models):
  student, _ = models
  w, k, min_len = 4, 2, 10
  cfg = _cfg(kat={"window": w, "patience": k, "min_len": min_len, "cut": "detection"})
  res = _run((student, student), cfg, tau=1e-3)
  assert np.abs(res.kl_BxT).max() < 1e-5
  assert np.abs(res.logratio_BxT).max() < 1e-4
  # Every complete window is low, so a row still running at the first window end that is both
  # >= min_len and >= K windows is stopped exactly there.
  first = max(-(-min_len // w), k) * w
  uncut = _run((student, student), _cfg(kat={"mode": "none"}))
  alive = (uncut.length_B > first) | ((uncut.length_B == first) & ~uncut.eos_B)
  np.testing.assert_array_equal(res.terminated_B, alive)
  np.testing.assert_array_equal(res.detect_B, np.where(alive, first, -1))
  np.testing.assert_array_equal(res.onset_B, np.where(alive, 0, -1))
  np.testing.assert_array_equal(res.length_B, np.where(alive, first, uncut.length_B))
  np.testing.assert_array_equal(res.trained_len_B, res.length_B)
  assert alive.any() and not alive.all()


def test_topk_policy_records_overlap_and_cuts_as_the_offline_rule(models, forward):
  """Prune-OPD in the fused loop: the recorded top-k overlap is the full forwards' one, the drift
  cut equals `detect_offline` on it, cut rows are prefixes of the uncut ones, and the loss weights
  are `loss_weights` of the recorded signals."""
  student, teacher = models
  watch = {"mode": "topk", "topk_k": 4, "topk_base": 1.0}  # weights only: never stops a row
  uncut = _run(models, _cfg(kat=watch, max_new_tokens=32), key=7)
  seq, mask, plen = _full_sequences(uncut)
  s_logits = np.asarray(forward(student, jnp.asarray(seq), jnp.asarray(mask)))[:, plen - 1:-1]
  t_logits = np.asarray(forward(teacher, jnp.asarray(seq), jnp.asarray(mask)))[:, plen - 1:-1]
  top = lambda x: np.argsort(-x[..., :VOCAB], -1)[..., :4]  # noqa: E731
  ref = (top(s_logits)[..., :, None] == top(t_logits)[..., None, :]).any(-1).mean(-1)
  valid = mask[:, plen:]
  np.testing.assert_allclose(uncut.overlap_BxT, np.where(valid, ref, 0), atol=1e-6)
  assert not uncut.terminated_B.any() and 0 < ref[valid].mean() < 1

  cut_kw = {**watch, "topk_base": 0.0, "topk_threshold": 0.6, "topk_drop": 0.2}
  want = kat.detect_offline(uncut.overlap_BxT, uncut.length_B, uncut.eos_B, 0.0, np.inf,
                            kat.KATConfig(**{"window": 4, **cut_kw}))
  res = _run(models, _cfg(kat=cut_kw, max_new_tokens=32), key=7)
  assert 0 < want["terminated"].sum() < len(PROMPTS)
  for name, field in (("terminated_B", "terminated"), ("detect_B", "detect"),
                      ("onset_B", "onset"), ("trained_len_B", "trained_len")):
    np.testing.assert_array_equal(getattr(res, name), want[field], err_msg=name)
  # A row that hit EOS inside its last window has ended there anyway.
  np.testing.assert_array_equal(res.length_B, np.where(
      res.terminated_B, np.minimum(res.detect_B, uncut.length_B), uncut.length_B))
  weights = kat.loss_weights(jnp.asarray(res.loss_mask_BxT), jnp.asarray(res.logratio_BxT),
                             jnp.asarray(res.overlap_BxT), kat.KATConfig(**cut_kw))
  np.testing.assert_allclose(res.loss_weight_BxT, weights, atol=1e-6)
  assert (res.loss_weight_BxT[res.loss_mask_BxT] > 0).all()  # the zero-weight tail is cut


def test_horizon_and_iw_policies_in_the_loop(models):
  """TOPD / POPD: the horizon comes in as the traced tau and cuts as ESR's fixed length; IW-OPD
  cuts nothing and weights every trained token by its recorded log-ratio."""
  fixed = _run(models, _cfg(kat={"mode": "fixed", "fixed_len": 10}, max_new_tokens=32), key=7)
  horizon = _run(models, _cfg(kat={"mode": "horizon", "horizon_start": 1}, max_new_tokens=32),
                 key=7, tau=10.0)
  for name in ("tokens_BxT", "length_B", "terminated_B", "detect_B", "onset_B", "trained_len_B"):
    np.testing.assert_array_equal(getattr(horizon, name), getattr(fixed, name), err_msg=name)
  assert horizon.terminated_B.any()
  iw = _run(models, _cfg(kat={"mode": "iw", "iw_gamma": 0.5}, max_new_tokens=32), key=7)
  assert not iw.terminated_B.any()
  np.testing.assert_array_equal(iw.trained_len_B, iw.length_B)
  a = np.abs(iw.logratio_BxT) * iw.loss_mask_BxT
  before = np.cumsum(a, 1) - a
  want = (1 + 0.5 * (1 - before / np.maximum(a.sum(1, keepdims=True), 1e-8))) * iw.loss_mask_BxT
  np.testing.assert_allclose(iw.loss_weight_BxT, want, rtol=1e-5, atol=1e-6)
  assert iw.loss_weight_BxT.max() > 1.2


@pytest.mark.parametrize("spike_gate", [False, True], ids=["plain", "spike-gated"])
def test_in_loop_termination_equals_offline_rule_on_real_rollouts(models, spike_gate):
  kat_kw = {"window": 4, "patience": 2, "min_len": 4, "spike_gate": spike_gate}
  uncut = _run(models, _cfg(kat={**kat_kw, "mode": "none"}, max_new_tokens=32), key=7)
  # Thresholds from the uncut run's own statistics, so some rows are trapped and some not.
  complete = uncut.window_complete_BxN
  tau = float(np.quantile(uncut.window_mean_BxN[complete], 0.6))
  spike_tau = float(np.quantile(uncut.kl_BxT[uncut.kl_BxT > 0], 0.8))
  ref = kat.detect_offline(uncut.kl_BxT, uncut.length_B, uncut.eos_B, tau, spike_tau,
                           kat.KATConfig(**kat_kw))
  res = _run(models, _cfg(kat=kat_kw, max_new_tokens=32), key=7, tau=tau, spike_tau=spike_tau)
  assert 0 < ref["terminated"].sum() < len(PROMPTS)
  np.testing.assert_array_equal(res.terminated_B, ref["terminated"])
  np.testing.assert_array_equal(res.detect_B, ref["detect"])
  np.testing.assert_array_equal(res.onset_B, ref["onset"])
  np.testing.assert_array_equal(res.trained_len_B, ref["trained_len"])
  # KAT rows are exact prefixes of the uncut rollouts (same per-row keys), cut at detection.
  stop = np.where(res.terminated_B, res.detect_B, uncut.length_B)
  np.testing.assert_array_equal(res.length_B, stop)
  gen = np.arange(res.tokens_BxT.shape[1])[None, :] < stop[:, None]
  np.testing.assert_array_equal(np.where(gen, res.tokens_BxT, -1), np.where(gen, uncut.tokens_BxT, -1))
  np.testing.assert_allclose(res.kl_BxT, np.where(gen, uncut.kl_BxT, 0), atol=1e-6)
  np.testing.assert_array_equal(res.loss_mask_BxT.sum(1), res.trained_len_B)


def test_probe_rows_keep_generating_but_share_the_cut(models):
  """Probe rows (threshold.py): KAT records their cut exactly as for any row -- the loss drops
  the same tail -- but never stops their generation, so they are the uncut rollouts and their
  windows are an uncensored sample. Other rows are unaffected by the probes."""
  kat_kw = {"window": 4, "patience": 2, "min_len": 4}
  uncut = _run(models, _cfg(kat={**kat_kw, "mode": "none"}, max_new_tokens=32), key=7)
  tau = float(np.quantile(uncut.window_mean_BxN[uncut.window_complete_BxN], 0.6))
  ref = kat.detect_offline(uncut.kl_BxT, uncut.length_B, uncut.eos_B, tau, np.inf,
                           kat.KATConfig(**kat_kw))
  plain = _run(models, _cfg(kat=kat_kw, max_new_tokens=32), key=7, tau=tau)
  probe = ref["terminated"] & (np.arange(len(PROMPTS)) % 2 == 0)  # some flagged rows are probes
  probe[np.flatnonzero(~ref["terminated"])[:1]] = True  # and one row KAT leaves alone
  assert probe.any() and (ref["terminated"] & ~probe).any()
  s, t = models
  p, start = _prompts()
  res = jax.device_get(rollout.rollout(s, t, p, start, jax.random.key(7),
                                       _cfg(kat=kat_kw, max_new_tokens=32), tau=tau,
                                       probe_B=probe))
  np.testing.assert_array_equal(res.probe_B, probe)
  for name, want in (("terminated_B", "terminated"), ("detect_B", "detect"), ("onset_B", "onset"),
                     ("trained_len_B", "trained_len")):
    np.testing.assert_array_equal(getattr(res, name), ref[want], err_msg=name)
  np.testing.assert_array_equal(res.loss_mask_BxT.sum(1), ref["trained_len"])
  # Probes are the uncut rollouts; the other rows are the probe-free KAT rollout's.
  for name in ("tokens_BxT", "length_B", "window_complete_BxN"):
    want = np.where(probe.reshape((-1,) + (1,) * (getattr(res, name).ndim - 1)),
                    getattr(uncut, name), getattr(plain, name))
    np.testing.assert_array_equal(getattr(res, name), want, err_msg=name)
  np.testing.assert_allclose(res.window_mean_BxN[probe], uncut.window_mean_BxN[probe], atol=1e-6)
  win = res.windows(4)
  np.testing.assert_array_equal(win.detect_window_B, np.where(ref["terminated"],
                                                              ref["detect"] // 4, -1))


def test_onset_floor_cut_keeps_the_first_min_len_tokens(models):
  """kat.cut='onset_floor': a row low from its first token is detected at min_len; the onset
  cut would train it on nothing, the floored cut on its first min_len tokens."""
  student = models[0]
  w, k, min_len = 4, 2, 10
  res = _run((student, student), _cfg(kat={"window": w, "patience": k, "min_len": min_len,
                                           "cut": "onset_floor"}), tau=1e-3)
  first = max(-(-min_len // w), k) * w
  assert res.terminated_B.any()
  np.testing.assert_array_equal(res.onset_B, np.where(res.terminated_B, 0, -1))
  np.testing.assert_array_equal(
      res.trained_len_B, np.where(res.terminated_B, min(min_len, first), res.length_B))


def test_compaction_does_not_change_results(models):
  cfg = _cfg(kat={"min_len": 4}, max_new_tokens=32, compact_multiple=1)  # 8, 7, ..., 1 rows
  a = _run(models, cfg, key=5, tau=1.2)
  b = _run(models, _cfg(kat={"min_len": 4}, max_new_tokens=32, compact_multiple=-1),
           key=5, tau=1.2)
  assert a.terminated_B.any()
  for name in ("tokens_BxT", "length_B", "terminated_B", "detect_B", "trained_len_B"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  np.testing.assert_allclose(a.kl_BxT, b.kl_BxT, atol=1e-6)


def test_ablation_modes(models):
  uncut = _run(models, _cfg(kat={"mode": "none"}), key=2)
  assert not uncut.terminated_B.any()
  np.testing.assert_array_equal(uncut.trained_len_B, uncut.length_B)
  assert ((uncut.length_B == 24) | uncut.eos_B).all()  # rows run to EOS or max length

  n = 6
  fixed = _run(models, _cfg(kat={"mode": "fixed", "fixed_len": n}), key=2)
  np.testing.assert_array_equal(fixed.trained_len_B, np.minimum(uncut.length_B, n))
  np.testing.assert_array_equal(fixed.terminated_B, uncut.length_B > n)
  # Generation itself stops at the first window end past N (W=4 -> 8 tokens).
  np.testing.assert_array_equal(fixed.length_B, np.minimum(uncut.length_B, 8))

  cut = rollout.apply_random_truncation(uncut, jax.random.key(0), jnp.asarray([3, 5]))
  assert set(np.asarray(cut.trained_len_B)) <= {3, 5} | set(uncut.length_B[uncut.length_B <= 5])
  np.testing.assert_array_equal(np.asarray(cut.loss_mask_BxT).sum(1), cut.trained_len_B)


def test_no_recompile_within_a_prompt_bucket(models):
  cfg = _cfg(kat={"mode": "none"}, max_new_tokens=8)
  _run(models, cfg, prompts=[[5, 6, 7]] * 8)
  sizes = rollout.prefill._cache_size(), rollout.decode_loop._cache_size()
  assert rollout.bucket_length(3) == rollout.bucket_length(7) == 8
  res = _run(models, cfg, prompts=[[5, 6, 7, 8, 9, 10, 11]] * 4 + [[1]] * 4)
  assert (rollout.prefill._cache_size(), rollout.decode_loop._cache_size()) == sizes
  assert res.length_B.min() >= 1


def test_sampling_matches_top_k_top_p_distribution():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  cfg = rollout.SamplingConfig(temperature=0.5, top_k=4, top_p=0.9)
  draw = jax.jit(jax.vmap(lambda k: rollout.sample(logits, k[None], cfg)))
  toks, logp = draw(keys)
  # Brute force: tempered probs, top 4, then the smallest prefix with mass >= 0.9, renormalised.
  p = np.exp(np.asarray(logits[0]) / 0.5)
  p[4] = 0
  p /= p.sum()
  keep = np.cumsum(p) - p < 0.9
  ref = np.where(keep, p, 0)
  ref /= ref.sum()
  freq = np.bincount(np.asarray(toks).ravel(), minlength=5) / n
  np.testing.assert_allclose(freq, ref, atol=0.01)
  np.testing.assert_allclose(np.exp(np.asarray(logp).ravel()), ref[np.asarray(toks).ravel()],
                             rtol=1e-5)


@pytest.mark.parametrize("shape,tp,slots", [((8, 1, 1), 0, 0), ((2, 2, 2), 0, 8),
                                            ((1, 4, 2), 0, 0), ((1, 8, 1), 2, 0)])
def test_sharded_rollout_equals_single_device(models, shape, tp, slots):
  """tp > 0: the rollout's own layout (sharding.ROLLOUT_RULES on groups of tp devices): heads,
  MLP and vocabulary split, so sampling, log-softmax and KL reduce over a split vocabulary.
  slots: 16 rollouts through 8 sharded slots (refill groups of 4 rows)."""
  prompts = PROMPTS * 2  # 16 rows: compaction to 8 keeps a multiple of the batch shards
  ref = _run(models, _cfg(kat={"min_len": 4}, max_new_tokens=24), key=9, tau=1.2,
             prompts=prompts)
  cfg = _cfg(kat={"min_len": 4}, max_new_tokens=24, slots=slots)
  mesh = sharding.make_mesh(shape)
  rules = sharding.DEFAULT_RULES
  if tp:
    mesh, rules = sharding.rollout_mesh(mesh, tp), sharding.ROLLOUT_RULES
  s_m = sharding.relayout(_model(0, VOCAB, 32, 2), mesh, rules)
  t_m = sharding.relayout(_model(1, 40, 48, 3, family="qwen2"), mesh, rules)
  assert len(t_m.layers[0].mlp.up_proj[...].sharding.device_set) == 8
  if tp:  # the LM head split over the vocabulary, the embedding dimension whole
    assert tuple(t_m.lm_head[...].sharding.spec) == (None, "tensor")
  p, start = _prompts(prompts)
  p = jax.device_put(p, sharding.batch_sharding(mesh, 2))
  start = jax.device_put(start, sharding.batch_sharding(mesh, 1))
  res = jax.device_get(rollout.rollout(s_m, t_m, p, start, jax.random.key(9), cfg, tau=1.2,
                                       batch_multiple=sharding.batch_shards(mesh)))
  for name in ("tokens_BxT", "length_B", "terminated_B", "detect_B", "onset_B"):
    np.testing.assert_array_equal(getattr(res, name), getattr(ref, name), err_msg=name)
  for name in ("logp_student_BxT", "logp_teacher_BxT", "kl_BxT"):
    np.testing.assert_allclose(getattr(res, name), getattr(ref, name), atol=1e-5, err_msg=name)
  assert ref.terminated_B.any()


def test_student_only_generate_draws_the_rollout_tokens(models):
  student, _ = models
  cfg = _cfg(kat={"mode": "none"})
  res = _run(models, cfg, key=11)
  p, start = _prompts()
  tokens, length = rollout.generate(student, p, start, jax.random.key(11), max_new_tokens=24,
                                    eos_ids=EOS, pad_id=PAD, vocab_size=VOCAB)
  np.testing.assert_array_equal(np.asarray(length), res.length_B)
  np.testing.assert_array_equal(np.asarray(tokens), res.tokens_BxT[:, :24])
  # Filled-length buckets (4, 8, 16, 24 new tokens: four loops in one program): the same draws.
  tokens, length = rollout.generate(student, p, start, jax.random.key(11), max_new_tokens=24,
                                    eos_ids=EOS, pad_id=PAD, vocab_size=VOCAB, length_bucket=4)
  np.testing.assert_array_equal(np.asarray(length), res.length_B)
  np.testing.assert_array_equal(np.asarray(tokens), res.tokens_BxT[:, :24])


def test_attention_reads_only_the_attended_prefix(models):
  """decode(..., attend=L) must not touch slots >= L: NaN there leaves its output finite (and
  equal to the whole-cache result on a clean cache), while the whole-cache decode turns NaN."""
  student, _ = models
  p, start = _prompts()
  cache = student.init_cache(8, 40, jnp.asarray(start))
  decode = nnx.jit(lambda m, t, c, attend=None: m.decode(t, c, attend=attend),
                   static_argnames="attend")
  _, cache = decode(student, jnp.asarray(p), cache)
  tok = jnp.full((8, 2), 5, jnp.int32)
  ref, _ = decode(student, tok, cache)
  poison = lambda a: a.at[:, :, 16:].set(jnp.nan)  # noqa: E731
  dirty = cache.replace(k=tuple(map(poison, cache.k)), v=tuple(map(poison, cache.v)))
  got, _ = decode(student, tok, dirty, attend=16)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  assert np.isnan(np.asarray(decode(student, tok, dirty)[0])).all()


def test_length_buckets_do_not_change_results(models):
  """length_bucket=4: the loop attends over 4, 8, 16, then 32 new-token slots, a separate
  compiled loop each; the samples and KAT's decisions are those of the whole-cache loop."""
  cfg = _cfg(kat={"min_len": 4}, max_new_tokens=32, length_bucket=4)
  assert cfg.fill_buckets == (4, 8, 16, 32)
  sched = rollout.Schedule()
  s, t = models
  p, start = _prompts()
  a = jax.device_get(rollout.rollout(s, t, p, start, jax.random.key(5), cfg, tau=1.2,
                                     schedule=sched))
  b = _run(models, _cfg(kat={"min_len": 4}, max_new_tokens=32, length_bucket=0), key=5, tau=1.2)
  assert a.terminated_B.any() and sched.exits >= 4  # bucket exits (and compaction) happened
  for name in ("tokens_BxT", "length_B", "eos_B", "terminated_B", "detect_B", "trained_len_B"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  for name in ("logp_student_BxT", "logp_teacher_BxT", "logp_behavior_BxT", "kl_BxT"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5, err_msg=name)


def test_slot_refill_draws_the_same_rollouts(models):
  """16 rollouts through 4 slots (finished rows' slots take the next prompts) against one slot
  per rollout: each rollout keeps its own keys and clock, so tokens and KAT's decisions are the
  same; the schedule runs every rollout once, never two in one slot at a time."""
  prompts = PROMPTS * 2
  probe = np.arange(16) % 5 == 0  # probe rows: cut recorded, generation goes on
  s, t = models
  p, start = _prompts(prompts)
  kw = dict(kat={"min_len": 4}, max_new_tokens=32, length_bucket=8)
  run = lambda cfg, sched=None: jax.device_get(rollout.rollout(  # noqa: E731
      s, t, p, start, jax.random.key(3), cfg, tau=1.2, probe_B=probe, schedule=sched))
  ref = run(_cfg(**kw))
  sched = rollout.Schedule()
  got = run(_cfg(slots=4, compact_multiple=1, **kw), sched)
  assert ref.terminated_B.any() and (ref.length_B < 32).any()
  for name in ("tokens_BxT", "length_B", "eos_B", "terminated_B", "detect_B", "onset_B",
               "trained_len_B", "loss_mask_BxT", "window_complete_BxN", "probe_B"):
    np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
  for name in ("logp_student_BxT", "logp_teacher_BxT", "logp_behavior_BxT", "kl_BxT",
               "window_mean_BxN"):
    np.testing.assert_allclose(getattr(got, name), getattr(ref, name), atol=1e-5, err_msg=name)
  assert sorted(sched.row) == list(range(16)) and set(sched.slot) == {0, 1, 2, 3}
  for slot in range(4):
    spans = sorted((b, e) for sl, b, e in zip(sched.slot, sched.begin, sched.end) if sl == slot)
    assert all(e1 <= b2 for (_, e1), (b2, _) in zip(spans, spans[1:])), spans
  # Each rollout occupied its slot for the windows it generated in.
  windows = -(-np.asarray(got.length_B) // 4)
  np.testing.assert_array_equal(np.asarray(sched.end) - sched.begin, windows[sched.row])


def test_refill_groups_never_start_more_rollouts_than_remain(models):
  """No EOS (every row runs to max length, so all 4 slots free at once), refill groups of 2,
  7 rollouts: the 3 left after the first 4 go in as a group of 2, then one of 1 -- never a
  group reaching past the last rollout."""
  s, t = models
  prompts = PROMPTS[:7]
  p, start = _prompts(prompts)
  cfg = rollout.RolloutConfig(max_new_tokens=8, eos_ids=(VOCAB,), pad_id=PAD, vocab_size=VOCAB,
                              kat=kat.KATConfig(mode="none", window=4), compact_multiple=2)
  ref = jax.device_get(rollout.rollout(s, t, p, start, jax.random.key(4), cfg))
  sched = rollout.Schedule()
  got = jax.device_get(rollout.rollout(s, t, p, start, jax.random.key(4),
                                       dataclasses.replace(cfg, slots=4), schedule=sched))
  assert sorted(sched.row) == list(range(7))
  np.testing.assert_array_equal(got.tokens_BxT, ref.tokens_BxT)
  np.testing.assert_array_equal(got.length_B, np.full(7, 8))
