"""The fused on-policy rollout: student sampling, teacher scoring, per-token KL and KAT in one loop.

One `lax.while_loop` iteration handles one KAT window of W tokens for the whole batch:
  1. the student samples W tokens, one cached decode step each (a `lax.scan`);
  2. the teacher scores the W tokens in ONE cached chunk forward -- a prefill-like, matmul-bound
     call instead of W memory-bound single steps (measured ~3x faster than a per-token teacher);
  3. per token, in fp32 over the shared vocabulary: log p_s(y), log p_t(y), log p_behavior(y) (the
     tempered / truncated sampling distribution, for importance weights) and the exact
     KL(p_s || p_t) -- reduced to [B] scalars at once: no [B, T, V] buffer ever exists;
  4. the KAT window test (`kat.window_update`) stops trapped rows -- except *probe* rows, whose
     cut is recorded for the loss but whose generation goes on, so that the adaptive threshold
     sees uncensored statistics (kat_jax/threshold.py).
A row stops on any EOS id, at `max_new_tokens`, or by KAT; the loop exits when every row has.

Long rollouts: the cost of a step follows the filled length. Each loop call attends over a static
prefix of the caches (prompt + `filled` new-token slots, `filled` a power-of-two bucket from
`length_bucket` up to the buffer), and exits when its oldest live row would cross it; the host then
continues at the next bucket. A 2048-token rollout thus spends its first 128 tokens attending
over 128 slots, not 2048.

Rows that stop early must stop costing compute, two ways, both host-driven loop exits:
  * slot refill (`slots` < rollouts): the loop runs `slots` rows; once `refill` rows have stopped,
    it exits, the finished rows are parked in a result buffer, and the next prompts are prefilled
    into the freed slots (every row keeps its own token clock, cache end and KAT windows), so the
    rollout ends when the total work is done, not when the longest row of each batch is;
  * compaction (no prompt left to start): the loop exits once the live rows fit a smaller batch
    bucket (multiples of slots / 8), and continues on those rows only (a cheaper compiled loop).
Sampling keys are derived per row from (key, token index, rollout id), so refill, compaction,
buckets and sharding never change a sample.

Distribution alignment: the logits that predict window token i come from the previous token, so the
state carries each model's next-token logits [B, V] across windows (`s_next`, `t_next`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kat_jax import kat as kat_lib
from kat_jax import threshold as threshold_lib
from kat_jax.errors import ConfigError
from kat_jax.models import KVCache, Transformer
from kat_jax.sharding import put_batch, replicate, to_host


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ConfigError(f"sampling: temperature={self.temperature} must be >= 0, top_k="
                        f"{self.top_k} >= 0 and top_p={self.top_p} in (0, 1].")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  pad_id: int
  vocab_size: int  # shared tokenizer vocabulary: both models' logits are sliced to it
  sampling: SamplingConfig = SamplingConfig()
  kat: kat_lib.KATConfig = kat_lib.KATConfig()
  # Recompute the student's window distributions with one chunk forward instead of keeping the W
  # sampling-step logits ([B, W, V] floats): costs a student chunk forward, saves that memory.
  rescore_student: bool = False
  # Batch compaction granularity in rows (0: slots / 8, at least 1); -1 disables compaction.
  # Also the refill group: with slot refill, the loop stops to refill once this many rows are free.
  compact_multiple: int = 0
  # Decode slots (rows decoded at once); 0 = one per rollout. Fewer slots than rollouts: finished
  # rows' slots take the next prompts (slot refill), and the KV caches hold `slots` rows.
  slots: int = 0
  # First filled-length bucket, in new tokens: attention reads prompt + this many slots, then
  # twice as many, ... up to the buffer (0 = always the whole cache).
  length_bucket: int = 128

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
    if self.slots < 0 or self.length_bucket < 0:
      raise ConfigError(f"rollout.slots={self.slots} and rollout.length_bucket="
                        f"{self.length_bucket} must be >= 0 (0: off).")
    if not self.eos_ids:
      raise ConfigError("eos_ids is empty: give at least one end-of-sequence token id.")
    check_top_k(self.sampling, self.vocab_size, "sampling")

  @property
  def window(self) -> int:
    return self.kat.window

  @property
  def buffer_len(self) -> int:
    """Per-token buffer length: max_new_tokens rounded up to whole windows."""
    return -(-self.max_new_tokens // self.window) * self.window

  @property
  def fill_buckets(self) -> tuple[int, ...]:
    """The new-token lengths the decode loop attends over, ascending (see `length_buckets`)."""
    return length_buckets(self.buffer_len, self.length_bucket, self.window)


def length_buckets(total: int, first: int, multiple: int = 1) -> tuple[int, ...]:
  """`first`, 2 * first, 4 * first, ... (multiples of `multiple`) up to `total`; (total,) if
  first is 0 or >= total. Each is one compiled loop; doubling keeps the slots read within 2x of
  the slots filled and the programs few (6 for 4096 new tokens from 128)."""
  if first <= 0 or first >= total:
    return (total,)
  out, n = [], -(-first // multiple) * multiple
  while n < total:
    out.append(n)
    n *= 2
  return tuple(out) + (total,)


@flax.struct.dataclass
class RolloutState:
  """Everything the decode loop carries; donated to each loop call so buffers are reused."""
  tokens_BxT: jax.Array
  logp_student_BxT: jax.Array
  logp_teacher_BxT: jax.Array
  logp_behavior_BxT: jax.Array
  kl_BxT: jax.Array
  overlap_BxT: jax.Array  # kat.mode='topk': top-k overlap per token (else never written, zeros)
  window_mean_BxN: jax.Array  # per-window mean of the KAT signal (adaptive threshold input)
  window_complete_BxN: jax.Array
  s_cache: KVCache
  t_cache: KVCache
  s_next_BxV: jax.Array
  t_next_BxV: jax.Array
  length_B: jax.Array
  eos_B: jax.Array
  done_B: jax.Array
  kat: kat_lib.KATState
  probe_B: jax.Array  # bool: KAT records this row's cut but never stops its generation
  row_id_B: jax.Array  # the rollout this slot holds (refill and compaction reorder rows)
  step_B: jax.Array  # int32: the row's token clock, windows entered x W (frozen once done)
  clock: jax.Array  # int32 []: windows run by this rollout so far (the schedule's time axis)
  key: jax.Array
  tau: jax.Array  # the policy's traced threshold: KAT's tau; mode='horizon': the horizon
  spike_tau: jax.Array


@flax.struct.dataclass
class RolloutResult:
  """Per-row outputs in the original row order; per-token arrays are [B, buffer_len]."""
  tokens_BxT: jax.Array  # generated tokens, pad after each row's length
  length_B: jax.Array  # generated tokens (EOS included)
  eos_B: jax.Array  # ended by EOS
  logp_student_BxT: jax.Array  # log p_student(y_t), temperature 1, shared vocab
  logp_teacher_BxT: jax.Array
  logp_behavior_BxT: jax.Array  # log-prob under the actual sampling distribution
  kl_BxT: jax.Array  # full-vocabulary KL(p_student || p_teacher) at each position
  overlap_BxT: jax.Array  # kat.mode='topk': the student's top-k share in the teacher's top-k
  terminated_B: jax.Array  # cut by KAT (or truncated in the fixed / random ablations)
  detect_B: jax.Array
  onset_B: jax.Array
  trained_len_B: jax.Array  # the loss keeps tokens [0, trained_len)
  loss_mask_BxT: jax.Array
  loss_weight_BxT: jax.Array  # float32 per-token loss weight (kat.loss_weights): 0 off the mask
  window_mean_BxN: jax.Array
  window_complete_BxN: jax.Array
  probe_B: jax.Array  # KAT's cut applies to the loss only: the row was generated to its end

  @property
  def logratio_BxT(self):
    return self.logp_student_BxT - self.logp_teacher_BxT

  def windows(self, window: int) -> threshold_lib.Windows:
    """The window statistics the adaptive threshold observes."""
    return threshold_lib.Windows(
        mean_BxN=self.window_mean_BxN, complete_BxN=self.window_complete_BxN,
        probe_B=self.probe_B, terminated_B=self.terminated_B,
        detect_window_B=jnp.where(self.terminated_B, self.detect_B // window, -1))


# --------------------------------------------------------------------------------- sampling


def check_top_k(cfg: SamplingConfig, vocab_size: int, field: str) -> None:
  if cfg.top_k > vocab_size:
    raise ConfigError(f"{field}.top_k={cfg.top_k}: exceeds the {vocab_size}-token vocabulary; use "
                      f"0 (off) or a value <= {vocab_size}.")


def sample(logits_BxV, keys_B, cfg: SamplingConfig):
  """Samples one token per row with its own key; returns (tokens_B, log p_behavior(token)_B)."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), jnp.zeros(logits_BxV.shape[:1])
  x = logits_BxV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth_Bx1 = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
    x = jnp.where(x < kth_Bx1, -jnp.inf, x)
  if cfg.top_p < 1:
    # Keep the smallest set of tokens whose probability reaches top_p (ties at the edge kept).
    sorted_BxV = jnp.sort(x, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < cfg.top_p, axis=-1, keepdims=True)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept - 1, axis=-1)
    x = jnp.where(x < threshold_Bx1, -jnp.inf, x)
  tokens_B = jax.vmap(jax.random.categorical)(keys_B, x).astype(jnp.int32)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, logp_B


