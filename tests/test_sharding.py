"""Two-model sharding on meshes of 8 fake CPU devices: a training step (rollout + update) and the
training loop give the same tokens, loss and params as one device."""

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from kat_jax import hf, kat, opd, rollout, sharding, train
from kat_jax.data import arith

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import make_models, tiny_config  # noqa: E402

MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return make_models(tmp_path_factory.mktemp("models"))


def _step(student_dir, teacher_dir, mesh, microbatches=0, hlo=None):
  """One OPD step: fused rollout with KAT, then one update; returns host copies (and the
  update's compiled HLO text in `hlo`, a list, when given)."""
  student, _ = hf.load(student_dir, mesh=mesh)
  teacher, _ = hf.load(teacher_dir, mesh=mesh)
  prompts = [arith.encode(arith.make_problem(0, i)[0]) for i in range(16)]
  prompt, start = rollout.pad_prompts(prompts, arith.PAD_ID)
  multiple = 1
  if mesh is not None:
    prompt, start = sharding.put_batch(prompt, mesh), sharding.put_batch(start, mesh)
    multiple = sharding.batch_shards(mesh)
  cfg = rollout.RolloutConfig(max_new_tokens=16, eos_ids=(arith.EOS_ID,), pad_id=arith.PAD_ID,
                              vocab_size=len(arith.VOCAB),
                              kat=kat.KATConfig(window=4, patience=2, min_len=4))
  res = rollout.rollout(student, teacher, prompt, start, jax.random.key(4), cfg, tau=1.3,
                        batch_multiple=multiple)
  tx = opd.make_optimizer(opd.OptimConfig(learning_rate=1e-2))
  s_graph, s_params = nnx.split(student, nnx.Param)
  t_graph, t_params = nnx.split(teacher)
  opt_state = tx.init(s_params)
  loss_cfg = opd.LossConfig(objective="reverse_kl", vocab_size=len(arith.VOCAB),
                            microbatches=microbatches)
  if hlo is not None:
    hlo.append(opd.update.lower(s_graph, s_params, t_graph, t_params, opt_state, prompt, start,
                                res, tx=tx, batch_shards=multiple, cfg=loss_cfg).compile().as_text())
  new_params, new_opt, m = opd.update(s_graph, s_params, t_graph, t_params, opt_state, prompt,
                                      start, res, tx=tx, batch_shards=multiple, cfg=loss_cfg)
  return new_params, new_opt, sharding.to_host(res), sharding.to_host(m)


@pytest.fixture(scope="module")
def reference(models):
  """The one-device step every mesh is compared with, run once per module (per worker)."""
  params, _, res, m = _step(*models, None)
  return sharding.to_host(params), res, m


@pytest.mark.parametrize("shape,microbatches", [(m, 0) for m in MESHES] + [((2, 2, 2), 2)])
def test_train_step_on_a_mesh_equals_one_device(models, reference, shape, microbatches):
  ref_params, ref_res, ref_m = reference
  mesh = sharding.make_mesh(shape)
  hlo = []
  params, opt, res, m = _step(*models, mesh, microbatches, hlo)
  if microbatches > 1:
    # Strided row chunks take their rows from every batch shard, so chunking adds no collective
    # to the one-chunk update (a contiguous split put each chunk on half the devices: measured
    # 6 more collective-permutes and 3 more all-gathers on this mesh).
    _step(*models, mesh, 1, hlo)
    count = lambda text, op: len(re.findall(rf"= \S+ {op}\(", text))  # noqa: E731
    for op in ("all-to-all", "collective-permute", "all-gather"):
      assert count(hlo[0], op) <= count(hlo[1], op), op
  np.testing.assert_array_equal(res.tokens_BxT, ref_res.tokens_BxT)
  np.testing.assert_array_equal(res.trained_len_B, ref_res.trained_len_B)
  assert ref_res.terminated_B.any()  # KAT cut something: the masks are exercised
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(sharding.to_host(params)),
                               jax.tree_util.tree_leaves_with_path(ref_params)):
    # Adam's first step is ~lr * sign(grad): a near-zero gradient entry summed in another order
    # may move by a fraction of lr = 1e-2, hence an absolute tolerance of 5e-5.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5, err_msg=jax.tree_util.keystr(path))
  # The updated params and the optimizer moments keep the params' layout on the mesh.
  up = params["layers"][0]["mlp"]["up_proj"][...]
  assert up.sharding.is_equivalent_to(
      sharding.named_sharding(("embed", "mlp"), up.shape, mesh), up.ndim)
  mu = jax.tree.leaves(opt)[1]
  assert len(mu.sharding.device_set) == 8


