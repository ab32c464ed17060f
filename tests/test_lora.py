"""LoRA students and master weights: the adapted forward against PEFT and transformers, training
that moves only the adapters, bit-exact resume, exports, self-distillation, fp32 master weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kat_jax import config as config_lib
from kat_jax import hf, lora, memory, opd, safetensors_io, sharding, threshold, train
from kat_jax.models import ConfigError, LoraConfig
from kat_jax.models.transformer import LoRAParam
from hf_fixtures import FAMILIES, make_hf_model
from train_fixtures import make_models, run_main, step_metrics, tiny_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return make_models(tmp_path_factory.mktemp("models"))


def _random_adapters(model, seed=1, std=0.1):
  """B (zero at init) drawn at random, so the adapters change the model's output."""
  state = nnx.state(model, LoRAParam)
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.to_flat_state(state)):
    if path[-1].endswith("_lora_b"):
      var.set_value(std * jax.random.normal(jax.random.fold_in(key, i), var.get_value().shape))
  nnx.update(model, state)


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_logits_match_peft_and_the_merged_export(tmp_path, family):
  import peft
  import torch
  import transformers
  base_dir = tmp_path / "base"
  make_hf_model(base_dir, family, tied=family == "qwen2")
  targets = ("q_proj", "v_proj", "o_proj", "down_proj") if family == "llama" else (
      lora.parse_targets("all"))
  model, cfg = hf.load(base_dir, "float32", lora=LoraConfig(rank=4, alpha=8.0, targets=targets),
                       lora_seed=3)
  ids = np.random.RandomState(0).randint(4, 90, (2, 12))
  base_logits = np.asarray(model(jnp.asarray(ids)))
  reference = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  with torch.no_grad():
    np.testing.assert_allclose(base_logits, reference.eval()(torch.tensor(ids)).logits.numpy(),
                               rtol=1e-4, atol=1e-4)  # B = 0: the adapted model is the base
  _random_adapters(model)
  ours = np.asarray(model(jnp.asarray(ids)))
  assert _rel(ours, base_logits) > 0.1  # the adapters matter

  merged_dir = lora.save_merged(model, cfg, tmp_path / "merged", tokenizer_dir=base_dir)
  merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
  peft_dir = lora.save_peft(model, tmp_path / "adapter", base_model=base_dir)
  adapter_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
  assert adapter_cfg["r"] == 4 and sorted(adapter_cfg["target_modules"]) == sorted(targets)
  with_adapter = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), peft_dir)
  with torch.no_grad():
    assert _rel(ours, merged.eval()(torch.tensor(ids)).logits.numpy()) < 1e-5
    assert _rel(ours, with_adapter.eval()(torch.tensor(ids)).logits.numpy()) < 1e-5
  # The merged directory also loads back into kat_jax as a plain model with the same logits.
  plain, _ = hf.load(merged_dir, "float32")
  assert plain.cfg.lora.rank == 0
  assert _rel(ours, np.asarray(plain(jnp.asarray(ids)))) < 1e-5


def test_base_view_shares_the_arrays_and_drops_the_adapters(tmp_path):
  make_hf_model(tmp_path / "base", "qwen3", tied=False)
  model, _ = hf.load(tmp_path / "base", "float32", lora=LoraConfig(rank=2))
  _random_adapters(model)
  view = lora.base_view(model)
  plain, _ = hf.load(tmp_path / "base", "float32")
  ids = jnp.asarray(np.random.RandomState(1).randint(4, 90, (2, 9)))
  np.testing.assert_array_equal(np.asarray(view(ids)), np.asarray(plain(ids)))
  ours = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(view))}
  theirs = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))))
  assert set(ours) == set(theirs)
  assert all(ours[p] is theirs[p].get_value() for p in ours)  # no copy


