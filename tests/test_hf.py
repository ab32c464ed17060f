"""kat_jax models and HF import/export against the `transformers` PyTorch implementation."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import (FAMILIES, VOCAB, make_hf_model, make_tokenizer, to_legacy_layout,
                         torch_logits)
from kat_jax import hf, safetensors_io, sharding
from kat_jax.models import ConfigError, ModelConfig, Transformer

CASES = [(f, tied) for f in FAMILIES for tied in (False, True)]
IDS = [f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]


def _batch(seed=0, b=3, t=20):
  """A left-padded batch: row 0 full, rows 1 and 2 with 5 and 11 pads."""
  ids = np.random.RandomState(seed).randint(3, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :5] = 0
  mask[2, :11] = 0
  ids[mask == 0] = 0
  return ids, mask


def _rel_err(out, ref, valid):
  return np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request, tmp_path_factory):
  family, tied = request.param
  path = tmp_path_factory.mktemp(f"{family}_{tied}")
  torch_model = make_hf_model(path, family, tied)
  model, cfg = hf.load(path)
  return path, torch_model, model, cfg


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids, mask: m(ids, mask))


def test_logits_match_transformers(case, forward):
  path, torch_model, model, cfg = case
  ids, mask = _batch()
  ref = torch_logits(torch_model, ids, mask)
  out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert out.dtype == np.float32 and out.shape == (3, 20, VOCAB)
  assert _rel_err(out, ref, mask.astype(bool)) <= 1e-4
  # Calling the model on input_ids alone (no mask) is the plain causal forward.
  full = np.asarray(model(jnp.asarray(ids[:1])))
  assert _rel_err(full, ref[:1], np.ones((1, 20), bool)) <= 1e-4


def test_cached_decode_matches_full_forward(case, forward):
  _, _, model, cfg = case
  ids, mask = _batch(seed=1)
  prompt_len, steps = 12, 8
  start_B = jnp.asarray((mask[:, :prompt_len] == 0).sum(1), jnp.int32)
  full = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))

  decode = nnx.jit(lambda m, t, c: m.decode(t, c))
  cache = model.init_cache(3, 24, start_B)
  logits, cache = decode(model, jnp.asarray(ids[:, :prompt_len]), cache)
  got = [np.asarray(logits)]
  for i in range(prompt_len, prompt_len + steps):  # one token per step
    logits, cache = decode(model, jnp.asarray(ids[:, i:i + 1]), cache)
    got.append(np.asarray(logits))
  logits, cache = decode(model, jnp.asarray(ids[:, prompt_len + steps:]), cache)  # a chunk
  got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  np.testing.assert_array_equal(cache.end_B, 20)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], full[valid], atol=1e-4 * np.abs(full).max(), rtol=0)


def test_save_then_transformers_loads_same_logits(case, tmp_path):
  import transformers
  path, torch_model, model, cfg = case
  out = hf.save(model, cfg, tmp_path / "export", tokenizer_dir=path)
  assert {"config.json", "generation_config.json", "model.safetensors",
          "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out,
                                                                     output_loading_info=True)
  assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
  assert not info["mismatched_keys"] and not info["error_msgs"]
  ids, mask = _batch(seed=2)
  np.testing.assert_allclose(torch_logits(reloaded.eval(), ids, mask),
                             torch_logits(torch_model, ids, mask), atol=1e-6, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.eos_token_id == 2


def _tensors(directory: Path) -> dict[str, tuple[str, tuple, bytes]]:
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    for name, info in safetensors_io.read_header(f).items():
      out[name] = (info.dtype, info.shape, safetensors_io.read_tensor(info).tobytes())
  return out


def test_load_save_roundtrip_is_bitwise(case, tmp_path):
  path, _, model, cfg = case
  hf.save(model, cfg, tmp_path / "again")
  assert _tensors(tmp_path / "again") == _tensors(path)


def test_bf16_checkpoint_roundtrip_is_bitwise(tmp_path):
  import torch
  make_hf_model(tmp_path / "bf16", "qwen3", tied=True, dtype=torch.bfloat16)
  model, cfg = hf.load(tmp_path / "bf16")  # float32 in memory on CPU
  assert cfg.checkpoint_dtype == "bfloat16" and model.embed[...].dtype == jnp.float32
  hf.save(model, cfg, tmp_path / "out")
  assert _tensors(tmp_path / "out") == _tensors(tmp_path / "bf16")
  assert {t[0] for t in _tensors(tmp_path / "out").values()} == {"BF16"}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_4x_config_layout(family, tmp_path, forward):
  torch_model = make_hf_model(tmp_path, family, tied=False, seed=3)
  cfg_5x = hf.read_config(tmp_path)
  to_legacy_layout(tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" not in raw and "rope_theta" in raw
  model, cfg = hf.load(tmp_path)
  assert cfg == cfg_5x
  if family == "llama":
    assert cfg.rope_dict["rope_type"] == "llama3" and cfg.rope_dict["factor"] == 8.0
  ids, mask = _batch(seed=4)
  out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert _rel_err(out, torch_logits(torch_model, ids, mask), mask.astype(bool)) <= 1e-4


def test_sharded_export_with_index(tmp_path):
  import transformers
  torch_model = make_hf_model(tmp_path / "src", "qwen2", tied=False)
  model, cfg = hf.load(tmp_path / "src")
  hf.save(model, cfg, tmp_path / "sharded", max_shard_bytes=100_000)
  files = sorted(os.listdir(tmp_path / "sharded"))
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and "model.safetensors.index.json" in files
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
  ids, mask = _batch()
  np.testing.assert_allclose(torch_logits(reloaded, ids, mask),
                             torch_logits(torch_model, ids, mask), atol=1e-6, rtol=0)
  again, _ = hf.load(tmp_path / "sharded")  # kat_jax reads the index too
  assert _tensors(tmp_path / "sharded") == _tensors(tmp_path / "src")
  np.testing.assert_array_equal(np.asarray(again.layers[1].mlp.down_proj[...]),
                                np.asarray(model.layers[1].mlp.down_proj[...]))


def test_load_on_mesh_places_params_and_matches(tmp_path, forward):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  torch_model = make_hf_model(tmp_path, "qwen3", tied=False)
  mesh = sharding.make_mesh((2, 2, 2))
  model, _ = hf.load(tmp_path, mesh=mesh)
  gate = model.layers[0].mlp.gate_proj[...]  # ('embed', 'mlp') -> ('fsdp', 'tensor')
  assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(gate.addressable_shards) == 8 and gate.addressable_shards[0].data.shape == (32, 64)
  k_proj = model.layers[0].attn.k_proj[...]  # 2 kv heads on a 2-way tensor axis
  assert k_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  ids, mask = _batch()
  out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert _rel_err(out, torch_logits(torch_model, ids, mask), mask.astype(bool)) <= 1e-4


def test_from_scratch_model_exports_to_transformers(tmp_path):
  import transformers
  cfg = ModelConfig(family="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True,
                    tie_embeddings=True, eos_token_ids=(2,), bos_token_id=1, pad_token_id=0)
  model = Transformer(cfg, rngs=nnx.Rngs(7))
  make_tokenizer(tmp_path / "tok")
  hf.save(model, cfg, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                     output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids, mask = _batch(seed=5)
  ref = torch_logits(reloaded.eval(), ids, mask)
  out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert _rel_err(out, ref, mask.astype(bool)) <= 1e-4
  assert hf.read_config(tmp_path / "out") == cfg


# ------------------------------------------------------------------------------ bad input


def _edit_tensors(src: Path, dst: Path, fn):
  """Copies an HF dir, rewriting its tensors with fn(dict) -> dict."""
  import shutil
  shutil.copytree(src, dst)
  tensors = {n: np.array(safetensors_io.read_tensor(i)) for n, i in safetensors_io.read_header(
      src / "model.safetensors").items()}
  os.remove(dst / "model.safetensors")
  safetensors_io.write_file(dst / "model.safetensors", fn(tensors))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama_src")
  make_hf_model(path, "llama", tied=False)
  return path


def test_unsupported_architecture_is_named(llama_dir, tmp_path):
  import shutil
  shutil.copytree(llama_dir, tmp_path / "m")
  cfg = json.loads((tmp_path / "m" / "config.json").read_text())
  cfg["architectures"] = ["GPT2LMHeadModel"]
  (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="GPT2LMHeadModel.*not supported"):
    hf.load(tmp_path / "m")


@pytest.mark.parametrize("edit,match", [
    (lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k},
     r"missing: model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)},
     r"unexpected: model\.layers\.0\.extra\.weight"),
    (lambda t: {**t, "model.norm.weight": np.ones(63, np.float32)},
     r"model\.norm\.weight has shape \[63\].*implies \[64\]"),
], ids=["missing", "unexpected", "misshaped"])
def test_bad_tensors_are_named(llama_dir, tmp_path, edit, match):
  _edit_tensors(llama_dir, tmp_path / "bad", edit)
  with pytest.raises(hf.CheckpointError, match=match):
    hf.load(tmp_path / "bad")


def test_missing_directory_and_weights(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.load(tmp_path / "nope")
  (tmp_path / "cfgonly").mkdir()
  (tmp_path / "cfgonly" / "config.json").write_text(json.dumps(
      {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
       "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}))
  with pytest.raises(hf.CheckpointError, match="neither model.safetensors"):
    hf.load(tmp_path / "cfgonly")


def test_save_refuses_nonempty_dir_and_never_half_writes(llama_dir, tmp_path, monkeypatch):
  model, cfg = hf.load(llama_dir)
  target = tmp_path / "export"
  target.mkdir()
  (target / "precious.txt").write_text("user data")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf.save(model, cfg, target)
  assert (target / "precious.txt").read_text() == "user data"

  # A crash in the middle of writing leaves neither a partial export nor temp dirs behind, and
  # the existing directory untouched, even with overwrite=True.
  def boom(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(safetensors_io, "write_file", boom)
  with pytest.raises(OSError, match="disk full"):
    hf.save(model, cfg, target, overwrite=True)
  with pytest.raises(OSError, match="disk full"):
    hf.save(model, cfg, tmp_path / "fresh")
  assert sorted(os.listdir(tmp_path)) == ["export"]
  assert os.listdir(target) == ["precious.txt"]
  monkeypatch.undo()

  hf.save(model, cfg, target, overwrite=True)
  assert "model.safetensors" in os.listdir(target) and "precious.txt" not in os.listdir(target)
  assert sorted(os.listdir(tmp_path)) == ["export"]


# ------------------------------------------------------------------------- compatibility


def test_check_compatible_accepts_padded_vocab(tmp_path):
  make_hf_model(tmp_path / "student", "qwen3", tied=True)
  make_hf_model(tmp_path / "teacher", "qwen3", tied=False, vocab_size=128)  # padded table
  compat = hf.check_compatible(tmp_path / "student", tmp_path / "teacher")
  assert compat.vocab_size == VOCAB
  assert (compat.student_vocab_size, compat.teacher_vocab_size) == (VOCAB, 128)
  assert compat.eos_token_ids == (2,)


def test_check_compatible_rejects_other_tokenizer(tmp_path):
  make_hf_model(tmp_path / "student", "qwen3", tied=True)
  make_hf_model(tmp_path / "teacher", "llama", tied=False)
  make_tokenizer(tmp_path / "teacher", shuffle_seed=0)  # same size, different ids
  with pytest.raises(hf.CheckpointError, match="vocab differ: .* entries"):
    hf.check_compatible(tmp_path / "student", tmp_path / "teacher")


def test_check_compatible_rejects_other_eos(tmp_path):
  make_hf_model(tmp_path / "student", "qwen2", tied=True)
  make_hf_model(tmp_path / "teacher", "qwen2", tied=True)
  cfg = json.loads((tmp_path / "teacher" / "config.json").read_text())
  cfg["eos_token_id"] = [2, 5]
  (tmp_path / "teacher" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match=r"EOS ids differ: student \[2\] vs teacher"):
    hf.check_compatible(tmp_path / "student", tmp_path / "teacher")


def test_bf16_params_and_compute(case, forward):
  """The accelerator default: bf16 params and activations, fp32 softmax / norms / logits."""
  path, torch_model, _, _ = case
  model, cfg = hf.load(path, dtype="bfloat16")
  assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "bfloat16")
  assert model.layers[0].mlp.up_proj[...].dtype == jnp.bfloat16
  ids, mask = _batch()
  out = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert out.dtype == np.float32
  # bf16 has an 8-bit mantissa: a few percent of the logit range, nowhere near fp32 parity.
  assert _rel_err(out, torch_logits(torch_model, ids, mask), mask.astype(bool)) <= 5e-2
