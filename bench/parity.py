"""Logit parity of kat_jax with transformers (PyTorch, fp32) for each family, tied and untied.

Run:  HF_HUB_OFFLINE=1 python bench/parity.py      (~20 s on CPU; needs the `test` extra)
Prints max |logit difference| / max |logit| over a left-padded batch (3 x 20 tokens) of tiny
random models whose every tensor (norms and biases included) is perturbed -- the numbers in the
README's parity table. The tests assert the same quantity is <= 1e-4.
"""

import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_fixtures import FAMILIES, VOCAB, make_hf_model, torch_logits  # noqa: E402
from kat_jax import hf  # noqa: E402


def main():
  ids = np.random.RandomState(0).randint(3, VOCAB, (3, 20)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :5] = 0
  mask[2, :11] = 0
  valid = mask.astype(bool)
  print("| family | untied | tied |\n|---|---|---|")
  for family in FAMILIES:
    errs = []
    for tied in (False, True):
      with tempfile.TemporaryDirectory() as tmp:
        torch_model = make_hf_model(Path(tmp), family, tied)
        model, _ = hf.load(tmp)
        ref = torch_logits(torch_model, ids, mask)
        out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
        errs.append(np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max())
    print(f"| {family} | {errs[0]:.1e} | {errs[1]:.1e} |")


if __name__ == "__main__":
  main()
