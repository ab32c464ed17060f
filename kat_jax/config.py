"""The training config: its schema (defaults), validation, and the static pieces built from it.

`validate(config)` runs before anything loads or compiles and raises `ConfigError` with one line
naming the field, the bad value and the fix. Every config file builds on `defaults()`, so a key the
schema does not know is a typo, reported as such.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import jax
import ml_collections

from kat_jax import evaluate, hf, kat, lora, opd, rollout, sharding, threshold
from kat_jax.data import benchmarks, chat, gym, sources
from kat_jax.models.config import ConfigError, LoraConfig

ASSETS = Path(__file__).resolve().parent / "assets"


def _section(cls, drop=(), **config_level) -> ml_collections.ConfigDict:
  """A config section whose defaults are the dataclass `cls`'s own (no second copy to drift),
  without the `drop` fields the run sets itself, plus `config_level` fields: settings the
  dataclass does not hold, or a config-level default such as 0 = auto that the run resolves."""
  fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in drop}
  if any(v is dataclasses.MISSING for v in fields.values()):
    raise TypeError(f"{cls.__name__}: every field a config exposes needs a default.")
  return ml_collections.ConfigDict({**fields, **config_level})


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval | export (sft and smoke have their own configs)
  c.seed = 0
  c.student = str(ASSETS / "arith_student")  # HF model directories
  c.teacher = str(ASSETS / "arith_teacher")
  c.dtype = ""  # "" = float32 on CPU, bfloat16 on accelerators
  c.steps = 100
  c.prompts_per_step = 16
  c.samples_per_prompt = 4
  c.max_new_tokens = 64
  # source: arith | jsonl (path, eval_path) | reasoning_gym (tasks, kat_jax/data/gym.py) |
  # tfds (path = a prepared dataset's directory; split / eval_split; prompt_field / answer_field).
  # instruction / chat_template: reasoning_gym prompts = question + instruction, through the
  # student's chat template; size: items per generator (the source cycles through them).
  # extract: how the held-out prompts' answers are read ('boxed' | 'last_number'; benchmarks
  # named in eval.benchmarks always read the last \boxed{}).
  # heldout_size: a jsonl source without eval_path holds this many records of data.path out of
  # training (a fixed pseudo-random choice, at most half the file) for the held-out evaluation;
  # not when eval.benchmarks names the evaluation (then the whole file trains).
  c.data = ml_collections.ConfigDict(dict(
      source="arith", path="", eval_path="", seed=0, n_ops=3, tasks="", instruction="",
      chat_template=False, size=10_000, extract="boxed", heldout_size=256, split="train",
      eval_split="test", prompt_field="prompt", answer_field="answer"))
  # The sections below take their defaults from the dataclasses the run builds from them (one
  # source: `_section`); only the config-level fields are written here.
  c.sampling = _section(rollout.SamplingConfig)
  # mode: the truncation policy -- none | kat | fixed (ESR) | horizon (TOPD / POPD) | topk
  # (Prune-OPD) | iw (IW-OPD weights) | random; each one's knobs and source: kat_jax/kat.py.
  # cut: onset | detection | onset_floor (onset, never before min_len); see kat_jax/kat.py.
  # spike_tau / random_lengths: inputs of the rollout (the spike gate's threshold, the lengths
  # the random-truncation ablation draws from), not of the detector's static config.
  c.kat = _section(kat.KATConfig, spike_tau=2.0, random_lengths=[0])
  # estimator: probe | censored | observed -- how tau avoids the bias of the windows KAT's own
  # cuts hide; probe_fraction: rollouts per step that KAT never stops (kat_jax/threshold.py).
  c.threshold = _section(threshold.ThresholdConfig)
  # beta: jsd only, TRL convention (0 = forward KL(teacher||student), 1 = reverse KL).
  # microbatches: the update's rows in sequential chunks (less activation memory, same gradient);
  # 0 = auto: ~512-token chunks on CPU (cache-resident, faster), 1 on GPU / TPU.
  # chunk: the LM head + loss over this many positions at a time (0 = all; saves [B, T, V] memory).
  # trim: the update runs on the rollout cut to its longest trained row (a few lengths, each
  # compiled once; same loss and gradient); False = always the full buffer.
  # temperature: 0 = auto (loss_config): sampled_pg follows the sampling temperature (it must
  # train the policy it sampled from); the full-vocabulary objectives use 1.
  # ratio_clip: sampled_pg's truncated importance sampling, min(ratio, C) (0 = off).
  # vocab_size: the models' shared vocabulary, set per run.
  c.loss = _section(opd.LossConfig, drop=("vocab_size",), temperature=0.0)
  # master: float32 master weights of a bf16 / fp16 student ("auto") or none ("off").
  c.optim = _section(opd.OptimConfig)
  # LoRA students (kat_jax/lora.py): adapters on a frozen base, rank 0 = full fine-tuning.
  # targets: 'all' or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj;
  # scale alpha / rank; init: 'kaiming' (PEFT's default) | 'gaussian'; B starts at 0 either way.
  # A student that is the teacher's own checkpoint plus adapters shares the teacher's weights
  # (self-distillation: the teacher is the base with the adapters off, one copy in memory).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="all", init="kaiming"))
  # Device mesh (kat_jax.sharding): batch over data x fsdp, params FSDP over embed and tensor-
  # parallel over heads / MLP / vocab. -1 = the devices left. The same code from 1 CPU to a pod.
  # rollout_tensor: the rollout's layout (kat_jax.sharding.ROLLOUT_RULES): tensor parallelism over
  # groups of this many devices, the batch over the groups; 0 = the largest that divides every
  # model's heads, KV heads and MLP width; -1 = roll out in the training layout.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rollout_tensor=0))
  c.distributed = False  # jax.distributed.initialize() first (multi-host TPU pods / GPU clusters)
  c.remat = False  # recompute each block in the backward pass (less activation memory)
  c.attn_chunk = 0  # training-forward attention over query chunks of this size (0 = all at once)
  # Full-sequence forwards (the update, the teacher's scoring) as a lax.scan over the layers:
  # one block compiled instead of num_layers (minutes less for 28-36-layer models on TPU; under
  # FSDP one layer's gathered weights at a time), equal up to float rounding. Off by default:
  # small models compile in seconds unrolled.
  c.scan_layers = False
  c.max_prompt_len = 256  # prompt tokens (chat template included); longer prompts are an error
  c.device_memory_gb = 0.0  # per device, for the memory plan; 0 = as the device reports (or none)
  # Before loading weights, compile the rollout and update with abstract params on the run's own
  # devices and refuse a run whose compiled peak exceeds 90% of device memory (kat_jax.aot):
  # "auto" = on TPU (the analytic plan is fitted to XLA:CPU), "on" / "off" = always / never.
  c.compile_check = "auto"
  c.rescore_student = False
  c.compact_multiple = 0
  # Long rollouts (kat_jax/rollout.py). slots: rows decoded at once (0 = one per rollout); with
  # fewer slots than prompts_per_step x samples_per_prompt, a finished row's slot takes the next
  # prompt (slot refill: the step ends when the total work is done, not when each batch's longest
  # row is; the KV caches hold `slots` rows). length_bucket: attention reads the prompt and the
  # first length_bucket, 2x, 4x, ... generated slots as rows fill them (0 = the whole buffer).
  c.rollout = ml_collections.ConfigDict(dict(slots=0, length_bucket=128))
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.max_consecutive_skips = 5
  c.eval_every = 0  # 0 = only before and after
  # False skips the evaluation before training: sweeps whose runs share the initial student and
  # the evaluation draws (one seed) need it once, not once per run.
  c.eval_before = True
  c.eval_size = 256  # problems per benchmark (training: 0 turns evaluation off; mode=eval: 0 = all)
  # Evaluation (kat_jax.evaluate): benchmarks are comma-separated specs, see
  # kat_jax/data/benchmarks.py ('arith', 'math500', 'aime24=/data/aime24.jsonl', 'my.jsonl');
  # "" = the training data's held-out prompts (arith's eval split, or data.eval_path / data.path
  # of a JSONL source), formatted exactly like the training prompts.
  # max_new_tokens 0 = auto (eval_config): the training max_new_tokens.
  c.eval = _section(evaluate.EvalConfig, benchmarks="", max_new_tokens=0, chat_template=True)
  c.export = True
  c.log_rollouts = False  # DIR/rollouts.jsonl: per-rollout length, trained length, cut, EOS
  # DIR/samples.jsonl for the dashboard (kat_jax.report, DIR/report.html): this many rollouts
  # (trapped ones first, up to half) with per-token text, KL and log-probs, at the first step,
  # every log_samples_every steps and the last; 0 = none.
  c.log_samples = 4
  c.log_samples_every = 10
  return c


def _fail(field: str, value, fix: str):
  raise ConfigError(f"config.{field}={value!r}: {fix}")


def _check_schema(config, schema, prefix=""):
  for key in config.keys():
    field = prefix + key
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f"did you mean {prefix + close[0]!r}?" if close else "remove it."
      raise ConfigError(f"config.{field} is not a known setting; {hint}")
    value, ref = config[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        _fail(field, value, "must be a group of settings (a ConfigDict).")
      _check_schema(value, ref, field + ".")
      continue
    ok = (isinstance(value, type(ref)) or (isinstance(ref, float) and isinstance(value, int)
                                           and not isinstance(value, bool)))
    if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, bool):
      ok = False
    if not ok:
      _fail(field, value, f"must be of type {type(ref).__name__}.")


def validate(config, workdir: str | None = None, check_models: bool = True) -> None:
  """Raises ConfigError (one line: field, value, fix) for anything the run cannot do."""
  _check_schema(config, defaults())
  _check_scalars(config)
  shape = _check_mesh_and_batch(config)
  _check_kat(config)
  _check_eval(config)
  _check_data(config)
  positions = _check_dataclasses(config)
  if config.mode == "train":
    _check_objective(config)
  if (config.kat.mode == "kat" and config.threshold.mode != "fixed"
      and config.threshold.estimator == "probe" and config.threshold.probe_fraction == 0):
    _fail("threshold.probe_fraction", 0.0, "leaves the 'probe' estimator without probe rows; set "
          "threshold.probe_fraction > 0 (e.g. 0.125) or threshold.estimator='censored'.")
  chunk = config.loss.chunk
  if 0 < chunk < positions and positions % chunk:
    divisors = [d for d in range(config.kat.window, positions + 1, config.kat.window)
                if positions % d == 0]
    _fail("loss.chunk", chunk, f"must divide the {positions} generated positions (max_new_tokens "
          f"rounded up to whole kat.window={config.kat.window} windows); use one of {divisors}.")
  if shares_base(config) and config.mesh.rollout_tensor > 1:
    _fail("mesh.rollout_tensor", config.mesh.rollout_tensor,
          "a LoRA student on the teacher's own checkpoint shares its base, and both stay in the "
          "training layout; set mesh.rollout_tensor=0 (or -1), or give a separate teacher.")
  if check_models:
    _check_models(config, shape)
  if workdir is not None and Path(workdir).exists() and not Path(workdir).is_dir():
    raise ConfigError(f"--workdir={workdir!r} exists and is not a directory; choose another path.")


def _check_scalars(config) -> None:
  """Counts, sizes and switches of the top level."""
  if config.mode not in ("train", "eval", "export"):
    _fail("mode", config.mode, "this validator is for the train / eval / export modes.")
  for field in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                "checkpoint_every", "keep_checkpoints", "max_consecutive_skips",
                "log_samples_every"):
    if config[field] < 1:
      _fail(field, config[field], "must be >= 1.")
  if config.attn_chunk < 0:
    _fail("attn_chunk", config.attn_chunk, "must be >= 0 (0 turns query chunking off).")
  if config.max_prompt_len < 1:
    _fail("max_prompt_len", config.max_prompt_len, "must be >= 1.")
  if config.compile_check not in ("auto", "on", "off"):
    _fail("compile_check", config.compile_check, "use 'auto' (on TPU), 'on' or 'off'.")
  if config.mesh.rollout_tensor < -1:
    _fail("mesh.rollout_tensor", config.mesh.rollout_tensor,
          "use -1 (the training layout), 0 (auto) or a group size >= 1.")
  for field in ("eval_size", "eval_every", "log_samples"):
    if config[field] < 0:
      _fail(field, config[field], "must be >= 0 (0 turns it off).")


def _check_mesh_and_batch(config) -> tuple[int, int, int]:
  """The mesh resolves on these devices and the batch splits over its batch shards (times the
  micro-batches); returns the mesh shape."""
  m = config.mesh
  try:
    shape = sharding.mesh_shape(m.data, m.fsdp, m.tensor)
  except ValueError as e:
    _fail("mesh", m.to_dict(), str(e))
  batch = config.prompts_per_step * config.samples_per_prompt
  if config.loss.microbatches < 0:
    _fail("loss.microbatches", config.loss.microbatches, "must be >= 0 (0 = auto).")
  if batch % (shape[0] * shape[1] * max(config.loss.microbatches, 1)):
    _fail("prompts_per_step", config.prompts_per_step,
          f"the batch prompts_per_step x samples_per_prompt = {batch} must be divisible by the "
          f"{shape[0] * shape[1]} batch shards (mesh data x fsdp) of the {jax.device_count()} "
          f"devices times loss.microbatches={config.loss.microbatches}.")
  if config.rollout.slots > 0:  # negative: RolloutConfig's range check (_check_dataclasses)
    try:
      rollout.resolve_slots(config.rollout.slots, batch, shape[0] * shape[1])
    except ConfigError as e:
      raise ConfigError(f"config.{e}") from None
  return shape


def _check_kat(config) -> None:
  if config.kat.window > config.max_new_tokens:
    _fail("kat.window", config.kat.window,
          f"longer than max_new_tokens={config.max_new_tokens}; lower kat.window or raise "
          "max_new_tokens.")
  if config.kat.mode == "random" and (not config.kat.random_lengths
                                      or min(config.kat.random_lengths) < 0):
    _fail("kat.random_lengths", list(config.kat.random_lengths)[:8],
          "mode='random' needs a non-empty list of lengths >= 0 to draw cut points from (e.g. a "
          "KAT run's trained lengths from its rollouts.jsonl; see configs/arith_compare.py).")


def _check_eval(config) -> None:
  """Benchmark specs parse and their files exist."""
  try:
    specs = benchmarks.parse_specs(config.eval.benchmarks) if config.eval.benchmarks else []
  except ValueError as e:
    _fail("eval.benchmarks", config.eval.benchmarks, str(e))
  for name, path in specs:
    if path is not None and not Path(path).is_file():
      _fail("eval.benchmarks", config.eval.benchmarks,
            f"benchmark file {path!r} ({name}) does not exist; give an existing JSONL file.")


def _check_data(config) -> None:
  """The prompt source exists, parses, and leaves prompts for a held-out evaluation."""
  if config.data.source not in ("arith", "jsonl", "reasoning_gym", "tfds"):
    _fail("data.source", config.data.source, "use 'arith', 'jsonl', 'reasoning_gym' or 'tfds'.")
  evaluates = config.mode == "eval" or (config.mode == "train" and config.eval_size > 0)
  if config.data.source == "tfds":
    splits = ("split", "eval_split") if evaluates and not config.eval.benchmarks else ("split",)
    for field in splits:  # opens the dataset's metadata only
      try:
        sources.TfdsSource(config.data.path, config.data[field], config.data.seed,
                           config.data.prompt_field, config.data.answer_field)
      except (ImportError, FileNotFoundError, ValueError) as e:  # each names its field
        raise ConfigError(f"config.data.source='tfds': {e}") from None
  if config.data.extract not in ("boxed", "last_number"):
    _fail("data.extract", config.data.extract, "use 'boxed' or 'last_number'.")
  if config.data.source == "reasoning_gym":
    if not 1 <= config.data.size <= gym.MAX_SIZE:
      _fail("data.size", config.data.size, f"must be between 1 and {gym.MAX_SIZE}.")
    try:  # names and settings; one item each (some generators build all their items up front)
      gym.make_datasets(config.data.tasks, config.data.seed, 1)
    except ValueError as e:
      _fail("data.tasks", config.data.tasks, str(e))
  if config.data.source == "jsonl" and not Path(config.data.path).is_file():
    _fail("data.path", config.data.path, "no such file; give a JSONL file of "
          '{"prompt": ..., "answer": ...} lines.')
  if (config.data.source == "jsonl" and evaluates and not config.eval.benchmarks
      and not config.data.eval_path):  # the held-out prompts come from data.path itself
    if config.data.heldout_size == 0:
      _fail("data.heldout_size", 0, "with no data.eval_path nothing is held out, and evaluation "
            "would grade training prompts; set data.eval_path, data.heldout_size > 0, "
            "eval.benchmarks, or eval_size=0.")
    try:
      n = len(sources.read_jsonl(Path(config.data.path)))
    except ValueError as e:
      _fail("data.path", config.data.path, str(e))
    if n < 2:
      _fail("data.heldout_size", config.data.heldout_size,
            f"data.path holds {n} record: too few to hold any out for evaluation; give "
            "data.eval_path, eval.benchmarks, or eval_size=0.")
  if config.data.heldout_size < 0:
    _fail("data.heldout_size", config.data.heldout_size, "must be >= 0.")


def _check_dataclasses(config) -> int:
  """The dataclasses' own range checks, reported with the config field; returns the rollout's
  buffer length (max_new_tokens rounded up to whole KAT windows)."""
  try:  # the dataclasses' own range checks, reported with the config field
    positions = rollout_config(config, (0,), 0, 2**31 - 1).buffer_len
    threshold_config(config)
    opd.OptimConfig(**config.optim)
    lora_config(config)
    if config.loss.temperature < 0:
      raise ConfigError(f"loss.temperature={config.loss.temperature} must be >= 0 (0 = the "
                        "sampling temperature).")
    loss_config(config, 1)
    eval_config(config)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  return positions


def _check_models(config, shape) -> None:
  """Model directories, student / teacher compatibility, top-k within the vocabulary and the
  rollout's tensor-parallel groups against the heads (reads config.json / tokenizer files only)."""
  # mode=eval samples from the student alone: no teacher needed.
  for field in ("student",) if config.mode == "eval" else ("student", "teacher"):
    path = Path(config[field])
    if not (path / "config.json").is_file():
      _fail(field, config[field], "not a Hugging Face model directory (no config.json); give "
            "the path of a local model directory.")
  if config.data.source == "reasoning_gym" and config.data.chat_template:
    if chat.load_template(config.student)[0] is None:
      _fail("data.chat_template", True, f"the student {config.student} has no chat template; "
            "set data.chat_template=False (a base model) or use an instruct model.")
  try:
    vocab = (hf.check_compatible(config.student, config.teacher).vocab_size
             if config.mode != "eval" else None)
  except ValueError as e:
    raise ConfigError(f"config.student / config.teacher: {e}") from None
  try:
    if vocab is not None:
      rollout.check_top_k(rollout.SamplingConfig(**config.sampling), vocab, "sampling")
      rollout.check_top_k(rollout.SamplingConfig(top_k=config.eval.top_k), vocab, "eval")
      if config.kat.mode == "topk" and config.kat.topk_k > vocab:
        _fail("kat.topk_k", config.kat.topk_k, f"exceeds the {vocab}-token vocabulary; the "
              "overlap of two top-k sets needs k below it (Prune-OPD uses 16).")
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  roles = ("student",) if config.mode == "eval" else ("student", "teacher")
  try:
    sharding.resolve_rollout_tensor(config.mesh.rollout_tensor, sharding.make_mesh(shape),
                                    [hf.read_config(config[r]) for r in roles])
  except ValueError as e:
    _fail("mesh.rollout_tensor", config.mesh.rollout_tensor,
          str(e).split(": ", 1)[-1].replace("mesh.rollout_tensor=", "group size "))