def test_training_loop_is_mesh_independent(models, tmp_path):
  out = {}
  # (8, 1, 1): rollout in the training layout (nothing to split); (1, 8, 1): the student copied
  # each step into the rollout's tensor-parallel layout (groups of 2), the teacher living there.
  for shape in [(8, 1, 1), (1, 8, 1)]:
    cfg = tiny_config(*models, steps=2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
    cfg.eval_size = 0
    train.train(cfg, tmp_path / str(shape))
    out[shape] = [json.loads(line) for line in open(tmp_path / str(shape) / "metrics.jsonl")]
  for a, b in zip(out[(8, 1, 1)], out[(1, 8, 1)]):
    assert a["gen_len"] == b["gen_len"] and a["trap_rate"] == b["trap_rate"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_rollout_layout_choice_and_errors(models):
  s_cfg, t_cfg = hf.read_config(models[0]), hf.read_config(models[1])  # 4 heads, 2 KV heads
  mesh = sharding.make_mesh((1, 8, 1))
  assert sharding.rollout_tensor(8, 1, [s_cfg, t_cfg]) == 2  # the KV heads bound it
  assert sharding.resolve_rollout_tensor(0, mesh, [s_cfg, t_cfg]) == 2
  assert sharding.resolve_rollout_tensor(-1, mesh, [s_cfg, t_cfg]) == 0
  r = sharding.rollout_mesh(mesh, 2)
  assert dict(r.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert list(r.devices.flat) == list(mesh.devices.flat)  # the same devices, regrouped
  with pytest.raises(ValueError, match="rollout_tensor=4 does not divide num_kv_heads=2"):
    sharding.resolve_rollout_tensor(4, mesh, [s_cfg, t_cfg])
  with pytest.raises(ValueError, match="rollout_tensor=3 must divide the 8 devices"):
    sharding.rollout_mesh(mesh, 3)


def test_optimizer_state_lives_beside_the_params(models):
  """Adam moments and the fp32 accumulated gradients are split like their params; a plain
  `tx.init` made the accumulators on one device (then a full fp32 copy per device)."""
  mesh = sharding.make_mesh((1, 8, 1))
  student, _ = hf.load(models[0], mesh=mesh)
  _, params = nnx.split(student, nnx.Param)
  tx = opd.make_optimizer(opd.OptimConfig(accumulation_steps=2))
  state = opd.init_optimizer(tx, params)
  emb = params["embed"].get_value()
  same = [x for x in jax.tree.leaves(state) if x.shape == emb.shape]
  assert len(same) == 3  # mu, nu, grad_sum
  for x in same:
    assert x.sharding.is_equivalent_to(emb.sharding, x.ndim), x.sharding
  assert {x.dtype for x in same} >= {np.dtype("float32")}


def test_mesh_shape_resolution_and_errors():
  assert sharding.mesh_shape(-1, 2, 2, n_devices=8) == (2, 2, 2)
  assert sharding.mesh_shape(1, -1, 1, n_devices=8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape(-1, -1, 1, n_devices=8)
  with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
    sharding.mesh_shape(2, 2, 1, n_devices=8)


def test_kv_cache_layout_on_a_mesh(models):
  """Both caches: batch over data x fsdp, KV heads over tensor (2 heads on a 2-way axis)."""
  mesh = sharding.make_mesh((2, 2, 2))
  student, _ = hf.load(models[0], mesh=mesh)
  graph, params = nnx.split(student)
  cache = jax.jit(lambda p: nnx.merge(graph, p).init_cache(8, 24))(params)
  spec = cache.k[0].sharding.spec
  assert tuple(spec)[:2] == (("data", "fsdp"), "tensor")
  assert len(cache.v[-1].sharding.device_set) == 8


def test_reshard_compiles_once_per_layout(caplog):
  """The training loop reshards every step; a fresh jitted lambda per call recompiled each time."""
  import logging
  mesh = sharding.make_mesh((1, 8, 1))
  where = sharding.batch_sharding(sharding.rollout_mesh(mesh, 2), 2)
  x = sharding.put_batch(np.ones((8, 4), np.float32), mesh)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    for _ in range(3):
      y = sharding.reshard(x, where)
  assert sum("Compiling" in r.getMessage() for r in caplog.records) <= 1
  assert y.sharding == where and np.array_equal(np.asarray(y), np.asarray(x))
