"""Device mesh and logical-axis rules: how named model dimensions map onto mesh axes.

Model params carry logical names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`) in their
`out_sharding` metadata; a rule table maps each name to a mesh axis (or None = replicated). A
dimension whose size the mesh axis does not divide is replicated instead, so one rule table serves
every model size (e.g. 2 kv heads on a 4-way tensor axis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kat_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over the embedding dimension, tensor parallelism over heads / MLP / vocabulary.
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
}


# The rollout's layout: Megatron-style tensor parallelism. Weights stay where they are (heads,
# KV heads, MLP and vocabulary split over `tensor`, the embedding dimension whole) and each
# decode step moves only [B, T, E] activations; the LM head is vocabulary-parallel, so the
# logits of a row live split over its tensor group and no device ever holds [B, W, V] for the
# whole batch. The FSDP training layout (DEFAULT_RULES) in a decode loop either gathers every
# weight at every token (batch-sharded activations) or all-reduces the whole batch's partial
# products, logits included (measured on v5e:4x4 by kat_jax.aot: README "TPU").
ROLLOUT_RULES: Mapping[str, str | None] = {**DEFAULT_RULES, "embed": None}


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> Mesh:
  """A mesh of `shape` (e.g. (2, 2, 2) for data, fsdp, tensor) over the given or all devices."""
  devices = jax.devices() if devices is None else devices
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, but "
                      f"{len(devices)} are available; make the product of the shape equal it.")
  return Mesh(np.asarray(devices).reshape(tuple(shape)), tuple(axis_names))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, object] = DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array with logical dimension `names` and `shape` on `mesh`."""
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # Keep the mesh axes that exist, are not used by another dimension, and divide the size.
    kept = []
    for axis in axes:
      if axis in mesh.shape and axis not in used and mesh.shape[axis] > 1:
        if size % (int(np.prod([mesh.shape[a] for a in kept])) * mesh.shape[axis]) == 0:
          kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def named_sharding(names, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def param_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an NNX param state (abstract or concrete), from its logical names."""
  from flax import nnx  # local: keeps this module importable without flax for launch scripts

  def one(variable):
    shape = variable.get_value().shape
    names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
    return named_sharding(names, shape, mesh, rules)

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh: Mesh, rules=DEFAULT_RULES):
  """Moves an NNX model's params onto `mesh` by their logical axes (in place); returns it."""
  from flax import nnx

  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
  return pin_activations(model, mesh, rules)


def pin_activations(model, mesh: Mesh, rules=DEFAULT_RULES):
  """Sets the Transformer's activation and KV-cache shardings for `mesh` / `rules` (the model
  constrains its [B, T, E] activations and [B, K, S, D] caches to them; it never reads the
  rules itself): rows over the batch axes, KV heads over `tensor` when it divides them."""
  model.act_sharding = batch_sharding(mesh, 3, rules)
  heads = logical_to_spec(("kv_heads",), (model.cfg.num_kv_heads,), mesh, rules)[0]
  model.cache_sharding = NamedSharding(
      mesh, PartitionSpec(model.act_sharding.spec[0], heads, None, None))
  return model


def rollout_tensor(n_devices: int, data: int, model_cfgs) -> int:
  """The largest tensor-parallel degree for the rollout: a divisor of the devices per data
  replica that divides every model's attention heads, KV heads and MLP width (so the KV cache
  splits over heads, never replicates)."""
  per_replica = n_devices // data
  dims = [d for c in model_cfgs for d in (c.num_heads, c.num_kv_heads, c.intermediate_size)]
  return max(t for t in range(1, per_replica + 1)
             if per_replica % t == 0 and all(d % t == 0 for d in dims))


def resolve_rollout_tensor(value: int, mesh: Mesh, model_cfgs) -> int:
  """`mesh.rollout_tensor` of a config: -1 = roll out in the training layout (returns 0),
  0 = `rollout_tensor`'s choice, t > 0 = t (checked against the heads it must divide)."""
  if value == -1:
    return 0
  if value == 0:
    return rollout_tensor(mesh.devices.size, mesh.shape["data"], model_cfgs)
  for c in model_cfgs:
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
      if getattr(c, name) % value:
        raise ConfigError(f"mesh.rollout_tensor={value} does not divide {name}="
                          f"{getattr(c, name)} of a model; use 0 (auto) or a divisor of it.")
  rollout_mesh(mesh, value)  # the device count check
  return value


def rollout_mesh(mesh: Mesh, tensor: int) -> Mesh:
  """The same devices as `mesh` as (data, groups, tensor): `tensor` neighbouring devices hold
  one copy of the weights, the batch is split over data x groups (the `fsdp` axis)."""
  data = mesh.shape["data"]
  per_replica = mesh.devices.size // data
  if tensor < 1 or per_replica % tensor:
    raise ConfigError(f"mesh.rollout_tensor={tensor} must divide the {per_replica} devices per "
                      f"data replica (mesh {dict(mesh.shape)}).")
  return Mesh(mesh.devices.reshape(data, per_replica // tensor, tensor), MESH_AXES)


def relayout(model, mesh: Mesh, rules=DEFAULT_RULES):
  """A copy of an NNX model with its params moved to `mesh` / `rules` (a collective resharding
  on device; the original is untouched) and its activation constraint set to match."""
  from flax import nnx

  graph, state = nnx.split(model)
  moved = nnx.merge(graph, reshard(state, param_shardings(state, mesh, rules)))
  return pin_activations(moved, mesh, rules)


def _identity(tree):
  return tree


def reshard(tree, shardings):
  """`tree` with each array moved to its sharding in `shardings` (same structure), by a jitted
  identity: XLA's collectives on device, and valid when the arrays span processes. One module-
  level function, so a step's reshards hit the compile cache (a fresh lambda recompiled each call)."""
  return jax.jit(_identity, out_shardings=shardings)(tree)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [B, ...] array: batch over the mesh axes `rules['batch']` names."""
  axes = rules.get("batch")
  axes = (axes,) if isinstance(axes, str) else tuple(a for a in (axes or ()) if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch dimension is split."""
  spec = batch_sharding(mesh, 1, rules).spec[0]
  spec = (spec,) if isinstance(spec, str) else (spec or ())
  return int(np.prod([mesh.shape[a] for a in spec]))


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int | None = None) -> tuple:
  """Resolves one -1 entry of (data, fsdp, tensor) to the devices left; checks the product."""
  n = jax.device_count() if n_devices is None else n_devices
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh (data, fsdp, tensor) = {tuple(shape)}: at most one axis may be -1.")
  if any(s < 1 and s != -1 for s in shape):
    raise ConfigError(f"mesh (data, fsdp, tensor) = {tuple(shape)}: sizes must be >= 1 (or -1).")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n % known:
      raise ConfigError(f"mesh (data, fsdp, tensor) = {tuple(shape)}: {n} devices are not a "
                        f"multiple of {known}.")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ConfigError(f"mesh (data, fsdp, tensor) = {tuple(shape)} has {int(np.prod(shape))} "
                      f"devices but {n} are available; make the product {n} or use -1.")
  return tuple(shape)


def put_batch(x, mesh: Mesh, rules=DEFAULT_RULES):
  """A host array (the same full batch on every process) as a batch-sharded global array.

  Each process materialises only the shards of its own devices, so this is also the multi-host
  path: per-host data loading without any process holding device memory for others' rows.
  """
  x = np.asarray(x)
  sharding = batch_sharding(mesh, x.ndim, rules)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(tree):
  """numpy copies of every array in `tree`, gathered across processes when sharded over hosts."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def replicate(x, mesh: Mesh):
  """`x` (a host value, a jax.Array on one device, or a PRNG key) replicated over `mesh`.

  Built from host data shard by shard, so it also works when the mesh spans processes (where a
  device_put onto devices of other hosts is not allowed).
  """
  sharding = NamedSharding(mesh, PartitionSpec())
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = replicate(jax.random.key_data(x), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def onto_mesh(tree, mesh: Mesh):
  """Every array of `tree` not already laid out on `mesh` becomes replicated over it.

  For the small state that lives beside sharded params (optimizer step counts, KAT threshold):
  a value committed to one device cannot enter a jitted step with mesh-sharded arguments, and a
  checkpoint restores each array with the sharding its template had.
  """

  def place(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    return replicate(x, mesh)

  return jax.tree.map(place, tree)