def bucket_length(n: int, minimum: int = 8) -> int:
  """Next power of two >= n: prompt batches within a bucket share one compiled rollout."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_prompts(prompts: list[list[int]], pad_id: int, length: int | None = None):
  """Left-pads token lists to a bucketed length; returns (prompt_BxP int32, start_B int32)."""
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ValueError("an empty prompt cannot be rolled out: every prompt needs >= 1 token.")
  length = length or bucket_length(longest)
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the prompt length {length}.")
  out = np.full((len(prompts), length), pad_id, np.int32)
  start = np.zeros(len(prompts), np.int32)
  for i, p in enumerate(prompts):
    out[i, length - len(p):] = p
    start[i] = length - len(p)
  return out, start


# ------------------------------------------------------------------------------ jitted parts


def _last_logits(model: Transformer, tokens_BxP, cache: KVCache, vocab: int):
  # Prefill of a new cache: only the last position's logits are needed, so the [B, P, V]
  # projection is skipped, and the prompt attends to its own P slots only.
  h, cache = model.decode_hidden(tokens_BxP, cache, fresh=True)
  return model.logits(h[:, -1:])[:, 0, :vocab], cache


@functools.partial(jax.jit, static_argnames=("s_graph", "t_graph", "cfg", "prompt_only"))
def prefill(s_graph, s_params, t_graph, t_params, prompt_BxP, start_B, probe_B, key, tau,
            spike_tau, row_id_B=None, *, cfg: RolloutConfig, prompt_only: bool = False
            ) -> RolloutState:
  """Both models' prompt forwards (fresh caches) and the loop's initial state: the program
  `rollout` runs first (also compiled on its own by kat_jax.aot), and on each refill group.
  row_id_B: the rollouts these rows are (default 0..B-1). prompt_only: caches of the prompt's
  slots only (a refill group, which `put_rows` copies into the prompt slots of its rows)."""
  student, teacher = nnx.merge(s_graph, s_params), nnx.merge(t_graph, t_params)
  b, p = prompt_BxP.shape
  t = cfg.buffer_len
  s_cache = student.init_cache(b, p if prompt_only else p + t, start_B)
  t_cache = teacher.init_cache(b, p if prompt_only else p + t, start_B)
  s_next, s_cache = _last_logits(student, prompt_BxP, s_cache, cfg.vocab_size)
  t_next, t_cache = _last_logits(teacher, prompt_BxP, t_cache, cfg.vocab_size)
  f32 = lambda: jnp.zeros((b, t), jnp.float32)  # noqa: E731
  n_windows = t // cfg.window
  return RolloutState(
      tokens_BxT=jnp.full((b, t), cfg.pad_id, jnp.int32),
      logp_student_BxT=f32(), logp_teacher_BxT=f32(), logp_behavior_BxT=f32(), kl_BxT=f32(),
      overlap_BxT=f32(),
      window_mean_BxN=jnp.zeros((b, n_windows), jnp.float32),
      window_complete_BxN=jnp.zeros((b, n_windows), jnp.bool_),
      s_cache=s_cache, t_cache=t_cache, s_next_BxV=s_next, t_next_BxV=t_next,
      length_B=jnp.zeros((b,), jnp.int32), eos_B=jnp.zeros((b,), jnp.bool_),
      done_B=jnp.zeros((b,), jnp.bool_), kat=kat_lib.init_state(b), probe_B=probe_B,
      row_id_B=(jnp.arange(b, dtype=jnp.int32) if row_id_B is None
                else jnp.asarray(row_id_B, jnp.int32)),
      step_B=jnp.zeros((b,), jnp.int32), clock=jnp.zeros((), jnp.int32), key=key,
      tau=jnp.asarray(tau, jnp.float32), spike_tau=jnp.asarray(spike_tau, jnp.float32))


def row_keys(key, t_B, row_id_B):
  """Each row's sampling key for its token t: a function of (key, t, rollout id) only."""
  return jax.vmap(lambda t, r: jax.random.fold_in(jax.random.fold_in(key, t), r))(t_B, row_id_B)


