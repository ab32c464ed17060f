"""One OPD update wired to a real rollout: alignment, learning signal, non-finite skip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kat_jax import kat, opd, rollout
from test_rollout import EOS, PAD, PROMPTS, VOCAB, _model


def _setup(objective, teacher=None, lr=1e-3, kat_mode="none"):
  student = _model(0, VOCAB, 32, 2)
  teacher = teacher or _model(1, 40, 48, 3, family="qwen2")
  cfg = rollout.RolloutConfig(max_new_tokens=16, eos_ids=EOS, pad_id=PAD, vocab_size=VOCAB,
                              kat=kat.KATConfig(mode=kat_mode, window=4, patience=2, min_len=4),
                              compact_multiple=-1)
  p, start = rollout.pad_prompts(PROMPTS, PAD)
  res = rollout.rollout(student, teacher, p, start, jax.random.key(0), cfg, tau=2.0)
  tx = opd.make_optimizer(opd.OptimConfig(learning_rate=lr, clip_norm=0.0))
  s_graph, s_params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  loss_cfg = opd.LossConfig(objective=objective, vocab_size=VOCAB)
  opt_state = tx.init(s_params)

  def step(s_params, opt_state):
    return opd.update(s_graph, s_params, t_graph, t_params, opt_state, jnp.asarray(p),
                      jnp.asarray(start), res, tx=tx, cfg=loss_cfg)

  return res, s_params, opt_state, step


def test_on_policy_sampled_pg_loss_is_mean_rollout_logratio():
  # At the rollout's own params the ratio is 1, so the loss equals the masked mean of
  # log p_s - log p_t from the rollout -- only if the training forward lines up token for token.
  res, s_params, opt_state, step = _setup("sampled_pg", kat_mode="kat")
  assert np.asarray(res.terminated_B).any(), "some rows should have a KAT-cut tail"
  mask = np.asarray(res.loss_mask_BxT)
  expected = np.asarray(res.logratio_BxT)[mask].mean()
  _, _, metrics = step(s_params, opt_state)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4, atol=1e-5)
  assert int(metrics["trained_tokens"]) == mask.sum() and not bool(metrics["skipped"])


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd"])
def test_updates_reduce_the_divergence_on_a_fixed_batch(objective):
  res, s_params, opt_state, step = _setup(objective, lr=1e-2)
  seen = []
  for _ in range(6):
    s_params, opt_state, metrics = step(s_params, opt_state)
    seen.append(float(metrics["loss"]))
  assert all(b < a for a, b in zip(seen, seen[1:])) and seen[-1] < 0.8 * seen[0], seen


def test_non_finite_update_is_skipped():
  bad = _model(1, 40, 48, 3, family="qwen2")
  bad.layers[0].mlp.up_proj[...] = bad.layers[0].mlp.up_proj[...] * jnp.nan
  res, s_params, opt_state, step = _setup("reverse_kl", teacher=bad)
  before = jax.tree.map(np.asarray, s_params)
  new_params, _, metrics = step(s_params, opt_state)
  assert bool(metrics["skipped"]) and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_params), before)


def test_microbatched_and_chunked_update_equals_the_full_batch():
  """loss.microbatches (rows) and loss.chunk (positions) split the update into scans: the same
  loss, gradient norm and new params as the whole batch at once."""
  from kat_jax.models import ModelConfig, Transformer
  cfg = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                    tie_embeddings=False, eos_token_ids=(63,))
  s, t = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
  prompt = jax.random.randint(jax.random.key(0), (8, 6), 1, 60)
  start = jax.numpy.array([0, 1, 2, 0, 3, 0, 1, 0])
  rcfg = rollout.RolloutConfig(max_new_tokens=12, eos_ids=(63,), pad_id=0, vocab_size=64,
                               kat=kat.KATConfig(window=4, patience=1, min_len=4))
  res = rollout.rollout(s, t, prompt, start, jax.random.key(1), rcfg, tau=2.0)
  # Non-uniform loss weights (a weighting policy's) travel through the row and position chunks.
  res = res.replace(loss_weight_BxT=res.loss_weight_BxT * jax.random.uniform(
      jax.random.key(2), res.loss_weight_BxT.shape, minval=0.5, maxval=1.5))
  # SGD with lr 1: new params = params - gradient, so equal params mean equal gradients (Adam's
  # first step, ~lr * sign(g), would only compare signs).
  tx = optax.sgd(1.0)
  sg, sp = nnx.split(s, nnx.Param)
  tg, tp = nnx.split(t)
  out = {}
  for objective in ("sampled_pg", "reverse_kl"):
    for m, chunk in ((1, 0), (4, 4)):
      lc = opd.LossConfig(objective=objective, vocab_size=64, microbatches=m, chunk=chunk)
      params, _, metrics = opd.update(sg, jax.tree.map(lambda x: x.copy(), sp), tg, tp,
                                      tx.init(sp), prompt, start, res, tx=tx, cfg=lc)
      out[objective, m] = (jax.device_get(params), float(metrics["loss"]),
                           float(metrics["grad_norm"]))
    full, micro = out[objective, 1], out[objective, 4]  # 4 row chunks x 3 position chunks
    np.testing.assert_allclose(micro[1], full[1], rtol=1e-5)
    np.testing.assert_allclose(micro[2], full[2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro[0]), jax.tree.leaves(full[0])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert res.terminated_B.any()  # KAT-cut rows are part of the split batch


@pytest.mark.parametrize("remat", [False, True])
def test_scan_over_layers_equals_the_unrolled_update(remat):
  """scan_layers (one compiled block, params stacked over layers) changes compile time only:
  the same loss, gradient and new params as the unrolled layers, with remat and query chunks,
  for the student's backward and the teacher's scoring forward."""
  from kat_jax.models import ModelConfig, Transformer
  cfg = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                    tie_embeddings=False, eos_token_ids=(63,))
  s, t = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
  prompt = jax.random.randint(jax.random.key(0), (4, 6), 1, 60)
  start = jax.numpy.array([0, 1, 2, 0])
  rcfg = rollout.RolloutConfig(max_new_tokens=8, eos_ids=(63,), pad_id=0, vocab_size=64)
  res = rollout.rollout(s, t, prompt, start, jax.random.key(1), rcfg, tau=2.0)
  tx = optax.sgd(1.0)  # new params = params - gradient
  lc = opd.LossConfig(objective="reverse_kl", vocab_size=64)
  out = {}
  for scan in (False, True):
    for m in (s, t):
      m.attn_chunk, m.scan_layers = 5, scan
    s.remat = remat  # the student's backward (train sets remat on the student only)
    sg, sp = nnx.split(s, nnx.Param)
    tg, tp = nnx.split(t)
    params, _, metrics = opd.update(sg, jax.tree.map(lambda x: x.copy(), sp), tg, tp,
                                    tx.init(sp), prompt, start, res, tx=tx, cfg=lc)
    out[scan] = jax.device_get(params), float(metrics["loss"]), float(metrics["grad_norm"])
    # The scanned forward really is one loop over the 3 blocks (and the unrolled one is not).
    jaxpr = str(jax.make_jaxpr(lambda ids: t.hidden(ids))(prompt))
    assert ("length=3" in jaxpr and "scan[" in jaxpr) == scan
  np.testing.assert_allclose(out[True][1], out[False][1], rtol=1e-5)
  np.testing.assert_allclose(out[True][2], out[False][2], rtol=1e-5)
  assert out[False][2] > 0
  for a, b in zip(jax.tree.leaves(out[True][0]), jax.tree.leaves(out[False][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_auto_microbatches_pick_the_smallest_cache_sized_chunks():
  """loss.microbatches=0: on CPU the most row chunks whose per-device rows still hold
  CPU_MICROBATCH_TOKENS tokens (the same rows from every batch shard); 1 on GPU / TPU; an
  explicit count is kept. Checked against a brute-force reading of that rule."""
  from kat_jax import opd
  budget = opd.CPU_MICROBATCH_TOKENS

  def brute(batch, seq, shards):
    if batch % shards:
      return 1
    local = batch // shards
    counts = [m for m in range(1, local + 1) if local % m == 0
              and (local // m) * seq >= budget]
    return max(counts, default=1)

  for batch in (1, 4, 8, 12, 16, 32, 64, 96):
    for seq in (24, 64, 160, 288, 1024, 4096):
      for shards in (1, 2, 8):
        got = opd.resolve_microbatches(0, batch, seq, shards, backend="cpu")
        assert got == brute(batch, seq, shards), (batch, seq, shards, got)
        assert batch % (got * shards) == 0 or batch % shards
        assert opd.resolve_microbatches(0, batch, seq, shards, backend="gpu") == 1
        assert opd.resolve_microbatches(3, batch, seq, shards, backend="cpu") == 3
  assert opd.resolve_microbatches(0, 32, 160, backend="cpu") == 8  # the bench: 4 rows = 640


def test_trimmed_update_equals_the_full_length_one():
  """opd.trim cuts the per-token arrays to the longest trained row (a power of two of windows):
  the update's loss, gradient norm and new params are those of the untrimmed rollout."""
  student = _model(0, VOCAB, 32, 2)
  teacher = _model(1, 40, 48, 3, family="qwen2")
  p, start = rollout.pad_prompts(PROMPTS, PAD)
  # Plain SGD with lr 1: new params = params - gradient, so comparing params compares gradients
  # (Adam's first step, ~lr * sign(g), would blow up rounding differences of near-zero entries).
  tx = optax.sgd(1.0)
  s_graph, s_params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  # min_len 4, patience 1 and a huge tau: every row is stopped at its first window (onset cut),
  # so at most 4 of the 16 buffer positions are trained.
  cfg = rollout.RolloutConfig(max_new_tokens=16, eos_ids=EOS, pad_id=PAD, vocab_size=VOCAB,
                              kat=kat.KATConfig(window=4, patience=1, min_len=4))
  res = rollout.rollout(student, teacher, p, start, jax.random.key(0), cfg, tau=1e9)
  longest = int(np.max(res.trained_len_B))
  assert 0 < longest <= 4 and res.tokens_BxT.shape[1] == 16
  short = opd.trim(res, window=4)
  assert short.tokens_BxT.shape[1] == 4 and short.loss_mask_BxT.shape[1] == 4
  assert opd.trim(res, window=4, chunk=8).tokens_BxT.shape[1] == 4  # within one loss chunk
  out = []
  for objective in ("sampled_pg", "reverse_kl"):
    lc = opd.LossConfig(objective=objective, vocab_size=VOCAB)
    for r in (res, short):
      params, _, m = opd.update(s_graph, jax.tree.map(lambda x: x.copy(), s_params), t_graph,
                                t_params, tx.init(s_params), jnp.asarray(p), jnp.asarray(start),
                                r, tx=tx, cfg=lc)
      out.append((jax.device_get(params), float(m["loss"]), float(m["grad_norm"])))
    (full_p, full_l, full_g), (cut_p, cut_l, cut_g) = out[-2:]
    assert full_g > 0
    np.testing.assert_allclose(cut_l, full_l, rtol=1e-5)
    np.testing.assert_allclose(cut_g, full_g, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(cut_p), jax.tree.leaves(full_p)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Lengths: window multiples doubling from ~1/8 of the buffer, never past it; past one loss
  # chunk, whole chunks.
  def fake(longest, t):
    pad = lambda x: jnp.pad(x, ((0, 0), (0, t - x.shape[1])))  # noqa: E731
    return res.replace(trained_len_B=jnp.full_like(res.trained_len_B, longest),
                       **{f: pad(getattr(res, f)) for f in opd._PER_TOKEN})

  for t, window, chunk, cases in (
      (16, 4, 0, ((1, 4), (4, 4), (5, 8), (8, 8), (9, 16), (16, 16))),
      (256, 4, 0, ((1, 32), (32, 32), (33, 64), (100, 128), (200, 256))),
      (24, 3, 4, ((1, 3), (4, 6 + 2), (7, 12), (13, 24))),
      (256, 4, 512, ((1, 32), (100, 128)))):
    for longest, want in cases:
      got = opd.trim(fake(longest, t), window, chunk)
      assert got.tokens_BxT.shape[1] == want, (t, window, chunk, longest)
      assert got.loss_mask_BxT.shape[1] == want and want >= longest
      assert not chunk or want <= chunk or want % chunk == 0


def test_eos_is_trained_when_pad_equals_eos():
  """The fused rollout with pad id == an EOS id (as many checkpoints ship): the EOS token that
  ends a row is in the loss mask -- masks come from lengths, not ids -- and carries its term."""
  student = _model(0, VOCAB, 32, 2)
  teacher = _model(1, 40, 48, 3, family="qwen2")
  pad = EOS[0]
  cfg = rollout.RolloutConfig(max_new_tokens=16, eos_ids=EOS, pad_id=pad, vocab_size=VOCAB,
                              kat=kat.KATConfig(mode="none", window=4), compact_multiple=-1)
  p, start = rollout.pad_prompts(PROMPTS, pad)
  res = jax.device_get(rollout.rollout(student, teacher, p, start, jax.random.key(3), cfg))
  rows = np.flatnonzero(res.eos_B)
  last = res.length_B[rows] - 1
  assert len(rows) >= 2 and np.isin(res.tokens_BxT[rows, last], EOS).all()
  assert (res.tokens_BxT[rows, last] == pad).any(), "some row must end with the pad-valued EOS"
  assert res.loss_mask_BxT[rows, last].all()
  np.testing.assert_array_equal(res.loss_mask_BxT.sum(1), res.length_B)
  assert np.abs(res.logratio_BxT[rows, last]).sum() > 1e-3  # the EOS terms are not zero
  # On-policy sampled_pg = the masked mean log-ratio, EOS positions included.
  s_graph, s_params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  tx = optax.sgd(1.0)
  _, _, m = opd.update(s_graph, s_params, t_graph, t_params, tx.init(s_params), jnp.asarray(p),
                       jnp.asarray(start), jax.tree.map(jnp.asarray, res), tx=tx,
                       cfg=opd.LossConfig(vocab_size=VOCAB))
  gen = np.arange(res.tokens_BxT.shape[1])[None, :] < res.length_B[:, None]
  np.testing.assert_allclose(float(m["loss"]), res.logratio_BxT[gen].mean(), rtol=1e-4, atol=1e-5)


def test_a_step_without_trained_tokens_leaves_params_and_optimizer_unchanged():
  """Every row cut at 0: no signal, so Adam's momentum from earlier steps must not move the
  params either; reported as `empty`, not as a non-finite skip."""
  res, s_params, opt_state, step = _setup("sampled_pg", lr=1e-2)
  s_params, opt_state, m = step(s_params, opt_state)  # momentum is now non-zero
  assert not bool(m["empty"])
  before = jax.tree.map(np.asarray, (s_params, opt_state))
  empty = res.replace(loss_mask_BxT=jnp.zeros_like(res.loss_mask_BxT),
                      trained_len_B=jnp.zeros_like(res.trained_len_B))
  p, start = rollout.pad_prompts(PROMPTS, PAD)
  student = _model(0, VOCAB, 32, 2)
  teacher = _model(1, 40, 48, 3, family="qwen2")
  s_graph, _ = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  tx = opd.make_optimizer(opd.OptimConfig(learning_rate=1e-2, clip_norm=0.0))
  new_params, new_opt, m = opd.update(s_graph, s_params, t_graph, t_params, opt_state,
                                      jnp.asarray(p), jnp.asarray(start), empty, tx=tx,
                                      cfg=opd.LossConfig(vocab_size=VOCAB))
  assert bool(m["empty"]) and not bool(m["skipped"]) and int(m["trained_tokens"]) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, (new_params, new_opt)),
               before)


