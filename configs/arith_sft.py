"""SFT from scratch on the embedded arithmetic task: how the shipped teacher and student were made.

Run:   python -m kat_jax.main --config configs/arith_sft.py:teacher --workdir /tmp/arith_teacher
       python -m kat_jax.main --config configs/arith_sft.py:student --workdir /tmp/arith_student
Then:  cp -r /tmp/arith_teacher/model kat_jax/assets/arith_teacher   (likewise the student)
Expected on 2 CPU cores: teacher (d160, 4 layers, 1.24M params) ~10 min to >= 97% greedy held-out
accuracy; student (d96, 3 layers, 0.33M) ~4 min, exported at the evaluation closest to 45%
accuracy at temperature 1 -- a student that still slips, so OPD has traps to find. The transition
is sharp, hence selection by measured accuracy.
"""

import ml_collections


def get_config(arg: str | None = "teacher") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "sft"
  c.seed = 0
  c.n_ops = 3
  c.batch_size = 96
  c.warmup_steps = 100
  c.weight_decay = 0.0
  c.eval_every = 100
  c.eval_size = 256
  c.learning_rate = 2e-3
  if arg == "teacher":
    c.model = ml_collections.ConfigDict(dict(hidden_size=160, intermediate_size=432,
                                             num_layers=4, num_heads=4, num_kv_heads=4,
                                             head_dim=40))
    c.steps = 2000
    c.eval_temperature = 0.0
    c.select = "last"
    c.stop_accuracy = 0.97
    c.target_accuracy = 1.0
  elif arg == "student":
    c.model = ml_collections.ConfigDict(dict(hidden_size=96, intermediate_size=256,
                                             num_layers=3, num_heads=4, num_kv_heads=4,
                                             head_dim=24))
    c.steps = 1400
    c.eval_every = 50
    c.eval_temperature = 1.0
    c.select = "target"
    c.stop_accuracy = 1.0
    c.target_accuracy = 0.45
  else:
    raise ValueError(f"configs/arith_sft.py:{arg}: use ':teacher' or ':student'.")
  return c