def sample_step(student: Transformer, state: RolloutState, carry, i, cfg: RolloutConfig,
                filled: int | None = None):
  """Token `state.step_B + i` of every row: sample from the carried logits, one student decode
  step attending over prompt + `filled` slots (None: all). carry = (s_next_BxV, s_cache,
  length_B, eos_B, done_B)."""
  s_next_BxV, cache, length_B, eos_B, done_B = carry
  t_B = state.step_B + i
  eos_ids = jnp.asarray(cfg.eos_ids, jnp.int32)
  tok_B, logp_b_B = sample(s_next_BxV, row_keys(state.key, t_B, state.row_id_B), cfg.sampling)
  tok_B = jnp.where(done_B, cfg.pad_id, tok_B)
  logits_Bx1xV, cache = student.decode(tok_B[:, None], cache, attend=_attend(cache, cfg, filled))
  hit_eos = ~done_B & jnp.any(tok_B[:, None] == eos_ids[None, :], axis=-1)
  length_B = length_B + (~done_B).astype(jnp.int32)
  done_B = done_B | hit_eos | (t_B + 1 >= cfg.max_new_tokens)
  kept = None if cfg.rescore_student else s_next_BxV
  return (logits_Bx1xV[:, 0, :cfg.vocab_size], cache, length_B, eos_B | hit_eos, done_B), (
      tok_B, logp_b_B, kept)