def test_accumulation_is_token_weighted():
  """Two accumulated steps -- one row's tokens, then the other seven rows' -- apply the gradient
  of the whole batch (sum over tokens / all tokens), not the mean of the two per-step means."""
  res, s_params, _, _ = _setup("reverse_kl", kat_mode="none")
  p, start = rollout.pad_prompts(PROMPTS, PAD)
  student = _model(0, VOCAB, 32, 2)
  teacher = _model(1, 40, 48, 3, family="qwen2")
  s_graph, _ = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  cfg = opd.LossConfig(objective="reverse_kl", vocab_size=VOCAB)
  one = np.arange(len(PROMPTS)) == 0
  parts = [res.replace(loss_mask_BxT=res.loss_mask_BxT & jnp.asarray(rows)[:, None])
           for rows in (one, ~one)]
  counts = [int(np.asarray(r.loss_mask_BxT).sum()) for r in parts]
  assert counts[0] * 3 < counts[1]  # very different token counts
  args = (jnp.asarray(p), jnp.asarray(start))

  def run(tx, results):
    params, state = jax.tree.map(lambda x: x.copy(), s_params), tx.init(s_params)
    for r in results:
      params, state, _ = opd.update(s_graph, params, t_graph, t_params, state, *args, r, tx=tx,
                                    cfg=cfg)
    return jax.device_get(params)

  sgd = optax.sgd(1.0)
  whole = run(sgd, [res])
  accumulated = run(opd.token_weighted_accumulation(sgd, 2), parts)
  first_only = run(opd.token_weighted_accumulation(sgd, 2), parts[:1])
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Between applications the params do not move.
  for a, c in zip(jax.tree.leaves(first_only), jax.tree.leaves(jax.device_get(s_params))):
    np.testing.assert_array_equal(a, c)