def test_lora_config_errors_name_the_field(models):
  for edits, message in (({"rank": -1}, "lora.rank=-1"), ({"targets": "q_proj,qkv"}, "qkv"),
                         ({"rank": 4, "alpha": 0.0}, "lora.alpha=0.0"),
                         ({"init": "pissa"}, "lora.init='pissa'")):
    cfg = tiny_config(*models)
    cfg.lora.update(edits)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
      config_lib.validate(cfg)
  cfg = tiny_config(*models)
  cfg.optim.master = "bf16"
  with pytest.raises(ConfigError, match="optim.master='bf16'"):
    config_lib.validate(cfg)
  cfg = tiny_config(*models)
  cfg.teacher, cfg.lora.rank, cfg.mesh.rollout_tensor = cfg.student, 4, 2
  with pytest.raises(ConfigError, match="mesh.rollout_tensor=2: a LoRA student on the teacher"):
    config_lib.validate(cfg)


def _host(tree):
  return [np.asarray(x).copy() for x in jax.tree.leaves(tree)]


def test_lora_training_moves_only_the_adapters(models, tmp_path):
  cfg = tiny_config(*models)
  cfg.lora.rank, cfg.lora.targets = 4, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
  run = train.setup(cfg, tmp_path)
  base0 = _host(nnx.state(run.student, nnx.Not(LoRAParam)))
  adapters0 = _host(nnx.state(run.student, LoRAParam))
  opt = opd.init_optimizer(run.tx, train.trained_params(run))
  # Adam's two moments are adapter-sized: the base has no optimizer state.
  n_adapters = run.student.cfg.num_lora_params()
  assert n_adapters == sum(a.size for a in adapters0)
  assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * n_adapters + 2  # + two step counts
  state = train.TrainState(opt, sharding.onto_mesh(threshold.init(), run.mesh))
  for step in range(2):
    state, _, m, _, _ = train.train_step(run, state, step, jax.random.key(0))
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
  for before, after in zip(base0, _host(nnx.state(run.student, nnx.Not(LoRAParam)))):
    np.testing.assert_array_equal(before, after)  # bit-identical
  after = _host(nnx.state(run.student, LoRAParam))
  assert all(not np.array_equal(a, b) for a, b in zip(adapters0, after))


def _tensors(path):
  return {n: safetensors_io.read_tensor(i).tobytes()
          for n, i in safetensors_io.read_header(path).items()}


def test_lora_resume_after_process_exit_is_bit_exact_and_exports_both_ways(models, tmp_path):
  spec = f"tests/tiny_config.py:{models[0]},{models[1]}"
  flags = ["--config.lora.rank=4", "--config.lora.targets=q_proj,v_proj,up_proj"]
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  out = run_main(["--config", f"{spec},4", "--workdir", str(straight), *flags])
  assert out.returncode == 0, out.stderr[-2000:]
  assert run_main(["--config", f"{spec},2", "--workdir", str(resumed), *flags]).returncode == 0
  # Resuming with other adapters, or the adapters on another base, is refused before anything
  # loads, naming the field.
  bad = run_main(["--config", f"{spec},4", "--workdir", str(resumed), "--config.lora.rank=8"])
  assert bad.returncode != 0 and "config.lora=" in bad.stderr.splitlines()[-1]
  import shutil
  other = shutil.copytree(models[0], tmp_path / "other_student")
  bad = run_main(["--config", f"{spec},4", "--workdir", str(resumed), *flags,
                  f"--config.student={other}"])
  assert bad.returncode != 0 and "trained on another base" in bad.stderr.splitlines()[-1]
  # The same targets in another order are the same adapters.
  second = run_main(["--config", f"{spec},4", "--workdir", str(resumed), "--config.lora.rank=4",
                     "--config.lora.targets=up_proj,v_proj,q_proj"])
  assert second.returncode == 0 and "at step 2" in second.stdout, second.stderr[-2000:]
  a, b = step_metrics(straight), step_metrics(resumed)
  for step in (1, 2, 3, 4):
    assert {k: a[step][k] for k in ("loss", "grad_norm", "kl")} == {
        k: b[step][k] for k in ("loss", "grad_norm", "kl")}, step
  for sub, name in (("export", "model.safetensors"),
                    ("export_adapter", "adapter_model.safetensors")):
    assert _tensors(straight / sub / name) == _tensors(resumed / sub / name), sub
  # The checkpoint holds the adapters only (a few KiB here), not the model.
  adapter = _tensors(resumed / "export_adapter" / "adapter_model.safetensors")
  assert len(adapter) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
  # mode=export from the checkpoint writes the same two directories.
  shutil.rmtree(resumed / "export")
  shutil.rmtree(resumed / "export_adapter")
  out = run_main(["--config", f"{spec},4", "--workdir", str(resumed), "--config.mode=export",
                  *flags])
  assert out.returncode == 0, out.stderr[-2000:]
  assert _tensors(straight / "export_adapter" / "adapter_model.safetensors") == _tensors(
      resumed / "export_adapter" / "adapter_model.safetensors")
  assert _tensors(straight / "export" / "model.safetensors") == _tensors(
      resumed / "export" / "model.safetensors")


