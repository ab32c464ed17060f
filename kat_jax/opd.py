"""One OPD update on a finished rollout: student forward with grads, objective, optax update.

Split from the rollout on purpose: the rollout is a while_loop with no gradients; the update is a
plain forward/backward over [prompt + generated] whose loss mask is the rollout's (EOS kept, the
KAT-cut tail dropped). The teacher is only run here for the full-vocabulary objectives; `sampled_pg`
uses the per-token teacher log-probs the rollout already computed.

A non-finite loss or gradient skips the update (params and optimizer state unchanged) and is
reported in the metrics, so the caller can count consecutive skips and stop the run. A batch with
no trained token (every row cut at 0 by KAT) leaves them unchanged too (`empty`): Adam's momentum
would otherwise still move the params on a step that carries no signal.

Gradient accumulation (`optim.accumulation_steps` = k) is token-weighted: the applied gradient is
the sum of the k steps' per-token gradients over their total trained tokens -- the gradient of one
batch holding all k steps' tokens -- not the mean of k per-step means (with KAT, step token counts
differ a lot). Schedules count training steps, whatever k.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kat_jax import losses
from kat_jax.errors import ConfigError
from kat_jax.rollout import RolloutResult
from kat_jax.sharding import to_host


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 5e-5  # Tinker's full fine-tuning default for OPD
  warmup_steps: int = 0
  schedule: str = "constant"  # constant | cosine (after warm-up, to 0 at total_steps)
  total_steps: int = 100
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float = 1.0  # global-norm clipping; 0 = off
  accumulation_steps: int = 1  # k training steps per optimizer update, token-weighted
  # Mixed precision: 'auto' keeps a float32 master copy of the trained params (and float32
  # optimizer moments) when the student's params are bf16 / fp16 and fully trained; the rollout
  # and the forward / backward use the low-precision params, each update applies to the master
  # and re-casts (float32 params and LoRA's float32 adapters need no copy). 'off' updates the
  # low-precision params directly: an update below half a bf16 ulp of a weight is lost.
  master: str = "auto"

  def __post_init__(self):
    if self.master not in ("auto", "off"):
      raise ConfigError(f"optim.master={self.master!r}; use 'auto' (float32 master weights for a "
                        "bf16 / fp16 student) or 'off'.")
    if self.schedule not in ("constant", "cosine"):
      raise ConfigError(f"optim.schedule={self.schedule!r}; use 'constant' or 'cosine'.")
    if self.learning_rate <= 0 or self.accumulation_steps < 1:
      raise ConfigError(f"optim.learning_rate={self.learning_rate} must be > 0 and "
                        f"optim.accumulation_steps={self.accumulation_steps} >= 1.")


def learning_rate(cfg: OptimConfig):
  """The schedule as a function of the *training* step (warmup_steps, total_steps count them)."""
  if cfg.schedule == "cosine" and cfg.warmup_steps == 0:  # no warm-up: the peak rate at step 0
    return optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.total_steps, 1))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                              max(cfg.total_steps, cfg.warmup_steps + 1))
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                               optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])


def uses_master(cfg: OptimConfig, param_dtype: str, lora_rank: int = 0) -> bool:
  """Whether the run keeps float32 master weights (OptimConfig.master) for these params."""
  # A LoRA student's trained params, its adapters, are float32 already: no second copy.
  return cfg.master != "off" and lora_rank == 0 and param_dtype in ("bfloat16", "float16")


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
  """Clipping + AdamW; its `update` takes `num_tokens=` (the step's trained tokens)."""
  k = cfg.accumulation_steps
  schedule = learning_rate(cfg)
  # optax counts applied updates; update u starts at training step u * k.
  lr = schedule if k == 1 else (lambda count: schedule(count * k))
  chain = ([optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []) + [
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)]
  tx = optax.chain(*chain)
  return token_weighted_accumulation(tx, k) if k > 1 else tx


def optimizer_shardings(tx: optax.GradientTransformation, params):
  """Where each leaf of `tx.init(params)` belongs: a leaf shaped like a param (Adam moments,
  accumulated gradients) beside that param; the rest (counts) replicated over its mesh.
  None when the params are not on a mesh. Works on concrete or abstract (ShapeDtypeStruct)
  params."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  meshes = {x.sharding.mesh for _, x in flat
            if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)}
  if not meshes:
    return None
  (mesh,) = meshes
  by_path = {jax.tree_util.keystr(p): x for p, x in flat}
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(path, leaf):
    key = jax.tree_util.keystr(path)
    for p, x in by_path.items():
      if key.endswith(p) and tuple(x.shape) == tuple(leaf.shape):
        return x.sharding
    return one

  return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, params))


def init_optimizer(tx: optax.GradientTransformation, params):
  """`tx.init(params)` with its state where `optimizer_shardings` says. A plain `tx.init` puts
  zeros made from a shape (e.g. fp32 accumulators) on one device -- replicated over the mesh
  later, a whole fp32 copy of the params per device -- and, jitted, replicates the moments."""
  where = optimizer_shardings(tx, params)
  return tx.init(params) if where is None else jax.jit(tx.init, out_shardings=where)(params)


class AccumulationState(NamedTuple):
  inner: optax.OptState
  grad_sum: optax.Params  # float32 sum over the steps so far of (per-token-mean grad x tokens)
  tokens: jax.Array  # float32: trained tokens so far
  mini_step: jax.Array  # int32: steps accumulated so far (< k)


def token_weighted_accumulation(inner: optax.GradientTransformation, every_k: int
                                ) -> optax.GradientTransformationExtraArgs:
  """Applies `inner` every `every_k` steps to sum(g_i * n_i) / sum(n_i), where g_i is step i's
  gradient of its per-token mean loss and n_i its trained tokens; returns zero updates between."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    # fp32 sums whatever the param dtype (bf16 on accelerators): small steps are not lost.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return AccumulationState(inner.init(params), zeros, jnp.zeros((), jnp.float32),
                             jnp.zeros((), jnp.int32))

  def update(grads, state, params=None, *, num_tokens, **extra):
    n = jnp.asarray(num_tokens, jnp.float32)
    grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32) * n, state.grad_sum, grads)
    tokens = state.tokens + n

    def apply():
      mean = jax.tree.map(lambda x, g: (x / jnp.maximum(tokens, 1.0)).astype(g.dtype), grad_sum,
                          grads)
      updates, new_inner = inner.update(mean, state.inner, params, **extra)
      return updates, AccumulationState(new_inner, jax.tree.map(jnp.zeros_like, grad_sum),
                                        jnp.zeros_like(tokens), jnp.zeros_like(state.mini_step))

    def hold():
      return (jax.tree.map(jnp.zeros_like, grads),
              AccumulationState(state.inner, grad_sum, tokens, state.mini_step + 1))

    return jax.lax.cond(state.mini_step + 1 >= every_k, apply, hold)

  return optax.GradientTransformationExtraArgs(init, update)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  objective: str = "sampled_pg"
  beta: float = 0.5  # jsd only (TRL convention: 0 = forward KL, 1 = reverse KL)
  # The student's distribution in the loss is softmax(logits / temperature); the config's 0
  # resolves to the sampling temperature for sampled_pg (on-policy), 1 otherwise
  # (config.loss_config).
  temperature: float = 1.0
  # sampled_pg: truncated importance sampling -- weight each token by min(ratio, ratio_clip),
  # a constant -- against small sampling / training mismatches (bf16); 0 = off (exact on-policy).
  ratio_clip: float = 0.0
  vocab_size: int = 0  # shared vocabulary (logits are sliced to it)
  # Rows of the batch go through the forward / backward in this many sequential chunks (a scan
  # that sums their gradients): activation memory / microbatches, the same loss and gradient.
  # 0 = auto (`resolve_microbatches`): on CPU, chunks of ~CPU_MICROBATCH_TOKENS tokens, whose
  # activations stay in cache (measured 1.6x faster updates); on GPU / TPU, 1.
  microbatches: int = 0
  # The LM head and loss over chunks of this many positions (0 = all at once): the [B, T, V]
  # logits never exist whole, only [B, chunk, V]. Same loss and gradient.
  chunk: int = 0
  # Used by the training loop, not by `update`: run the update on the rollout trimmed to its
  # longest trained row (`trim`); False keeps one update shape per prompt bucket (fewer compiles).
  trim: bool = True

  def __post_init__(self):
    if self.microbatches < 0 or self.chunk < 0:
      raise ConfigError(f"loss.microbatches={self.microbatches} must be >= 0 (0 = auto) and "
                        f"loss.chunk={self.chunk} >= 0.")
    if self.objective not in losses.OBJECTIVES:
      raise ConfigError(f"loss.objective={self.objective!r}; use one of {losses.OBJECTIVES}.")
    if not 0 <= self.beta <= 1 or self.temperature <= 0:
      raise ConfigError(f"loss.beta={self.beta} must be in [0, 1] and loss.temperature="
                        f"{self.temperature} > 0.")
    if self.ratio_clip < 0:
      raise ConfigError(f"loss.ratio_clip={self.ratio_clip} must be >= 0 (0 = off; e.g. 2.0).")