def _attend(cache: KVCache, cfg: RolloutConfig, filled: int | None):
  # Cache slots = prompt + buffer: attend over the prompt and the first `filled` new tokens.
  return None if filled is None else cache.size - cfg.buffer_len + filled


def window_step(student: Transformer, teacher: Transformer, state: RolloutState,
                cfg: RolloutConfig, filled: int | None = None) -> RolloutState:
  """One loop iteration: W student samples, one teacher chunk, per-token signals, KAT.

  filled: static; attention reads prompt + `filled` slots (None: the whole cache). The caller
  guarantees step_B + W <= filled for every live row. Rows done when the window starts stay
  where they are: their clocks and cache ends do not move and their buffers are not written.
  """
  w, v = cfg.window, cfg.vocab_size
  start_B = state.step_B
  active_B = ~state.done_B
  carry = (state.s_next_BxV, state.s_cache, state.length_B, state.eos_B, state.done_B)
  (s_next, s_cache, length_B, eos_B, done_B), (tok_WxB, logp_b_WxB, s_dist_WxBxV) = jax.lax.scan(
      lambda c, i: sample_step(student, state, c, i, cfg, filled), carry,
      jnp.arange(w, dtype=jnp.int32))
  tokens_BxW = tok_WxB.T

  # Teacher: one chunk forward over the window. Its predictions for tokens 2..W come from this
  # chunk; the one for token 1 was carried from the previous window (or the prefill).
  t_logits_BxWxV, t_cache = teacher.decode(tokens_BxW, state.t_cache,
                                           attend=_attend(state.t_cache, cfg, filled))
  t_logits_BxWxV = t_logits_BxWxV[..., :v]
  t_dist_BxWxV = jnp.concatenate([state.t_next_BxV[:, None], t_logits_BxWxV[:, :-1]], axis=1)
  if cfg.rescore_student:
    # Rewrites the same K/V slots with the same values; only the logits are wanted.
    s_logits_BxWxV, s_cache = student.decode(tokens_BxW, s_cache.replace(end_B=s_cache.end_B - w),
                                             attend=_attend(s_cache, cfg, filled))
    s_dist_BxWxV = jnp.concatenate([state.s_next_BxV[:, None], s_logits_BxWxV[:, :-1, :v]], 1)
  else:
    s_dist_BxWxV = s_dist_WxBxV.transpose(1, 0, 2)

  s_logp = jax.nn.log_softmax(s_dist_BxWxV.astype(jnp.float32), axis=-1)
  t_logp = jax.nn.log_softmax(t_dist_BxWxV.astype(jnp.float32), axis=-1)
  valid_BxW = (start_B[:, None] + jnp.arange(w)[None, :]) < length_B[:, None]
  pick = lambda lp: jnp.take_along_axis(lp, tokens_BxW[..., None], axis=-1)[..., 0]  # noqa: E731
  zero = lambda x: jnp.where(valid_BxW, x, 0.0)  # noqa: E731
  lp_s, lp_t = zero(pick(s_logp)), zero(pick(t_logp))
  kl_BxW = zero(jnp.sum(jnp.exp(s_logp) * (s_logp - t_logp), axis=-1))
  signal_BxW = kl_BxW if cfg.kat.signal == "kl" else lp_s - lp_t
  overlap_BxW = None
  if cfg.kat.mode == "topk":
    overlap_BxW = zero(kat_lib.topk_overlap(s_dist_BxWxV, t_dist_BxWxV, cfg.kat.topk_k))
    signal_BxW = overlap_BxW

  kat_state, fire_B = kat_lib.window_update(state.kat, signal_BxW, length_B, eos_B, start_B,
                                            state.tau, state.spike_tau, cfg.kat)
  # Inactive rows write nowhere: their columns point past the buffer and the scatter drops them
  # (a row stopped at the buffer's end would otherwise clamp onto its own last window).
  rows_Bx1 = jnp.arange(start_B.shape[0])[:, None]

  def write(buf, x, col_B=start_B):
    x = x.reshape(x.shape[0], -1)
    col_B = jnp.where(active_B, col_B, buf.shape[1])
    cols_BxN = col_B[:, None] + jnp.arange(x.shape[1])[None, :]
    return buf.at[rows_Bx1, cols_BxN].set(x.astype(buf.dtype), mode="drop")

  win_B = start_B // w
  advance_B = w * active_B.astype(jnp.int32)
  return state.replace(
      tokens_BxT=write(state.tokens_BxT, tokens_BxW),
      logp_student_BxT=write(state.logp_student_BxT, lp_s),
      logp_teacher_BxT=write(state.logp_teacher_BxT, lp_t),
      logp_behavior_BxT=write(state.logp_behavior_BxT, zero(logp_b_WxB.T)),
      kl_BxT=write(state.kl_BxT, kl_BxW),
      overlap_BxT=(state.overlap_BxT if overlap_BxW is None
                   else write(state.overlap_BxT, overlap_BxW)),
      window_mean_BxN=write(state.window_mean_BxN, jnp.sum(signal_BxW, -1) / w, win_B),
      window_complete_BxN=write(state.window_complete_BxN,
                                kat_lib.window_complete(length_B, eos_B, start_B + w), win_B),
      s_cache=s_cache.replace(end_B=state.s_cache.end_B + advance_B),
      t_cache=t_cache.replace(end_B=state.t_cache.end_B + advance_B),
      s_next_BxV=s_next, t_next_BxV=t_logits_BxWxV[:, -1],
      length_B=length_B, eos_B=eos_B, done_B=done_B | (fire_B & ~state.probe_B), kat=kat_state,
      step_B=start_B + advance_B, clock=state.clock + 1)