def test_schedules_count_training_steps_under_accumulation():
  """cosine over total_steps=8 training steps with accumulation 2: the 4 applied updates use the
  rates of training steps 0, 2, 4, 6 (b1 = b2 = 0 makes each Adam step lr * sign(g))."""
  cfg = opd.OptimConfig(learning_rate=1.0, schedule="cosine", total_steps=8, clip_norm=0.0,
                        accumulation_steps=2, b1=0.0, b2=0.0)
  tx = opd.make_optimizer(cfg)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  moves = []
  for _ in range(8):
    updates, state = tx.update({"w": jnp.ones(())}, state, params, num_tokens=5)
    moves.append(-float(updates["w"]))
  want = [0.5 * (1 + np.cos(np.pi * s / 8)) for s in (0, 2, 4, 6)]
  np.testing.assert_allclose(moves[1::2], want, rtol=1e-5)
  assert moves[0::2] == [0.0] * 4
  # bf16 params (the accelerator default): sums stay fp32, updates come back in bf16.
  bf16 = {"w": jnp.zeros((3,), jnp.bfloat16)}
  state = tx.init(bf16)
  for _ in range(2):
    updates, state = tx.update({"w": jnp.full((3,), 1e-3, jnp.bfloat16)}, state, bf16,
                               num_tokens=7)
  assert updates["w"].dtype == jnp.bfloat16 and float(updates["w"][0]) < 0