# On XLA CPU the update is memory-bound, not matmul-bound: a [B*S, 4E] MLP activation or the
# [B, H, S, S] scores of a whole batch spill out of the caches at every elementwise pass. Rows in
# chunks of about this many tokens keep them in L2/L3. Measured (bench/opd_step.py pair, B=32,
# S=160, 2 cores): 306 ms unchunked, 237 / 205 / 192 ms in 2 / 4 / 8 chunks (8: 4 rows, 640 tokens
# each), worse again in chunks of 320 tokens; the same optimum for a 19M student and for S=288.
CPU_MICROBATCH_TOKENS = 512


def resolve_microbatches(requested: int, batch: int, seq_len: int, batch_shards: int = 1,
                         backend: str | None = None) -> int:
  """The number of row chunks the update runs in: `requested`, or for 0 (auto) on CPU the most
  chunks that still give each device >= CPU_MICROBATCH_TOKENS tokens at a time, and 1 on GPU /
  TPU (there microbatching only saves memory, and the bigger kernels are faster).

  Every chunk takes the same number of rows from each of the `batch_shards` batch shards.
  """
  if requested:
    return requested
  if (backend or jax.default_backend()) != "cpu" or batch % batch_shards:
    return 1
  local = batch // batch_shards
  rows = next(r for r in range(1, local + 1)
              if local % r == 0 and (r * seq_len >= CPU_MICROBATCH_TOKENS or r == local))
  return local // rows


