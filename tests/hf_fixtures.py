"""Tiny random-initialised `transformers` models and tokenizers, saved offline for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 96  # tokenizer ids; models may pad their embedding beyond it
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer(out_dir: Path, shuffle_seed: int | None = None):
  """A word-level tokenizer over VOCAB ids, saved as tokenizer.json + tokenizer_config.json.

  shuffle_seed: permute the non-special ids, i.e. a *different* tokenizer of the same size.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
  if shuffle_seed is not None:
    words = list(np.random.RandomState(shuffle_seed).permutation(words))
  vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(out_dir)


FAMILIES = ("llama", "qwen2", "qwen3")


def hf_config(family: str, tied: bool, vocab_size: int = VOCAB):
  import transformers
  common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
  if family == "llama":
    # Llama 3.1 rope scaling with a short original context so the ramp matters at test lengths.
    return transformers.LlamaConfig(
        **common, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
  if family == "qwen2":
    return transformers.Qwen2Config(**common)
  if family == "qwen3":
    return transformers.Qwen3Config(**common, head_dim=24)  # head_dim != hidden / heads
  raise ValueError(family)


def make_hf_model(out_dir: Path, family: str, tied: bool, seed: int = 0,
                  vocab_size: int = VOCAB, dtype=None):
  """Saves a random HF model (with tokenizer) to out_dir and returns the torch model (fp32)."""
  import torch
  import transformers

  cfg = hf_config(family, tied, vocab_size)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    # Perturb every tensor so norms and biases (initialised to 1 / 0) are exercised too.
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(out_dir)
  make_tokenizer(out_dir)
  return model.float()


def to_legacy_layout(model_dir: Path) -> None:
  """Rewrites config.json in the transformers 4.x layout published checkpoints use."""
  path = Path(model_dir) / "config.json"
  cfg = json.loads(path.read_text())
  rope = dict(cfg.pop("rope_parameters"))
  cfg["rope_theta"] = rope.pop("rope_theta")
  rope_type = rope.pop("rope_type", "default")
  cfg["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
  cfg["torch_dtype"] = cfg.pop("dtype", "float32")
  path.write_text(json.dumps(cfg))


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """Reference logits; positions count real tokens only (what generate() does for left padding)."""
  import torch
  if mask is None:
    mask = np.ones_like(ids)
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos, dtype=torch.long))
  return out.logits.float().numpy()
