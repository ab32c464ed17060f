"""Flax NNX decoder-only transformer for the Llama / Qwen2 / Qwen3 families.

Two paths over the same weights:
  * `model(input_ids_BxT, attention_mask_BxT=None)` -> float32 logits [B, T, V]: full-sequence
    forward for training and scoring (left or right padding via the mask);
  * `model.decode(tokens_BxT, cache)` -> (logits, cache): a cached forward over T new tokens per
    row, written at each row's next free slots (`cache.end_B`). T = prompt length is the prefill,
    T = 1 a decode step, T = W a KAT window scored by the teacher in one chunk.

Left padding is handled by the cache, not by the caller: `cache.start_B` is the first real slot of
each row, so a token at slot s has position s - start_B[b] and attends to slots [start_B[b], s].
Rows keep their own `end_B` so that a finished row's slot can take a new prompt while the others
go on (the rollout's slot refill), and `decode(..., attend=L)` reads only the first L slots: the
cost of a step follows the filled length, not the cache size (the rollout's length buckets).

Param layout: kernels are stored as (in, ..., out) with one logical axis name per dimension
(`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`) in the `out_sharding` metadata, so
`kat_jax.sharding` can place them on a mesh without touching this file.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kat_jax.models.config import ModelConfig, rope_inv_freq

# Masked attention scores get this instead of -inf: a query with no visible key (a left-pad
# position) then softmaxes to a harmless uniform row rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _named(value, names):
  # Logical axis names only: placement on a mesh is kat_jax.sharding's job (explicit rules at load
  # or init time), so flax's eager sharding at construction is turned off.
  assert value.ndim == len(names), (value.shape, names)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class LoRAParam(nnx.Param):
  """A low-rank adapter's A or B (kat_jax/lora.py). A subclass of Param, so code that takes a
  model's params takes these too; a LoRA student trains exactly the `LoRAParam`s."""


def _adapter(module, name: str, cfg: ModelConfig, rngs: nnx.Rngs, in_shape, in_names,
             out_shape, out_names):
  """Adds `{name}_lora_a` [*in, r] and `{name}_lora_b` [r, *out] to `module` if cfg.lora adapts
  `name`. Float32 always; B = 0, so the adapted model starts as the base."""
  lora = cfg.lora
  if not lora.on(name):
    return
  r, fan_in = lora.rank, int(np.prod(in_shape))
  key = rngs.params()
  if lora.init == "kaiming":  # torch's kaiming_uniform_(a=sqrt(5)) on a [r, in] weight: PEFT's
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(key, (fan_in, r), jnp.float32, -bound, bound)
  else:  # PEFT's init_lora_weights='gaussian'
    a = jax.random.normal(key, (fan_in, r), jnp.float32) / r
  # The rank axis has no logical name: replicated (it is tiny); the others follow the base.
  setattr(module, f"{name}_lora_a", LoRAParam(a.reshape(*in_shape, r),
                                              out_sharding=(*in_names, None),
                                              eager_sharding=False))
  setattr(module, f"{name}_lora_b", LoRAParam(jnp.zeros((r, *out_shape), jnp.float32),
                                              out_sharding=(None, *out_names),
                                              eager_sharding=False))


def _project(module, name: str, x, n_in: int = 1):
  """x through projection `name` of `module`: the frozen base plus, if present, its adapter
  (alpha / r) (x A) B, both in the module's compute dtype."""
  dt = module.dtype
  y = _dense(x, getattr(module, name)[...].astype(dt), n_in)
  a = getattr(module, f"{name}_lora_a", None)
  if a is None:
    return y
  b = getattr(module, f"{name}_lora_b")
  delta = _dense(_dense(x, a[...].astype(dt), n_in), b[...].astype(dt))
  return y + (module.cfg.lora.scale * delta).astype(dt)


def _param(rngs: nnx.Rngs, shape, names, dtype, std=0.02):
  return _named(std * jax.random.normal(rngs.params(), shape, dtype), names)