def test_self_distillation_keeps_one_copy_of_the_base(models, tmp_path):
  cfg = tiny_config(*models)
  cfg.teacher = cfg.student
  cfg.lora.rank = 2
  assert config_lib.shares_base(cfg)
  run = train.setup(cfg, tmp_path)
  teacher = dict(nnx.to_flat_state(nnx.state(run.teacher)))
  base = dict(nnx.to_flat_state(nnx.state(run.student, nnx.Not(LoRAParam))))
  assert set(teacher) == set(base)
  assert all(teacher[p].get_value() is base[p].get_value() for p in teacher)
  # The memory plan counts no teacher weights; with separate copies it would count them.
  shape = (1, 1, 1)
  shared = memory.for_config(cfg, shape, None, accelerator=False)
  cfg.lora.rank = 0
  separate = memory.for_config(cfg, shape, None, accelerator=False)
  assert shared.items["teacher params"] == 0.0
  assert separate.items["teacher params"] == separate.items["student params"] > 0


def test_memory_plan_counts_adapter_optimizer_state_and_master_weights():
  s = memory.model_config("Qwen3-8B", "bfloat16")
  t = memory.model_config("Qwen3-8B", "bfloat16")
  kw = dict(batch=8, prompt_len=64, max_new_tokens=64, window=16, vocab=s.vocab_size,
            param_bytes_s=2, param_bytes_t=2, compute_bytes=2)
  full = memory.plan(s, t, (1, 8, 1), **kw)
  master = memory.plan(s, t, (1, 8, 1), master=True, **kw)
  adapted = s.replace(lora=LoraConfig(rank=16))
  lo = memory.plan(adapted, t, (1, 8, 1), **kw)
  n, n_lora = s.num_params(), adapted.num_lora_params()
  # Qwen3-8B with rank-16 adapters on every projection: 43.6M adapter params.
  assert n_lora == 36 * 16 * sum(i + o for i, o in s.lora_shapes().values())
  # Master weights: a float32 copy (4 bytes / param) and float32 moments (8) instead of bf16 (4).
  np.testing.assert_allclose(master.items["master weights (fp32)"], 4 * n / 8, rtol=0.02)
  np.testing.assert_allclose(master.items["optimizer (AdamW)"], 8 * n / 8, rtol=0.02)
  np.testing.assert_allclose(full.items["optimizer (AdamW)"], 4 * n / 8, rtol=0.02)
  # LoRA: float32 moments and gradients of the adapters alone.
  adapter_bytes = memory.param_bytes(adapted, (1, 8, 1), 2, part="lora")
  assert lo.items["gradients"] == adapter_bytes and lo.items["optimizer (AdamW)"] == 2 * adapter_bytes
  # (B's [r, heads, head_dim] is not split over fsdp: 0.23 GiB per device instead of 4.1 GiB.)
  assert lo.items["optimizer (AdamW)"] < full.items["optimizer (AdamW)"] / 10
  assert lo.peak < full.peak < master.peak


