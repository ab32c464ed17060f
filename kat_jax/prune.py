"""A student made from its teacher by keeping a subset of its layers (layer-drop initialisation).

    python -m kat_jax.prune --model /tmp/smollm2 --layers 20 --out /tmp/smollm2_l20   # ~1.5 min

The student shares the teacher's tokenizer, embeddings, final norm and head, and starts from the
kept blocks' weights -- a far better start for distillation than a random init of the same shape
(the residual stream keeps its meaning across the surviving blocks). Which blocks to keep:
  * `--select greedy` (default): drop one block at a time, each time the one whose removal moves
    the model's next-token distribution least -- KL(teacher || pruned) over calibration text
    (`--calibration FILE`, JSONL with "text" or "prompt" fields; default a few built-in chat and
    prose snippets). On SmolLM2-135M (30 blocks) keeping 20 evenly spaced blocks left a student
    that emits word salad (NLL 14 nats/token on a reference text vs the teacher's 1.8); greedy
    keeps it coherent.
  * `--select even`: N blocks evenly spaced over the depth, first and last included.
  * `--keep 0,1,5,...`: the block indices explicitly.

Works on the HF directory itself (safetensors in, safetensors out, renumbered `model.layers.i`),
so the result loads with `kat_jax.hf.load` and `transformers` alike; the output is written to a
temporary sibling and renamed, never over a non-empty directory without `--overwrite`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from kat_jax import hf, safetensors_io
from kat_jax.data.sources import iter_jsonl

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def evenly_spaced(num_layers: int, keep: int) -> list[int]:
  """`keep` distinct block indices in [0, num_layers), spread evenly, first and last included."""
  if not 1 <= keep <= num_layers:
    raise ValueError(f"--layers={keep} must be between 1 and the model's {num_layers} layers.")
  if keep == 1:
    return [num_layers - 1]
  return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, keep)})


# Calibration text for the greedy selection when none is given: the chat format the student will be
# distilled in, some arithmetic, some prose. Short on purpose: it only ranks blocks.
CALIBRATION = (
    "<|im_start|>user\nWhat is 23 + 45? Put the final answer in \\boxed{}.<|im_end|>\n"
    "<|im_start|>assistant\nAdd the tens: 20 + 40 = 60. Add the ones: 3 + 5 = 8. So 23 + 45 = 68."
    " The answer is \\boxed{68}.<|im_end|>",
    "<|im_start|>user\nState the final answer: 17 - 9 + 31 =<|im_end|>\n<|im_start|>assistant\n"
    "First, 17 - 9 = 8. Then 8 + 31 = 39. The final answer is 39.<|im_end|>",
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for "
    "the World's Fair. Many tourists visit the city every year to see its museums and monuments.",
    "A farmer has 12 cows and buys 7 more. Each cow gives 3 litres of milk a day, so the farm now "
    "produces 19 times 3, which is 57 litres of milk every day.",
)


def greedy_selection(model_dir: str | os.PathLike, keep: int, texts=CALIBRATION,
                     log=print) -> list[int]:
  """Blocks to keep: repeatedly drop the block whose removal gives the smallest mean
  KL(full model || pruned model) per token over `texts`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tokenizers import Tokenizer

  model, cfg = hf.load(model_dir)
  if not 1 <= keep <= cfg.num_layers:
    raise ValueError(f"--layers={keep} must be between 1 and the model's {cfg.num_layers} layers.")
  tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
  ids = [tok.encode(t, add_special_tokens=False).ids[:256] for t in texts]
  t = max(len(i) for i in ids)
  ids_BxT = jnp.asarray([i + [0] * (t - len(i)) for i in ids], jnp.int32)
  mask_BxT = jnp.asarray([[1] * len(i) + [0] * (t - len(i)) for i in ids], jnp.bool_)
  pos_BxT = jnp.broadcast_to(jnp.arange(t), (len(ids), t))
  mask_BxTxT = jnp.tril(jnp.ones((t, t), jnp.bool_))[None] & mask_BxT[:, None, :]
  inv_freq = model._inv_freq()
  splits = [nnx.split(block) for block in model.layers]
  block_graph = splits[0][0]  # every block has the same structure: one compile
  head_graph, head_state = nnx.split(model)

  @jax.jit
  def block(state, x):
    return nnx.merge(block_graph, state)(x, pos_BxT, mask_BxTxT, inv_freq)[0]

  @jax.jit
  def logp(state, x):
    return jax.nn.log_softmax(nnx.merge(head_graph, state).logits(x), axis=-1)

  x0 = model.embed_tokens(ids_BxT)

  def logp_of(layers):
    x = x0
    for i in layers:
      x = block(splits[i][1], x)
    return logp(head_state, x)

  ref = logp_of(range(cfg.num_layers))
  weight = mask_BxT / mask_BxT.sum()

  def kl(layers):
    lp = logp_of(layers)
    return float((jnp.sum(jnp.exp(ref) * (ref - lp), axis=-1) * weight).sum())

  current = list(range(cfg.num_layers))
  while len(current) > keep:
    scores = [(kl([j for j in current if j != i]), i) for i in current]
    best, drop = min(scores)
    current.remove(drop)
    log(f"  dropped block {drop:>2}: {len(current)} left, KL(full || pruned) = {best:.3f} nats")
  return current