def _check_objective(config) -> None:
  """sampled_pg is on-policy only when the loss scores the very distribution that sampled."""
  if config.loss.objective != "sampled_pg":
    return
  s = config.sampling
  fix = "use loss.objective='reverse_kl' (exact KL at every state, any sampling) instead."
  if s.temperature == 0:
    _fail("sampling.temperature", 0.0, "greedy decoding has no sampling distribution for "
          f"sampled_pg's importance ratio; sample at a temperature > 0, or {fix}")
  if s.top_k or s.top_p < 1:
    _fail("sampling.top_k" if s.top_k else "sampling.top_p", s.top_k or s.top_p,
          "sampled_pg scores the untruncated softmax, so with top-k / top-p sampling its "
          "'on-policy' ratio is not 1 (measured mean 0.5-0.8); set sampling.top_k=0 and "
          f"sampling.top_p=1.0, or {fix}")
  if config.loss.temperature and config.loss.temperature != s.temperature:
    _fail("loss.temperature", config.loss.temperature,
          f"differs from sampling.temperature={s.temperature}: sampled_pg's ratio would be "
          "pi^T_loss / pi^T_sample, not 1, on-policy (measured 0.59-2.65); set "
          "loss.temperature=0 (follow the sampling temperature) or equal to it.")


def loss_config(config, vocab_size: int):
  """The update's LossConfig. loss.temperature 0: sampled_pg follows the sampling temperature (it
  must score the policy that sampled); the full-vocabulary objectives use 1, the KL between the
  models' own distributions (GKD's temperature stays an explicit knob)."""
  follow = config.loss.objective == "sampled_pg" and config.sampling.temperature > 0
  temperature = config.loss.temperature or (config.sampling.temperature if follow else 1.0)
  return opd.LossConfig(vocab_size=vocab_size,
                        **{**config.loss.to_dict(), "temperature": temperature})


