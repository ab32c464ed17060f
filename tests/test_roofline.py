"""Roofline arithmetic (kat_jax/roofline.py) and how the TPU compiler counts loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kat_jax import aot, roofline
from train_fixtures import make_models, tiny_config

GiB = 2**30


def test_collective_bytes_per_device_from_hlo_lines():
  hlo = "\n".join([
      # 16 devices in groups of 8 (iota form): all-gather result 8 MiB -> 7/8 of it moves.
      "%a = bf16[4096,1024]{1,0} all-gather(bf16[512,1024]{1,0} %x), replica_groups=[2,8]<=[16]",
      # explicit groups of 4: all-reduce of 1 MiB moves 2 x 3/4 MiB.
      "%b = f32[262144]{0} all-reduce(f32[262144]{0} %y), replica_groups={{0,1,2,3},{4,5,6,7}}",
      # reduce-scatter to a 1 MiB shard in groups of 2: the 2 MiB input, half of it moves.
      "%c = f32[262144]{0} reduce-scatter(f32[524288]{0} %z), replica_groups=[4,2]<=[8]",
      "%d = f32[262144]{0} add(f32[262144]{0} %y, f32[262144]{0} %y)",
  ])
  want = 8 * 2**20 * 7 / 8 + 2 * 2**20 * 3 / 4 + 2**20
  assert roofline.collective_bytes(hlo) == pytest.approx(want)


def test_roofline_time_is_the_slower_of_compute_and_hbm_plus_ici():
  chip = roofline.CHIPS["v5e"]
  c = roofline.Cost(flops=197e12, hbm_bytes=819e9 / 2, collective_bytes=1e11 / 4)
  assert c.seconds(chip) == pytest.approx(1.0 + 0.25)  # compute-bound 1 s, then 1/4 s of ICI
  assert c.bound(chip) == "compute"
  assert (c * 2 - c).flops == c.flops and (c + c).seconds(chip) == pytest.approx(2.5)


def test_the_tpu_compiler_counts_a_loop_body_once():
  """Why kat_jax.aot costs loop-free pieces and applies trip counts itself: a 10-step scan of a
  matmul reports one matmul's FLOPs (libtpu 0.0.42.1). If this changes, so must aot."""
  pytest.importorskip("libtpu")
  devices = aot.topology_devices("v5e:2x2")
  where = NamedSharding(Mesh(np.array(devices), ("x",)), PartitionSpec())
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=where)
  once = jax.jit(lambda a: a @ a).lower(x).compile()
  scan = jax.jit(lambda a: jax.lax.scan(lambda c, _: (c @ c, None), a, None, length=10)[0])
  flops = lambda exe: roofline.program_cost(exe).flops  # noqa: E731
  assert flops(once) == 2 * 256**3
  assert flops(scan.lower(x).compile()) == flops(once)


def test_aot_roofline_pieces_of_a_tiny_pair(tmp_path):
  pytest.importorskip("libtpu")
  student, teacher = make_models(tmp_path)
  cfg = tiny_config(student, teacher)
  cfg.dtype = "bfloat16"
  report = aot.check(cfg, "v5e:2x2", roofline=True)
  assert set(report.costs) == {"prefill", "student step", "window", "update"}
  pieces = report.pieces()
  step, window = report.costs["student step"], report.costs["window"]
  # A decode step multiplies each of the 2 rows per chip by every student weight matrix at
  # least once (2 FLOPs per multiply-add): a floor from the model's shapes alone.
  s = aot.memory.model_config(cfg.student, "bfloat16")
  e, i = s.hidden_size, s.intermediate_size
  per_layer = e * s.head_dim * (s.num_heads * 2 + s.num_kv_heads * 2) + 3 * e * i
  weights = s.num_layers * per_layer + e * s.vocab_size
  assert step.flops >= 2 * weights * 2, (step.flops, weights)
  assert window.flops > step.flops and window.hbm_bytes > step.hbm_bytes
  w, n = report.window, report.max_new_tokens // report.window
  assert pieces["decode window"].flops == pytest.approx(window.flops + (w - 1) * step.flops)
  assert pieces["rollout"].flops == pytest.approx(report.costs["prefill"].flops
                                                  + n * pieces["decode window"].flops)
  text = aot.roofline_table(report, 4)
  for chip in ("v4", "v5e", "v5p", "v6e"):
    assert f"\n  {chip} " in text