def _zeros(shape, names, dtype):
  return _named(jnp.zeros(shape, dtype), names)


def _dense(x, w, n_in: int = 1, out_dtype=None):
  """Contracts the last `n_in` dims of x with the first `n_in` dims of w, as ONE 2-D matmul.

  Same math as an einsum like 'bte,ehd->bthd', but XLA CPU runs the backward of such batched
  einsums (a weight gradient contracting over both batch and time) ~3x slower than a plain
  [N, in] @ [in, out] matmul; on GPU / TPU the two compile to the same thing.
  """
  lead, k = x.shape[:x.ndim - n_in], int(np.prod(w.shape[:n_in]))
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *w.shape[n_in:])


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, axis_name: str | None, param_dtype, dtype):
    self.scale = _named(jnp.ones((dim,), param_dtype), (axis_name,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    # Normalise in fp32 whatever the compute dtype (as transformers does), then scale.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    return scale * x32.astype(self.dtype)


@flax.struct.dataclass
class KVCache:
  """Per-layer K and V, each [B, kv_heads, S, head_dim], plus the slot bookkeeping.

  One array per layer (not a stacked [L, ...] array): updating a stacked cache in place measured 3x
  slower on XLA CPU. Each row writes at its own `end_B` (a per-row update: measured 15 vs 10 us per
  step for 4 layers at B=32, S=1056 against one shared slot -- noise next to the step).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  start_B: jax.Array  # int32 [B]: first real slot of each row (= its number of left pads)
  end_B: jax.Array  # int32 [B]: slots [0, end_B) of each row are written

  @property
  def size(self) -> int:
    return self.k[0].shape[2]


def _rope(x_BxTxHxD, positions_BxT, inv_freq, scale: float = 1.0):
  # Half-split rotation (rotate_half), the convention of HF Llama/Qwen checkpoints. `scale`
  # multiplies the result in fp32 (the queries' 1/sqrt(head_dim): no extra bf16 rounding).
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  cos = scale * jnp.cos(angles_BxTxF)[:, :, None, :]
  sin = scale * jnp.sin(angles_BxTxF)[:, :, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def _attention(q_BxTxHxD, keys_BxKxSxD, values_BxKxSxD, mask_BxTxS, cfg: ModelConfig, dt):
  """Masked softmax attention with grouped KV heads; [B, T, H, D] out."""
  b, t = q_BxTxHxD.shape[:2]
  k, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
  # Queries as [B, K, G*T, D]: batch dims leading and contracting dims last, the layout XLA's
  # dot emitter wants; the 5-D 'btkgd,bksd->bkgts' einsum made XLA CPU transpose the [.., T, S]
  # scores around the softmax (measured: attention fwd 7.4 -> 4.4 ms, fwd+bwd 31 -> 26 ms).
  # q arrives scaled by 1/sqrt(d) (in its rotary embedding): T x D numbers, not T x S scores.
  q_BxKxQxD = q_BxTxHxD.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, d)
  # Scores and softmax in fp32 even when computing in bf16.
  scores_BxKxQxS = jnp.einsum("bkqd,bksd->bkqs", q_BxKxQxD, keys_BxKxSxD,
                              preferred_element_type=jnp.float32)
  s = scores_BxKxQxS.shape[-1]
  scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None],
                               scores_BxKxQxS.reshape(b, k, g, t, s), _MASK_VALUE)
  # Softmax normalised *after* the value matmul (divide the [.., D] output, not the [.., S]
  # probabilities): one pass less over the scores; measured 25% off the teacher's window
  # attention on CPU. The output does not depend on the subtracted max (it cancels), so its
  # gradient is exactly zero and stop_gradient only saves work.
  max_BxKxGxTx1 = jax.lax.stop_gradient(jnp.max(scores_BxKxGxTxS, axis=-1, keepdims=True))
  exp_BxKxGxTxS = jnp.exp(scores_BxKxGxTxS - max_BxKxGxTx1)
  out_BxKxQxD = jnp.einsum("bkqs,bksd->bkqd", exp_BxKxGxTxS.astype(dt).reshape(b, k, g * t, s),
                           values_BxKxSxD, preferred_element_type=jnp.float32)
  denom_BxKxQx1 = jnp.sum(exp_BxKxGxTxS, axis=-1, keepdims=True).reshape(b, k, g * t, 1)
  out_BxKxQxD = (out_BxKxQxD / denom_BxKxQx1).astype(dt)
  return out_BxKxQxD.reshape(b, k, g, t, d).transpose(0, 3, 1, 2, 4).reshape(
      b, t, cfg.num_heads, d)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pdt)
    self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
    self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pdt)
    self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pdt)
    if cfg.qkv_bias:
      self.q_bias = _zeros((h, d), ("heads", "head_dim"), pdt)
      self.k_bias = _zeros((k, d), ("kv_heads", "head_dim"), pdt)
      self.v_bias = _zeros((k, d), ("kv_heads", "head_dim"), pdt)
    if cfg.o_bias:
      self.o_bias = _zeros((e,), ("embed",), pdt)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, "head_dim", pdt, self.dtype)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, "head_dim", pdt, self.dtype)
    for name, n in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
      _adapter(self, name, cfg, rngs, (e,), ("embed",), (n, d),
               ("heads" if name == "q_proj" else "kv_heads", "head_dim"))
    _adapter(self, "o_proj", cfg, rngs, (h, d), ("heads", "head_dim"), (e,), ("embed",))
    self.cfg = cfg

  def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, inv_freq, kv=None, end_B=None,
               q_chunk: int = 0, fresh: bool = False):
    """Returns (out_BxTxE, (k, v)): the updated cache (or the new keys / values without one).

    end_B: each row's first slot to write. The keys attended are the first S slots of the cache,
    S = mask_BxTxS.shape[-1] (<= the cache size: the caller's filled-length bucket).
    fresh: the cache is empty and `end_B` is 0 (a prefill): the T new tokens attend to each other
    only, [.., T, T] scores instead of [.., T, cache size].
    """
    cfg, dt = self.cfg, self.dtype
    x = x_BxTxE.astype(dt)
    q_BxTxHxD = _project(self, "q_proj", x)
    k_BxTxKxD = _project(self, "k_proj", x)
    v_BxTxKxD = _project(self, "v_proj", x)
    if cfg.qkv_bias:
      q_BxTxHxD = q_BxTxHxD + self.q_bias[...].astype(dt)[None, None]
      k_BxTxKxD = k_BxTxKxD + self.k_bias[...].astype(dt)[None, None]
      v_BxTxKxD = v_BxTxKxD + self.v_bias[...].astype(dt)[None, None]
    if cfg.qk_norm:
      q_BxTxHxD = self.q_norm(q_BxTxHxD)
      k_BxTxKxD = self.k_norm(k_BxTxKxD)
    q_BxTxHxD = _rope(q_BxTxHxD, positions_BxT, inv_freq, scale=cfg.head_dim ** -0.5)
    k_BxTxKxD = _rope(k_BxTxKxD, positions_BxT, inv_freq)
    k_BxKxTxD = k_BxTxKxD.transpose(0, 2, 1, 3)
    v_BxKxTxD = v_BxTxKxD.transpose(0, 2, 1, 3)
    if kv is None:
      keys_BxKxSxD, values_BxKxSxD = k_BxKxTxD, v_BxKxTxD
    else:
      # In-place update of this layer's cache (the caller donates the buffers), each row at its
      # own slot (the vmapped update lowers to one scatter).
      cache_k, cache_v = kv
      put = jax.vmap(lambda c, x, e: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, e, 0)))
      keys_BxKxSxD = put(cache_k, k_BxKxTxD, end_B)
      values_BxKxSxD = put(cache_v, v_BxKxTxD, end_B)

    if fresh:
      keys, values = k_BxKxTxD, v_BxKxTxD
    else:
      # Only the first S slots: a static slice, so a decode step reads the filled part of the
      # cache (rounded up to the caller's bucket), not all of it. XLA:TPU reads the slice in
      # place (Qwen3-1.7B decode step, 128 rows, v5e:4x4: 2.89 GiB per device attending over
      # 1024 of 4608 slots, 6.11 over all, 6.97 over a cache resized to 1024 slots: it copies
      # small caches through async slices). XLA CPU copies a sliced operand before its dot,
      # but a rollout with caches resized to each bucket ran no faster end to end here.
      s_len = mask_BxTxS.shape[-1]
      keys = keys_BxKxSxD[:, :, :s_len].astype(dt)
      values = values_BxKxSxD[:, :, :s_len].astype(dt)
    t = x.shape[1]
    if kv is None and q_chunk and t > q_chunk:
      # Query chunks, one after another, each against all keys (jax.checkpoint: the backward
      # recomputes a chunk's scores), so [B, H, chunk, S] scores exist instead of [B, H, S, S].
      n = -(-t // q_chunk)
      pad = n * q_chunk - t  # padded query rows see no key: a harmless uniform row, sliced off
      q = jnp.pad(q_BxTxHxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
      m = jnp.pad(mask_BxTxS, ((0, 0), (0, pad), (0, 0)))
      chunks = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, q_chunk, *a.shape[2:]), 1, 0)  # noqa: E731
      attend = jax.checkpoint(lambda qc, mc: _attention(qc, keys, values, mc, cfg, dt))
      out = jax.lax.map(lambda qm: attend(*qm), (chunks(q), chunks(m)))
      out_BxTxHxD = jnp.moveaxis(out, 0, 1).reshape(q.shape)[:, :t]
    else:
      out_BxTxHxD = _attention(q_BxTxHxD, keys, values, mask_BxTxS, cfg, dt)
    out_BxTxE = _project(self, "o_proj", out_BxTxHxD, n_in=2)
    if cfg.o_bias:
      out_BxTxE = out_BxTxE + self.o_bias[...].astype(dt)[None, None]
    return out_BxTxE, (keys_BxKxSxD, values_BxKxSxD)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    pdt, self.dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), pdt)
    self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), pdt)
    self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), pdt)
    _adapter(self, "gate_proj", cfg, rngs, (e,), ("embed",), (m,), ("mlp",))
    _adapter(self, "up_proj", cfg, rngs, (e,), ("embed",), (m,), ("mlp",))
    _adapter(self, "down_proj", cfg, rngs, (m,), ("mlp",), (e,), ("embed",))
    self.cfg = cfg

  def __call__(self, x_BxTxE):
    gate_BxTxM = _project(self, "gate_proj", x_BxTxE)
    up_BxTxM = _project(self, "up_proj", x_BxTxE)
    return _project(self, "down_proj", jax.nn.silu(gate_BxTxM) * up_BxTxM)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pdt, dt)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pdt, dt)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxE, positions_BxT, mask_BxTxS, inv_freq, kv=None, end_B=None,
               q_chunk: int = 0, fresh: bool = False):
    h, kv = self.attn(self.attn_norm(x_BxTxE), positions_BxT, mask_BxTxS, inv_freq, kv, end_B,
                      q_chunk, fresh)
    x_BxTxE = x_BxTxE + h
    return x_BxTxE + self.mlp(self.mlp_norm(x_BxTxE)), kv


class Transformer(nnx.Module):
  """Decoder-only LM. Build with `Transformer(cfg, rngs=nnx.Rngs(0))` or load with `kat_jax.hf`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", pdt, dt)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)
    # Rematerialise each block in the backward pass (jax.checkpoint): the update then keeps one
    # [B, S, E] input per layer instead of every layer's scores and MLP activations. Set by the
    # training config (`remat`); it changes memory and compute, never the numbers.
    self.remat = False
    # Shardings of [B, T, E] activations and [B, K, S, D] caches on a mesh (set by
    # kat_jax.sharding.pin_activations): without them, XLA's propagation may gather the batch
    # instead of the FSDP-sharded params.
    self.act_sharding = None
    self.cache_sharding = None
    # Full-sequence attention over query chunks of this size (0 = all at once): see Attention.
    self.attn_chunk = 0
    # Full-sequence forward as a scan over layers (see `_scan`): compile time and memory.
    self.scan_layers = False

  # ------------------------------------------------------------------------------- pieces

  def _inv_freq(self):
    # A numpy constant folded into the graph: [head_dim / 2] floats, tiny.
    return jnp.asarray(rope_inv_freq(self.cfg), jnp.float32)

  def embed_tokens(self, tokens_BxT):
    return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.dtype)

  def logits(self, x_BxTxE):
    """Final norm + LM head; float32 logits over the model's (possibly padded) vocabulary."""
    x = self.final_norm(x_BxTxE)
    dt = jnp.dtype(self.cfg.dtype)
    head_ExV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return _dense(x, head_ExV.astype(dt), out_dtype=jnp.float32)

  # ----------------------------------------------------------------------- full sequence

  def hidden(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None):
    """Last hidden states [B, T, E] (before the final norm) of a full-sequence forward."""
    b, t = input_ids_BxT.shape
    if attention_mask_BxT is None:
      attention_mask_BxT = jnp.ones((b, t), jnp.bool_)
    attention_mask_BxT = attention_mask_BxT.astype(jnp.bool_)
    if positions_BxT is None:
      # Real tokens are numbered 0, 1, ... whatever padding precedes them.
      positions_BxT = jnp.maximum(jnp.cumsum(attention_mask_BxT, axis=1) - 1, 0)
    causal_TxT = jnp.tril(jnp.ones((t, t), jnp.bool_))
    mask_BxTxT = causal_TxT[None] & attention_mask_BxT[:, None, :]
    inv_freq = self._inv_freq()
    x = self._constrain(self.embed_tokens(input_ids_BxT))
    call = lambda blk, h: blk(h, positions_BxT, mask_BxTxT, inv_freq,  # noqa: E731
                              q_chunk=self.attn_chunk)[0]
    if self.scan_layers:
      return self._scan(call, x)
    for layer in self.layers:
      x = nnx.remat(call)(layer, x) if self.remat else call(layer, x)
      x = self._constrain(x)
    return x

  def _scan(self, call, x_BxTxE):
    """`call(block, x)` through every block as one lax.scan over the blocks' params stacked on
    a new leading [L] axis: XLA compiles one block instead of num_layers (the update of
    Qwen3-1.7B + 8B compiled for v5e:4x4 in 225 s unrolled, 72 s scanned). The same ops, equal
    up to float rounding (XLA fuses a loop body differently: ~1e-6 in fp32, tested); the stack is
    one extra copy of the layer params, freed after the backward."""
    graph, _ = nnx.split(self.layers[0])
    params_L = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.split(b)[1] for b in self.layers))

    def body(h_BxTxE, params):
      return self._constrain(call(nnx.merge(graph, params), h_BxTxE)), None

    x_BxTxE, _ = jax.lax.scan(jax.checkpoint(body) if self.remat else body, x_BxTxE, params_L)
    return x_BxTxE

  def _constrain_cache(self, kv_BxKxSxD):
    if self.cache_sharding is None:
      return kv_BxKxSxD
    return jax.lax.with_sharding_constraint(kv_BxKxSxD, self.cache_sharding)

  def _constrain(self, x_BxTxE):
    if self.act_sharding is None:
      return x_BxTxE
    return jax.lax.with_sharding_constraint(x_BxTxE, self.act_sharding)

  def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None):
    return self.logits(self.hidden(input_ids_BxT, attention_mask_BxT, positions_BxT))

  # ------------------------------------------------------------------------------ cached

  def init_cache(self, batch_size: int, max_len: int, start_B=None, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots. `start_B`: left-pad count per row of the prompt."""
    cfg = self.cfg
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.dtype
    # Distinct buffers per layer and for k / v: donation needs them not to alias.
    k = tuple(self._constrain_cache(jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
    v = tuple(self._constrain_cache(jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))
    if start_B is None:
      start_B = jnp.zeros((batch_size,), jnp.int32)
    return KVCache(k=k, v=v, start_B=jnp.asarray(start_B, jnp.int32),
                   end_B=jnp.zeros((batch_size,), jnp.int32))

  def decode_hidden(self, tokens_BxT, cache: KVCache, fresh: bool = False,
                    attend: int | None = None):
    """Runs T new tokens per row at slots [end_B, end_B + T); returns (hidden [B, T, E], cache).

    The caller guarantees end_B + T <= cache.size (the slot update would clamp silently).
    fresh: the caller guarantees the cache is empty (end_B == 0), as in a prefill: attention then
    spans the T new slots, not the whole cache -- the prefill's scores and masks shrink by
    cache size / T (9x for 512-token prompts and 4096 new tokens).
    attend: static; attention reads slots [0, attend) only (default: the whole cache). The caller
    guarantees end_B + T <= attend for every row whose output it uses. Masked slots add exact
    zeros, but a shorter reduction may round differently: ~1e-7 in fp32 logits, which leaves the
    sampled tokens the same (tested).
    """
    b, t = tokens_BxT.shape
    slots_BxT = cache.end_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    positions_BxT = jnp.maximum(slots_BxT - cache.start_B[:, None], 0)
    if fresh:
      s_len = t
    else:
      s_len = cache.size if attend is None else min(int(attend), cache.size)
    keys_S = jnp.arange(s_len, dtype=jnp.int32)
    mask_BxTxS = ((keys_S[None, None, :] >= cache.start_B[:, None, None])
                  & (keys_S[None, None, :] <= slots_BxT[:, :, None]))
    inv_freq = self._inv_freq()
    # Activations pinned to the batch sharding at every layer: on the rollout's tensor-parallel
    # layout (kat_jax.sharding.ROLLOUT_RULES) XLA then keeps the weights in place and moves only
    # [B, T, E] per layer; left free, it may gather the whole batch's activations instead.
    x = self._constrain(self.embed_tokens(tokens_BxT))
    new_k, new_v = [], []
    for layer, k, v in zip(self.layers, cache.k, cache.v):
      x, (k, v) = layer(x, positions_BxT, mask_BxTxS, inv_freq, (k, v), cache.end_B,
                        fresh=fresh)
      x = self._constrain(x)
      new_k.append(k)
      new_v.append(v)
    cache = cache.replace(k=tuple(new_k), v=tuple(new_v), end_B=cache.end_B + t)
    return x, cache

  def decode(self, tokens_BxT, cache: KVCache, attend: int | None = None):
    """Cached forward: (float32 logits [B, T, V], updated cache); `attend` as in decode_hidden."""
    x, cache = self.decode_hidden(tokens_BxT, cache, attend=attend)
    return self.logits(x), cache


def init_adapters(cfg: ModelConfig, seed: int, shardings=None) -> dict[tuple, jax.Array]:
  """The LoRA adapters of a freshly built `Transformer(cfg, rngs=nnx.Rngs(seed))`, {path: array},
  made on device in their shardings ({path: Sharding} or None): what `hf.load` puts beside the
  loaded base. The base params the builder draws too are dead code in the jitted function and
  never materialise."""
  def build():
    state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), LoRAParam)
    return [v.get_value() for _, v in nnx.to_flat_state(state)]

  paths = [p for p, _ in nnx.to_flat_state(
      nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))), LoRAParam))]
  out = None if shardings is None else [shardings[p] for p in paths]
  return dict(zip(paths, jax.jit(build, out_shardings=out)()))
