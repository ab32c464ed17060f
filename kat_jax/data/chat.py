"""Chat templates: render a model directory's Jinja chat template without `transformers`.

Hugging Face tokenizers keep the template in `tokenizer_config.json` ("chat_template": a string,
or a list of {"name", "template"} where "default" is the one used) or, since transformers 4.43,
in a separate `chat_template.jinja`. We render it the way `apply_chat_template` does: a sandboxed
Jinja environment with trim_blocks / lstrip_blocks, `raise_exception`, a `tojson` filter, the
special tokens as variables, and `add_generation_prompt`.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def _token_text(value) -> str | None:
  if isinstance(value, dict):  # {"content": "<|im_end|>", "lstrip": false, ...}
    return value.get("content")
  return value


def load_template(model_dir: str | Path) -> tuple[str | None, dict[str, str]]:
  """(template or None, special-token variables) of an HF model / tokenizer directory."""
  model_dir = Path(model_dir)
  config_path = model_dir / "tokenizer_config.json"
  config = json.loads(config_path.read_text()) if config_path.is_file() else {}
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default")
  jinja_file = model_dir / "chat_template.jinja"
  if template is None and jinja_file.is_file():
    template = jinja_file.read_text()
  special = {}
  for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
    text = _token_text(config.get(name))
    if text is not None:
      special[name] = text
  return template, special


def render(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
           **variables) -> str:
  """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template).render(messages=messages,
                                          add_generation_prompt=add_generation_prompt,
                                          **variables)