def prune(model_dir: str | os.PathLike, out: str | os.PathLike, keep: list[int], *,
          overwrite: bool = False) -> Path:
  """Writes `model_dir` with only blocks `keep` (in that order) to `out`."""
  model_dir, out = Path(model_dir), Path(out)
  cfg = hf.read_config(model_dir)
  bad = [i for i in keep if not 0 <= i < cfg.num_layers]
  if not keep or bad or len(set(keep)) != len(keep):
    raise ValueError(f"--keep={keep}: give distinct block indices in [0, {cfg.num_layers}) "
                     f"({model_dir} has {cfg.num_layers} layers).")
  if model_dir.resolve().is_relative_to(out.resolve()):
    # Writing --out replaces it whole: the source model would go with it.
    raise ValueError(f"--out={out} is or contains the source model {model_dir}; choose a new "
                     "directory.")
  if not overwrite:
    hf.check_new_directory(out, "pass --overwrite to replace it")
  infos = safetensors_io.index_checkpoint(model_dir)
  new_index = {old: new for new, old in enumerate(keep)}

  def tensors():
    for name, info in infos.items():
      match = _LAYER.match(name)
      if match is None:
        yield name, safetensors_io.read_tensor(info)
      elif int(match.group(1)) in new_index:
        yield f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}", \
            safetensors_io.read_tensor(info)

  hf_cfg = json.loads((model_dir / "config.json").read_text())
  hf_cfg["num_hidden_layers"] = len(keep)
  # Per-layer lists some configs carry (layer_types, ...) follow the kept blocks.
  for key, value in list(hf_cfg.items()):
    if isinstance(value, list) and len(value) == cfg.num_layers and key != "architectures":
      hf_cfg[key] = [value[i] for i in keep]
  with hf.atomic_directory(out) as tmp:
    safetensors_io.write_weights(tmp, tensors(), safetensors_io.DEFAULT_MAX_SHARD_BYTES)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    for f in hf.TOKENIZER_FILES + ("generation_config.json",):
      if (model_dir / f).exists():
        shutil.copy2(model_dir / f, tmp / f)
    (tmp / "SOURCE").write_text(f"kat_jax.prune of {model_dir.resolve()}: kept blocks "
                                f"{keep} of {cfg.num_layers}\n")
  return out


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m kat_jax.prune", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="the teacher's HF directory")
  parser.add_argument("--out", required=True, help="the student's HF directory to write")
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--layers", type=int, help="keep this many blocks (see --select)")
  group.add_argument("--keep", help="comma-separated block indices to keep, e.g. 0,3,6,29")
  parser.add_argument("--select", choices=("greedy", "even"), default="greedy",
                      help="how --layers chooses the blocks (default greedy)")
  parser.add_argument("--calibration", help="JSONL of {'text'} or {'prompt'} lines for greedy")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  try:
    n = hf.read_config(args.model).num_layers
    if args.keep is not None:
      try:
        keep = [int(x) for x in args.keep.split(",") if x.strip()]
      except ValueError:
        raise ValueError(f"--keep={args.keep!r}: give comma-separated integers.") from None
    elif args.select == "even":
      keep = evenly_spaced(n, args.layers)
    else:
      texts = CALIBRATION
      if args.calibration:
        texts = [r.get("text") or r.get("prompt") or "" for _, r in
                 iter_jsonl(Path(args.calibration), "an object with 'text' or 'prompt'")]
        texts = [t for t in texts if t][:64]
        if not texts:
          raise ValueError(f"--calibration={args.calibration}: no 'text' or 'prompt' fields.")
      keep = greedy_selection(args.model, args.layers, texts)
    out = prune(args.model, args.out, keep, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = hf.read_config(out)
  print(f"wrote {out}: blocks {keep} of {n}, {cfg.num_params() / 1e6:.1f}M params")
  return 0


if __name__ == "__main__":
  sys.exit(main())