_PER_TOKEN = ("tokens_BxT", "logp_student_BxT", "logp_teacher_BxT", "logp_behavior_BxT", "kl_BxT",
              "overlap_BxT", "loss_mask_BxT", "loss_weight_BxT")


def trim(result: RolloutResult, window: int, chunk: int = 0) -> RolloutResult:
  """The rollout cut to the positions the update trains on: its per-token arrays sliced to the
  longest trained row, rounded up to one of a few lengths -- window multiples that double from
  ~1/8 of the buffer (so a run compiles the update for at most ~4 lengths per prompt bucket) --
  and, past one loss chunk, to whole `loss.chunk`s.

  Rows that stop early (EOS, KAT's cut) then stop costing update compute too, as the rollout's
  batch compaction makes them stop costing rollout compute. Positions past every row's trained
  length are masked out of the loss and, the attention being causal, feed no trained position:
  the loss and gradient are unchanged. One host read of [B] lengths.
  """
  t = result.tokens_BxT.shape[1]
  longest = int(np.max(to_host(result.trained_len_B)))
  units = max(1, (t // window) // 8)
  while units * window < min(longest, t):
    units *= 2
  length = min(t, units * window)
  if chunk and chunk < length and length % chunk:
    length = min(t, -(-length // chunk) * chunk)  # validate: chunk divides t when chunk < t
  if length == t:
    return result
  return result.replace(**{f: getattr(result, f)[:, :length] for f in _PER_TOKEN})


def training_batch(prompt_BxP, start_B, result: RolloutResult):
  """Sequences [B, P + T], their attention mask, and where the generated logits sit."""
  seq = jnp.concatenate([prompt_BxP, result.tokens_BxT], axis=1)
  p = prompt_BxP.shape[1]
  t = result.tokens_BxT.shape[1]
  in_prompt = jnp.arange(p)[None, :] >= start_B[:, None]
  in_gen = jnp.arange(t)[None, :] < result.length_B[:, None]
  return seq, jnp.concatenate([in_prompt, in_gen], axis=1)


def cast_params(tree, dtype):
  """`tree` with every leaf cast to `dtype` (None: unchanged): master weights <-> their copy."""
  return tree if dtype is None else jax.tree.map(lambda x: x.astype(dtype), tree)


def _loss(s_params, s_graph, s_frozen, t_model, prompt_BxP, start_B, result: RolloutResult,
          cfg: LossConfig, num_tokens, master_cast=None):
  # Master weights: the forward runs on the params cast to the student's dtype; the gradient
  # flows back through the cast to the float32 master.
  merge = lambda p: nnx.merge(s_graph, cast_params(p, master_cast), *s_frozen)  # noqa: E731
  student = merge(s_params)
  seq, attn = training_batch(prompt_BxP, start_B, result)
  p = prompt_BxP.shape[1]
  v = cfg.vocab_size or student.cfg.vocab_size
  # Position p + i - 1 predicts generated token i; the prompt positions' logits are never formed.
  s_hidden = student.hidden(seq, attn)[:, p - 1:-1]
  t_hidden = None
  if cfg.objective != "sampled_pg":
    t_hidden = jax.lax.stop_gradient(t_model.hidden(seq, attn)[:, p - 1:-1])
  per_token = (result.loss_mask_BxT, result.loss_weight_BxT, result.tokens_BxT,
               result.logp_student_BxT, result.logp_teacher_BxT, result.logp_behavior_BxT)

  def head_loss(s_params, s_hidden, t_hidden, mask, weight, tokens, lp_s, lp_t, lp_b):
    s_logits = merge(s_params).logits(s_hidden)[..., :v]
    t_logits = None if t_hidden is None else jax.lax.stop_gradient(
        t_model.logits(t_hidden)[..., :v])
    return losses.opd_loss(cfg.objective, s_logits, mask, tokens_BxT=tokens, logp_student_BxT=lp_s,
                           logp_teacher_BxT=lp_t, logp_behavior_BxT=lp_b,
                           teacher_logits_BxTxV=t_logits, beta=cfg.beta,
                           temperature=cfg.temperature, ratio_clip=cfg.ratio_clip,
                           num_tokens=num_tokens, weight_BxT=weight)

  t = s_hidden.shape[1]
  c = cfg.chunk
  if not c or c >= t:
    return head_loss(s_params, s_hidden, t_hidden, *per_token)
  # The LM head and the objective over chunks of `c` positions: only one chunk's [B, c, V] logits
  # exist at a time, forward and backward (jax.checkpoint recomputes them in the backward pass).
  # Every chunk is normalised by the whole batch's trained tokens, so the sum is the full loss.
  if t % c:
    raise ConfigError(f"loss.chunk={c} must divide the {t} generated positions (a multiple of "
                      "kat.window).")
  to_chunks = lambda x: None if x is None else jnp.moveaxis(  # noqa: E731
      x.reshape(x.shape[0], t // c, c, *x.shape[2:]), 1, 0)
  xs = tuple(to_chunks(x) for x in (s_hidden, t_hidden, *per_token))
  step = jax.checkpoint(head_loss)

  def body(total, x):
    return total + step(s_params, *x), None

  return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


@functools.partial(jax.jit, static_argnames=("s_graph", "t_graph", "tx", "cfg", "batch_shards",
                                             "master_cast"),
                   donate_argnames=("s_params", "opt_state"))
def update(s_graph, s_params, t_graph, t_params, opt_state, prompt_BxP, start_B,
           result: RolloutResult, *, tx: optax.GradientTransformation, cfg: LossConfig,
           batch_shards: int = 1, s_frozen=None, master_cast: str | None = None):
  """Returns (new params, new optimizer state, metrics); skips the update if non-finite
  (`skipped`) or if no token is trained (`empty`).

  s_params are the params trained (kat_jax.lora.split: all of them, or a LoRA student's
  adapters) and s_frozen the rest of the student (read, never differentiated or changed).
  master_cast: s_params are float32 master weights; the forward casts them to this dtype.
  batch_shards: how many ways the batch is split over the mesh (data x fsdp), so that each row
  chunk of `cfg.microbatches` takes rows from every shard.
  """
  frozen = () if s_frozen is None else (s_frozen,)
  teacher = nnx.merge(t_graph, t_params)
  num_tokens = jnp.sum(result.loss_mask_BxT)
  grad_fn = jax.value_and_grad(_loss)
  b = prompt_BxP.shape[0]
  m = resolve_microbatches(cfg.microbatches, b, prompt_BxP.shape[1] + result.tokens_BxT.shape[1],
                           batch_shards)
  if m == 1:
    loss, grads = grad_fn(s_params, s_graph, frozen, teacher, prompt_BxP, start_B, result, cfg,
                          num_tokens, master_cast)
  else:
    # Every chunk's loss is already normalised by the whole batch's trained tokens, so the sums
    # over chunks are exactly the full-batch loss and gradient.
    if b % (m * batch_shards):
      raise ConfigError(f"loss.microbatches={m} times the {batch_shards} batch shards must divide "
                        f"the batch of {b} rows.")
    # Strided chunks (chunk j = rows j, j + m, ...): with the batch sharded in contiguous blocks,
    # every chunk takes b / (m * shards) rows from each shard, so no row changes device.
    split = lambda x: jnp.swapaxes(x.reshape(b // m, m, *x.shape[1:]), 0, 1)  # noqa: E731
    chunks = jax.tree.map(split, (prompt_BxP, start_B, result))

    def body(carry, chunk):
      loss_sum, grad_sum = carry
      l, g = grad_fn(s_params, s_graph, frozen, teacher, *chunk, cfg, num_tokens, master_cast)
      return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

    zeros = jax.tree.map(jnp.zeros_like, s_params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), chunks)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  apply = finite & (num_tokens > 0)
  # Zeroed grads keep the optimizer math finite on the skipped branch; its result is discarded.
  safe_grads = jax.tree.map(lambda g: jnp.where(apply, g, 0.0), grads)
  updates, new_opt = optax.with_extra_args_support(tx).update(
      safe_grads, opt_state, s_params, num_tokens=num_tokens)
  new_params = optax.apply_updates(s_params, updates)
  keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
  new_params = jax.tree.map(keep, new_params, s_params)
  new_opt = jax.tree.map(keep, new_opt, opt_state)
  metrics = dict(loss=loss, grad_norm=grad_norm, skipped=~finite, empty=num_tokens == 0,
                 trained_tokens=num_tokens)
  return new_params, new_opt, metrics