@functools.partial(jax.jit, static_argnames=("s_graph", "t_graph", "cfg", "filled"),
                   donate_argnames=("state",))
def decode_loop(s_graph, s_params, t_graph, t_params, state: RolloutState, min_live,
                refill_at=None, *, cfg: RolloutConfig, filled: int | None = None
                ) -> RolloutState:
  """Runs windows until every row is done, or until at most `min_live` rows are live, or until
  `refill_at` rows are done (None: never), or until the oldest live row's next window would
  reach past `filled` new tokens (static; None: the buffer)."""
  student, teacher = nnx.merge(s_graph, s_params), nnx.merge(t_graph, t_params)
  limit = cfg.buffer_len if filled is None else filled
  refill_at = jnp.int32(state.done_B.shape[0] + 1) if refill_at is None else refill_at

  def cond(state):
    live = jnp.sum(~state.done_B)
    oldest = jnp.max(jnp.where(state.done_B, 0, state.step_B))
    return ((oldest + cfg.window <= limit) & (live > 0) & (live > min_live)
            & (state.done_B.shape[0] - live < refill_at))

  return jax.lax.while_loop(cond, lambda s: window_step(student, teacher, s, cfg, filled), state)


ROW_FIELDS = ("tokens_BxT", "logp_student_BxT", "logp_teacher_BxT", "logp_behavior_BxT",
              "kl_BxT", "overlap_BxT", "window_mean_BxN", "window_complete_BxN", "length_B", "eos_B")
_SHARED = ("clock", "key", "tau", "spike_tau")  # the state's scalars: not per row


def _rows_op(fn, state: RolloutState, *others: RolloutState) -> RolloutState:
  """`fn(x, *xs)` on every per-row array of the state (caches included), paired with the same
  array of `others`; the state's scalars are kept."""
  drop = lambda s: s.replace(s_cache=None, t_cache=None, **{f: None for f in _SHARED})  # noqa: E731
  rows = jax.tree.map(fn, drop(state), *map(drop, others))

  def cache(c: KVCache, *cs: KVCache):
    return c.replace(k=tuple(map(fn, c.k, *(o.k for o in cs))),
                     v=tuple(map(fn, c.v, *(o.v for o in cs))),
                     start_B=fn(c.start_B, *(o.start_B for o in cs)),
                     end_B=fn(c.end_B, *(o.end_B for o in cs)))
  return rows.replace(s_cache=cache(state.s_cache, *(o.s_cache for o in others)),
                      t_cache=cache(state.t_cache, *(o.t_cache for o in others)),
                      **{f: getattr(state, f) for f in _SHARED})


@jax.jit
def take_rows(state: RolloutState, idx_N) -> RolloutState:
  """The rows `idx_N` of every per-row array in the state (caches included)."""
  return _rows_op(lambda x: jnp.take(x, idx_N, axis=0), state)


@functools.partial(jax.jit, donate_argnames=("state",))
def put_rows(state: RolloutState, new: RolloutState, idx_N) -> RolloutState:
  """The state with rows `idx_N` replaced by the rows of `new` (a refill group's prefill). A
  shorter cache in `new` (prefill(prompt_only=True)) fills the first slots of each row: the
  previous row's keys beyond them stay but are never read (a slot is written before any query
  reaches it), and copying whole rows cost ~30 ms per refill of the bench pair."""
  def put(x, y):
    if x.ndim == 4 and y.shape[2] < x.shape[2]:  # [B, K, S, D] cache: the prompt's slots
      return x.at[idx_N, :, :y.shape[2]].set(y.astype(x.dtype))
    return x.at[idx_N].set(y.astype(x.dtype))
  return _rows_op(put, state, new)


@functools.partial(jax.jit, donate_argnames=("parked",))
def _park_rows(parked: dict, state: RolloutState) -> dict:
  """Writes the state's rows into the full-batch result buffers at their rollout ids."""
  out = {f: parked[f].at[state.row_id_B].set(getattr(state, f)) for f in ROW_FIELDS}
  out["kat"] = jax.tree.map(lambda p, x: p.at[state.row_id_B].set(x), parked["kat"], state.kat)
  return out


