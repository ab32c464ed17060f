"""The per-device memory plan against XLA's compiled memory analysis, and the refusal path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kat_jax import kat, memory, opd, rollout, sharding
from kat_jax.models import ConfigError, ModelConfig, Transformer


def _cfg(hidden, layers, vocab, inter, heads=4, kv=2):
  return ModelConfig(family="qwen3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=16,
                     qk_norm=True, tie_embeddings=False, eos_token_ids=(vocab - 1,))


def _compiled(s_cfg, t_cfg, batch, prompt, new, window, objective, mesh=None, microbatches=1,
              chunk=0, attn_chunk=0):
  """(decode loop bytes, update bytes) per device from the compiled executables."""
  s, t = Transformer(s_cfg, rngs=nnx.Rngs(0)), Transformer(t_cfg, rngs=nnx.Rngs(1))
  s.attn_chunk = t.attn_chunk = attn_chunk
  v = s_cfg.vocab_size
  p, start = jnp.zeros((batch, prompt), jnp.int32), jnp.zeros((batch,), jnp.int32)
  if mesh is not None:  # as train does: the rollout (and the teacher) in the rollout layout
    tp = sharding.resolve_rollout_tensor(0, mesh, [s_cfg, t_cfg])
    r_mesh = sharding.rollout_mesh(mesh, tp)
    sharding.shard_model(s, mesh)
    s_r = sharding.relayout(s, r_mesh, sharding.ROLLOUT_RULES)
    t = sharding.relayout(t, r_mesh, sharding.ROLLOUT_RULES)
    p, start = sharding.put_batch(p, mesh), sharding.put_batch(start, mesh)
  else:
    s_r = s
  cfg = rollout.RolloutConfig(max_new_tokens=new, eos_ids=(v - 1,), pad_id=0, vocab_size=v,
                              kat=kat.KATConfig(mode="none", window=window), compact_multiple=-1)
  sg, sp = nnx.split(s_r)
  tg, tp = nnx.split(t)
  probe = jnp.zeros((batch,), bool)
  if mesh is not None:
    probe = sharding.put_batch(np.zeros((batch,), bool), r_mesh)
  state = rollout.prefill(sg, sp, tg, tp, p, start, probe, jax.random.key(0), 0.0,
                           float("inf"), cfg=cfg)
  loop = rollout.decode_loop.lower(sg, sp, tg, tp, state, jnp.int32(0),
                                    cfg=cfg).compile().memory_analysis()
  res = rollout.rollout(s_r, t, p, start, jax.random.key(0), cfg)
  if mesh is not None:
    res = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)), res)
  tx = opd.make_optimizer(opd.OptimConfig(learning_rate=1e-3))
  sgp, spp = nnx.split(s, nnx.Param)
  upd = opd.update.lower(sgp, spp, tg, tp, tx.init(spp), p, start, res, tx=tx,
                         cfg=opd.LossConfig(objective=objective, vocab_size=v,
                                            microbatches=microbatches, chunk=chunk)
                         ).compile().memory_analysis()
  loop_bytes = loop.argument_size_in_bytes + loop.temp_size_in_bytes
  upd_bytes = (upd.argument_size_in_bytes + upd.temp_size_in_bytes + upd.output_size_in_bytes
               - upd.alias_size_in_bytes)
  return loop_bytes, upd_bytes


@pytest.mark.parametrize("objective,mesh_shape,micro,chunk,attn_chunk", [
    ("sampled_pg", (1, 1, 1), 1, 0, 0), ("reverse_kl", (1, 1, 1), 1, 0, 0),
    ("sampled_pg", (1, 1, 1), 4, 0, 0), ("reverse_kl", (1, 1, 1), 1, 16, 0),
    ("sampled_pg", (1, 1, 1), 1, 0, 32), ("sampled_pg", (2, 2, 2), 1, 0, 0)])
def test_plan_within_20_percent_of_compiled_memory(objective, mesh_shape, micro, chunk,
                                                   attn_chunk):
  s_cfg, t_cfg = _cfg(128, 3, 1024, 512), _cfg(192, 2, 1024, 768)
  batch, prompt, new, window = 16, 32, 80, 8
  mesh = None if mesh_shape == (1, 1, 1) else sharding.make_mesh(mesh_shape)
  loop, upd = _compiled(s_cfg, t_cfg, batch, prompt, new, window, objective, mesh, micro, chunk,
                        attn_chunk)
  tp = 0 if mesh is None else sharding.resolve_rollout_tensor(0, mesh, [s_cfg, t_cfg])
  p = memory.plan(s_cfg, t_cfg, mesh_shape, batch=batch, prompt_len=prompt, max_new_tokens=new,
                  window=window, vocab=1024, objective=objective, microbatches=micro,
                  loss_chunk=chunk, attn_chunk=attn_chunk, rollout_tensor_parallel=tp)
  # The decode loop holds params (the rollout's), caches and buffers -- not the optimizer state
  # nor the training-layout student, which the plan's rollout phase counts because they stay
  # resident on the device during the rollout.
  rollout_planned = p.rollout_phase - p.items["optimizer (AdamW)"]
  if "student params (rollout copy)" in p.items:
    rollout_planned -= p.items["student params"]
  assert abs(rollout_planned / loop - 1) < 0.2, (rollout_planned, loop)
  assert abs(p.update_phase / upd - 1) < 0.2, (p.update_phase, upd)


def test_param_bytes_follow_the_sharding_rules():
  cfg = _cfg(128, 2, 1024, 512, heads=4, kv=2)
  full = memory.param_bytes(cfg, (1, 1, 1), 4)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))))
  assert full == n * 4
  # fsdp=4 splits every tensor with an `embed` dim; norms ([embed]) too; nothing stays whole
  # except the per-head q/k norms ([head_dim]).
  assert memory.param_bytes(cfg, (1, 4, 1), 4) == pytest.approx(full / 4, rel=0.01)
  # 2 kv heads on a 4-way tensor axis: k/v projections replicate over it (rules skip it).
  assert memory.param_bytes(cfg, (1, 1, 4), 4) > full / 4


def test_planned_optimizer_state_is_the_real_one_with_accumulation():
  """AdamW's moments, plus with accumulation the fp32 gradient sum -- also for a bf16 student."""
  from kat_jax import opd
  cfg = _cfg(128, 2, 1024, 512)
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  for dtype, nbytes in ((jnp.float32, 4), (jnp.bfloat16, 2)):
    typed = jax.tree.map(lambda x: x.astype(dtype), params)
    for k in (1, 3):
      tx = opd.make_optimizer(opd.OptimConfig(accumulation_steps=k))
      state = jax.eval_shape(tx.init, typed)
      real = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
      p = memory.plan(cfg, cfg, (1, 1, 1), batch=8, prompt_len=8, max_new_tokens=8, window=8,
                      vocab=1024, param_bytes_s=nbytes, accumulation_steps=k)
      assert abs(p.items["optimizer (AdamW)"] / real - 1) < 0.001, (dtype, k)