def test_master_weights_keep_updates_a_bf16_student_would_lose(models, tmp_path):
  """An AdamW step of lr = 1e-7 moves each weight by ~1e-7: below half a bf16 ulp of every weight
  above ~2.6e-5 in size (the tiny models' weights are ~0.02), so the bf16 params alone do not
  move; the float32 master does, and a run of such steps adds up there."""
  moved = {}
  for master in ("auto", "off"):
    cfg = tiny_config(*models)
    cfg.dtype = "bfloat16"
    cfg.optim.learning_rate = 1e-7
    cfg.optim.master = master
    run = train.setup(cfg, tmp_path / master)
    assert (run.master_dtype is not None) == (master == "auto")
    before = np.asarray(run.student.layers[0].attn.q_proj.get_value().astype(jnp.float32))
    state = train.TrainState(opd.init_optimizer(run.tx, train.trained_params(
        run, train.init_master(run))), sharding.onto_mesh(threshold.init(), run.mesh),
        master=train.init_master(run))
    state, _, m, _, _ = train.train_step(run, state, 0, jax.random.key(0))
    assert m["grad_norm"] > 0
    bf16 = np.asarray(run.student.layers[0].attn.q_proj.get_value().astype(jnp.float32))
    moved[master] = np.mean(bf16 != before)
    if master == "auto":
      q = state.master["layers"][0]["attn"]["q_proj"].get_value()
      assert q.dtype == jnp.float32
      assert np.mean(np.asarray(q) != before) > 0.9  # the master moved almost everywhere
      np.testing.assert_array_equal(np.asarray(q.astype(jnp.bfloat16).astype(jnp.float32)),
                                    bf16)  # and the rollout's copy is its bf16 cast
  assert moved["off"] < 0.02 and moved["auto"] < 0.02  # in bf16, almost nothing moved


def test_adapted_cached_decode_and_scanned_forward_match_the_full_forward(tmp_path):
  """The fused rollout decodes through `model.decode`: with adapters, its cached logits (prefill
  then one token at a time) equal the full-sequence forward's, and so does the scanned forward."""
  make_hf_model(tmp_path / "base", "qwen2", tied=True)
  model, _ = hf.load(tmp_path / "base", "float32", lora=LoraConfig(rank=3))
  _random_adapters(model)
  ids = jnp.asarray(np.random.RandomState(2).randint(4, 90, (2, 10)))
  full = np.asarray(model(ids))
  cache = model.init_cache(2, 16)
  logits, cache = model.decode(ids[:, :6], cache)
  steps = [np.asarray(logits)]
  for t in range(6, 10):
    logits, cache = model.decode(ids[:, t:t + 1], cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=2e-5, atol=2e-5)
  # The update's forward as one scan over stacked blocks (config.scan_layers) stacks the
  # adapters with the weights.
  model.scan_layers = True
  np.testing.assert_allclose(np.asarray(model(ids)), full, rtol=2e-5, atol=2e-5)


def test_adapters_are_placed_by_the_sharding_rules(tmp_path):
  """On a (data, fsdp, tensor) = (2, 2, 2) mesh an adapter follows its base projection's logical
  axes (FSDP over `embed`, tensor parallelism over heads / MLP); the rank axis is replicated."""
  make_hf_model(tmp_path / "base", "qwen3", tied=False)
  mesh = sharding.make_mesh((2, 2, 2))
  model, _ = hf.load(tmp_path / "base", "float32", mesh=mesh, lora=LoraConfig(rank=4))
  attn, mlp = model.layers[0].attn, model.layers[0].mlp
  spec = lambda v: tuple(v.get_value().sharding.spec)  # noqa: E731
  assert spec(attn.q_proj_lora_a) == ("fsdp", None)
  assert spec(attn.q_proj_lora_b) == (None, "tensor", None)
  assert spec(attn.o_proj_lora_a) == ("tensor", None, None)
  assert spec(attn.o_proj_lora_b) == (None, "fsdp")
  assert spec(mlp.down_proj_lora_a) == ("tensor", None)
  # The sharded model computes what the unsharded one does.
  _random_adapters(model)
  single = jax.tree.map(np.asarray, nnx.state(model))
  plain, _ = hf.load(tmp_path / "base", "float32", lora=LoraConfig(rank=4))
  nnx.update(plain, single)
  ids = jnp.asarray(np.random.RandomState(3).randint(4, 90, (4, 7)))
  np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(plain(ids)), rtol=1e-5,
                             atol=1e-5)