def refill_group(slots: int, compact_multiple: int, batch_multiple: int = 1) -> int:
  """Rows per compaction step and per refill: `compact_multiple` (0 or -1: slots / 8), at least
  1, rounded up to a multiple of the batch shards."""
  multiple = max(compact_multiple if compact_multiple > 0 else slots // 8, 1)
  return -(-multiple // batch_multiple) * batch_multiple


def compaction_sizes(batch: int, compact_multiple: int, batch_multiple: int = 1) -> list[int]:
  """The batch sizes the decode loop runs at, largest first: multiples of `compact_multiple`
  rows (0: batch / 8; -1: no compaction), rounded up to multiples of the batch shards."""
  if compact_multiple < 0:
    return [batch]
  multiple = refill_group(batch, compact_multiple, batch_multiple)
  return sorted({batch} | set(range(multiple, batch, multiple)), reverse=True)


def resolve_slots(slots: int, batch: int, batch_multiple: int = 1) -> int:
  """The decode slots of a `batch`-rollout step: rollout.slots (0: one per rollout)."""
  requested, slots = slots, slots or batch
  if slots > batch or slots % batch_multiple:
    raise ConfigError(f"rollout.slots={requested}: must be <= the {batch} rollouts of a step and "
                      f"a multiple of the {batch_multiple} batch shards; use 0 (one slot per "
                      f"rollout) or e.g. {max(batch // 4 // batch_multiple, 1) * batch_multiple}.")
  return slots


@dataclasses.dataclass
class Schedule:
  """Where each rollout ran: slot, first and last window on the rollout's clock (host ints)."""
  slot: list = dataclasses.field(default_factory=list)
  row: list = dataclasses.field(default_factory=list)
  begin: list = dataclasses.field(default_factory=list)
  end: list = dataclasses.field(default_factory=list)
  exits: int = 0  # decode loop calls (host round trips)


@jax.jit
def _take(x_BxN, idx_N):
  return jnp.take(x_BxN, idx_N, axis=0)


def rollout(student: Transformer, teacher: Transformer, prompt_BxP, start_B, key,
            cfg: RolloutConfig, *, tau=0.0, spike_tau=float("inf"), probe_B=None,
            batch_multiple: int = 1, schedule: Schedule | None = None) -> RolloutResult:
  """Samples from `student`, scores with `teacher`, applies KAT; see the module docstring.

  prompt_BxP: left-padded int32 prompts (see `pad_prompts`); start_B: left-pad count per row.
  tau, spike_tau: KAT thresholds (traced: new values never recompile).
  probe_B: bool [B], rows KAT never stops (their cut still applies to the loss); None = none.
  batch_multiple: slot counts and compacted batch sizes stay multiples of this (batch shards).
  schedule: filled with where and when each rollout ran (for docs and benchmarks).
  """
  for who, model in (("student", student), ("teacher", teacher)):
    if model.cfg.vocab_size < cfg.vocab_size:
      raise ValueError(f"rollout vocab_size={cfg.vocab_size} exceeds the {who}'s embedding "
                       f"({model.cfg.vocab_size} rows); use hf.check_compatible(...).vocab_size.")
  if np.ndim(prompt_BxP) != 2 or np.shape(start_B) != np.shape(prompt_BxP)[:1]:
    raise ValueError(f"prompt_BxP must be [B, P] and start_B [B]; got {np.shape(prompt_BxP)} "
                     f"and {np.shape(start_B)} (see rollout.pad_prompts).")
  s_graph, s_params = nnx.split(student)
  t_graph, t_params = nnx.split(teacher)
  prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
  start_B = jnp.asarray(start_B, jnp.int32)
  b = prompt_BxP.shape[0]
  if b % batch_multiple:
    raise ValueError(f"batch size {b} is not a multiple of batch_multiple={batch_multiple}.")
  slots = resolve_slots(cfg.slots, b, batch_multiple)
  # Scalars (key, thresholds) go where the params are: replicated over their mesh, if any.
  where = getattr(student.embed[...], "sharding", None)
  if probe_B is None:
    probe_B = np.zeros((b,), bool)
  if np.shape(probe_B) != (b,):
    raise ValueError(f"probe_B must be [B] = [{b}]; got {np.shape(probe_B)}.")
  if isinstance(where, jax.sharding.NamedSharding):
    key, tau, spike_tau = (replicate(x, where.mesh) for x in (
        key, np.float32(to_host(tau)), np.float32(to_host(spike_tau))))
    if not isinstance(probe_B, jax.Array):  # a host mask: each process places its own rows
      probe_B = put_batch(np.asarray(probe_B, bool), where.mesh)
  probe_B = jnp.asarray(probe_B, jnp.bool_)

  def start_rows(first: int, n: int) -> RolloutState:
    """Prefilled loop state of rollouts [first, first + n)."""
    if n == b:
      args = (prompt_BxP, start_B, probe_B)
    else:
      idx = jnp.arange(first, first + n, dtype=jnp.int32)
      args = tuple(_take(x, idx) for x in (prompt_BxP, start_B, probe_B))
      if isinstance(where, jax.sharding.NamedSharding):
        idx = put_batch(np.arange(first, first + n, dtype=np.int32), where.mesh)
    return prefill(s_graph, s_params, t_graph, t_params, *args, key, tau, spike_tau,
                   None if n == b else idx, cfg=cfg, prompt_only=first > 0)

  state = start_rows(0, slots)
  started = slots  # rollouts prefilled so far (in id order)
  group = refill_group(slots, cfg.compact_multiple, batch_multiple)
  sizes = compaction_sizes(slots, cfg.compact_multiple, batch_multiple)
  slot_of = np.arange(slots)  # host mirror: the slot each state row is (for the schedule)
  began = dict.fromkeys(range(slots), 0)  # rollout id -> clock when it started (running ones)
  parked, oldest = None, 0
  while True:
    size = state.done_B.shape[0]
    filled = min(n for n in cfg.fill_buckets if n >= oldest + cfg.window)
    refill_at, min_live = None, 0
    if started < b:  # prompts wait: stop when a refill group's slots are free
      refill_at = min(group, b - started)
    else:
      min_live = max([s for s in sizes if s < size], default=0)
    state = decode_loop(s_graph, s_params, t_graph, t_params, state, jnp.int32(min_live),
                        None if refill_at is None else jnp.int32(refill_at), cfg=cfg,
                        filled=None if filled == cfg.buffer_len else filled)
    # One host read per loop exit; every process takes the same decisions.
    done, step, row_id, clock = map(np.asarray, to_host(
        (state.done_B, state.step_B, state.row_id_B, state.clock)))
    if schedule is not None:
      schedule.exits += 1
    live = int((~done).sum())
    oldest = int(step[~done].max()) if live else 0
    if live == 0 and started == b:
      break
    if (live > min_live) if refill_at is None else (size - live < refill_at):
      continue  # a bucket exit: the next call attends over more slots
    # Park everything (finished rows are final; live rows get overwritten later).
    if parked is None:
      full = lambda x: jnp.zeros((b,) + x.shape[1:], x.dtype)  # noqa: E731
      parked = {f: full(getattr(state, f)) for f in ROW_FIELDS}
      parked["kat"] = jax.tree.map(full, state.kat)
    parked = _park_rows(parked, state)
    for i in np.flatnonzero(done):
      if row_id[i] in began and schedule is not None:
        _record(schedule, slot_of[i], row_id[i], began.pop(row_id[i]), step[i] // cfg.window)
    if refill_at is not None:
      # The next prompts go into the first free slots, whole refill groups at a time (a last,
      # smaller group waits for the next exit, where refill_at = the prompts left).
      free = np.flatnonzero(done)
      n_new = min(len(free), b - started) // refill_at * refill_at
      for first in range(0, n_new, refill_at):
        new = start_rows(started, refill_at)
        state = put_rows(state, new, jnp.asarray(free[first:first + refill_at], jnp.int32))
        began.update(dict.fromkeys(range(started, started + refill_at), int(clock)))
        started += refill_at
      continue
    # Compaction: the live rows in the smallest bucket that holds them, padded with done rows.
    new_size = min(s for s in sizes if s >= live)
    order = np.concatenate([np.flatnonzero(~done), np.flatnonzero(done)])[:new_size]
    state = take_rows(state, jnp.asarray(order, jnp.int32))
    slot_of = slot_of[order]
  if schedule is not None:
    step = np.asarray(to_host(state.step_B))
    for i, r in enumerate(row_id):
      if r in began:
        _record(schedule, slot_of[i], r, began.pop(r), step[i] // cfg.window)
  if parked is not None:
    parked = _park_rows(parked, state)
    rows = {f: parked[f] for f in ROW_FIELDS}
    kat_state = parked["kat"]
  else:
    rows = {f: getattr(state, f) for f in ROW_FIELDS}
    kat_state = state.kat
  return finalize(rows, kat_state, probe_B, cfg=cfg)


def _record(schedule: Schedule, slot, row, begin, windows):
  schedule.slot.append(int(slot))
  schedule.row.append(int(row))
  schedule.begin.append(int(begin))
  schedule.end.append(int(begin) + int(windows))


@functools.partial(jax.jit, static_argnames=("cfg",))
def finalize(rows: dict, kat_state: kat_lib.KATState, probe_B, *, cfg: RolloutConfig
             ) -> RolloutResult:
  """The per-row buffers and KAT state as the RolloutResult the update trains on."""
  trained = kat_lib.trained_length(kat_state, rows["length_B"], cfg.kat)
  t = rows["tokens_BxT"].shape[1]
  mask_BxT = jnp.arange(t)[None, :] < trained[:, None]
  return RolloutResult(
      tokens_BxT=rows["tokens_BxT"], length_B=rows["length_B"], eos_B=rows["eos_B"],
      logp_student_BxT=rows["logp_student_BxT"], logp_teacher_BxT=rows["logp_teacher_BxT"],
      logp_behavior_BxT=rows["logp_behavior_BxT"], kl_BxT=rows["kl_BxT"],
      overlap_BxT=rows["overlap_BxT"],
      terminated_B=kat_state.terminated_B, detect_B=kat_state.detect_B,
      onset_B=kat_state.onset_B, trained_len_B=trained, loss_mask_BxT=mask_BxT,
      loss_weight_BxT=kat_lib.loss_weights(
          mask_BxT, rows["logp_student_BxT"] - rows["logp_teacher_BxT"], rows["overlap_BxT"],
          cfg.kat),
      window_mean_BxN=rows["window_mean_BxN"], window_complete_BxN=rows["window_complete_BxN"],
      probe_B=probe_B)


@functools.partial(jax.jit, static_argnames=("graph", "max_new_tokens", "eos_ids", "pad_id",
                                             "vocab_size", "sampling", "length_bucket"))
def generate_jit(graph, params, prompt_BxP, start_B, key, *, max_new_tokens, eos_ids, pad_id,
                 vocab_size, sampling, length_bucket: int = 128):
  """`generate` on a split model: the compiled program evaluation runs. One while loop per
  filled-length bucket (`length_buckets`), one after the other in the same program: each step
  attends over the prompt and the bucket's new-token slots only."""
  model = nnx.merge(graph, params)
  b, p = prompt_BxP.shape
  cache = model.init_cache(b, p + max_new_tokens, start_B)
  logits_BxV, cache = _last_logits(model, prompt_BxP, cache, vocab_size)
  eos = jnp.asarray(eos_ids, jnp.int32)
  rows = jnp.arange(b, dtype=jnp.int32)

  def cond(c, limit):
    t, _, _, _, done, _ = c
    return (t < limit) & ~jnp.all(done)

  def body(c, attend):
    t, logits_BxV, cache, tokens, done, length = c
    tok_B, _ = sample(logits_BxV, row_keys(key, jnp.full((b,), t), rows), sampling)
    tok_B = jnp.where(done, pad_id, tok_B)
    logits, cache = model.decode(tok_B[:, None], cache, attend=attend)
    tokens = jax.lax.dynamic_update_slice(tokens, tok_B[:, None], (0, t))
    length = length + (~done).astype(jnp.int32)
    done = done | jnp.any(tok_B[:, None] == eos[None, :], axis=-1)
    return t + 1, logits[:, 0, :vocab_size], cache, tokens, done, length

  c = (jnp.int32(0), logits_BxV, cache, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
       jnp.zeros((b,), jnp.bool_), jnp.zeros((b,), jnp.int32))
  for n in length_buckets(max_new_tokens, length_bucket):
    c = jax.lax.while_loop(functools.partial(cond, limit=n),
                           functools.partial(body, attend=p + n), c)
  _, _, _, tokens, _, length = c
  return tokens, length


def generate(model: Transformer, prompt_BxP, start_B, key, *, max_new_tokens: int,
             eos_ids: tuple[int, ...], pad_id: int, vocab_size: int | None = None,
             sampling: SamplingConfig = SamplingConfig(), length_bucket: int = 128):
  """Student-only sampling (evaluation): (tokens [B, max_new_tokens], length [B]).

  Same per-row keys as `rollout`, so with the same key it draws the same tokens as the student
  does inside the fused rollout. length_bucket: as RolloutConfig.length_bucket.
  """
  vocab_size = vocab_size or model.cfg.vocab_size
  check_top_k(sampling, vocab_size, "eval")
  graph, params = nnx.split(model)
  return generate_jit(graph, params, jnp.asarray(prompt_BxP, jnp.int32),
                      jnp.asarray(start_B, jnp.int32), key, max_new_tokens=max_new_tokens,
                      eos_ids=tuple(eos_ids), pad_id=pad_id,
                      vocab_size=vocab_size, sampling=sampling, length_bucket=length_bucket)


def apply_random_truncation(result: RolloutResult, key, target_lengths_N) -> RolloutResult:
  """The random-truncation ablation: cut the loss of uncut rollouts at matched random lengths."""
  trained, cut = kat_lib.random_truncation(key, result.length_B, jnp.asarray(target_lengths_N))
  t = result.tokens_BxT.shape[1]
  mask_BxT = jnp.arange(t)[None, :] < trained[:, None]
  return result.replace(trained_len_B=trained, terminated_B=cut, loss_mask_BxT=mask_BxT,
                        loss_weight_BxT=mask_BxT.astype(jnp.float32))