def lora_config(config) -> LoraConfig:
  """The student's adapters (config.lora; rank 0 = none)."""
  lc = config.lora
  return LoraConfig(rank=lc.rank, alpha=float(lc.alpha), targets=lora.parse_targets(lc.targets),
                    init=lc.init)


def shares_base(config) -> bool:
  """A LoRA student on the teacher's own checkpoint: the teacher is the student's base with the
  adapters off, one copy of the weights for both (self-distillation)."""
  return (config.lora.rank > 0
          and Path(config.student).resolve() == Path(config.teacher).resolve())


def kat_config(config) -> kat.KATConfig:
  """The truncation policy's static settings (config.kat without the rollout's traced inputs)."""
  return kat.KATConfig(**{f.name: config.kat[f.name] for f in dataclasses.fields(kat.KATConfig)})


def rollout_config(config, eos_ids, pad_id, vocab_size) -> rollout.RolloutConfig:
  return rollout.RolloutConfig(
      max_new_tokens=config.max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id,
      vocab_size=vocab_size, sampling=rollout.SamplingConfig(**config.sampling),
      kat=kat_config(config),
      rescore_student=config.rescore_student, compact_multiple=config.compact_multiple,
      slots=config.rollout.slots, length_bucket=config.rollout.length_bucket)


def threshold_config(config) -> threshold.ThresholdConfig:
  return threshold.ThresholdConfig(**config.threshold)


def eval_config(config) -> evaluate.EvalConfig:
  e = config.eval
  return evaluate.EvalConfig(
      n=e.n, k=e.k, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
      max_new_tokens=e.max_new_tokens or config.max_new_tokens, batch_size=e.batch_size,
      workers=e.workers, bootstrap=e.bootstrap)