def test_a_run_that_cannot_fit_is_refused_with_a_mesh_that_does(tmp_path):
  from kat_jax.config import defaults
  c = defaults()
  c.student, c.teacher = "/models/Qwen3-1.7B", "/models/Qwen3-8B"  # known architectures
  c.prompts_per_step, c.samples_per_prompt, c.max_new_tokens = 8, 1, 256
  c.max_prompt_len, c.kat.window = 64, 32
  gib = memory.GiB
  with pytest.raises(ConfigError) as e:
    memory.check(c, (8, 1, 1), 8, 24 * gib, accelerator=True)
  first = str(e.value).splitlines()[0]
  assert first.startswith("config.mesh=(8, 1, 1): the run needs")
  assert "--config.mesh.data=" in first and "--config.mesh.fsdp=" in first
  suggested = [int(x.split("=")[1]) for x in first.split() if x.startswith("--config.mesh.")]
  assert memory.for_config(c, tuple(suggested), 24 * gib, True).fits
  with pytest.raises(ConfigError, match="no \\(data, fsdp, tensor\\) mesh of these devices fits"):
    memory.check(c, (8, 1, 1), 8, 2 * gib, accelerator=True)


def test_query_chunked_attention_is_exact_and_planned():
  """attn_chunk: the same loss and gradient, and much less compiled memory (the plan's side is
  in test_plan_within_20_percent_of_compiled_memory)."""
  import numpy as np
  cfg = _cfg(64, 3, 256, 128)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (8, 200), 0, 255)
  attn = jnp.arange(200)[None, :] >= jnp.array([0, 3, 0, 7, 0, 0, 1, 0])[:, None]

  def loss(params, graph):
    return jnp.mean(nnx.merge(graph, params)(ids, attn) ** 2)

  out, temp = {}, {}
  for chunk in (0, 64):  # 200 positions: 4 chunks, the last one padded
    model.attn_chunk = chunk
    graph, params = nnx.split(model)
    f = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    out[chunk] = f(params, graph)
    temp[chunk] = f.lower(params, graph).compile().memory_analysis().temp_size_in_bytes
  assert float(out[64][0]) == pytest.approx(float(out[0][0]), rel=1e-6)
  for a, b in zip(jax.tree.leaves(out[64][1]), jax.tree.leaves(out[0][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # Chunking drops most of the [B, H, S, S] fp32 score buffers the backward keeps per layer
  # (the unchunked run keeps >= one copy of every layer's; a chunked one, one chunk's).
  scores = cfg.num_layers * 8 * cfg.num_heads * 200 * 200 * 4
  assert temp[0] - temp[64] > 0.6 * scores, (temp, scores)


def test_scan_plans_the_stacked_block_params():
  """scan_layers stacks the blocks' params (and their gradient) for the student, and for the
  teacher when a full-vocabulary objective runs its forward in the update."""
  s_cfg, t_cfg = _cfg(128, 3, 1024, 512), _cfg(192, 2, 1024, 768)
  kw = dict(batch=8, prompt_len=16, max_new_tokens=32, window=8, vocab=1024, scan_layers=True)
  # Untied models on one device: all params minus embedding, LM head and final norm, fp32.
  blocks = lambda c: memory.param_bytes(c, (1, 1, 1), 4) - (2 * 1024 + 1) * c.hidden_size * 4  # noqa: E731
  pg = memory.plan(s_cfg, t_cfg, (1, 1, 1), **kw)
  assert pg.items["stacked layers (scan)"] == 2 * blocks(s_cfg)
  kl = memory.plan(s_cfg, t_cfg, (1, 1, 1), objective="reverse_kl", **kw)
  assert kl.items["stacked layers (scan)"] == 2 * blocks(s_cfg) + blocks(t_cfg)
  assert "stacked layers (scan)" not in memory.plan(s_cfg, t_cfg, (1, 1, 1), **{
      **kw, "scan_layers": False}).items
