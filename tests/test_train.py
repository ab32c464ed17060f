"""The training loop end to end: golden step, bit-exact resume, non-finite stop, main, bad configs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from kat_jax import config as config_lib
from kat_jax import hf, safetensors_io, train
from kat_jax.models import ConfigError
from train_fixtures import make_models, run_main, step_metrics, tiny_config

GOLDEN = Path(__file__).parent / "golden" / "opd_step.json"
STEP_KEYS = ("loss", "grad_norm", "kl", "kl_sampled", "trap_rate", "gen_len", "trained_len", "tau",
             "tau_probe", "tau_rejected", "tau_imputed", "empty", "skipped")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return make_models(tmp_path_factory.mktemp("models"))


def test_two_steps_match_golden_metrics(models, tmp_path):
  cfg = tiny_config(*models, steps=2)
  cfg.eval_size = 0
  cfg.export = False
  cfg.log_rollouts = True
  train.train(cfg, tmp_path)
  got = {str(k): {m: v[m] for m in STEP_KEYS} for k, v in step_metrics(tmp_path).items()}
  # One probe row per step (probe_fraction 1/8 of 8 rollouts), drawn afresh each step.
  logged = [json.loads(l) for l in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
  assert [sum(r["probe"]) for r in logged] == [1, 1]
  if os.environ.get("KAT_UPDATE_GOLDEN"):
    GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
  want = json.loads(GOLDEN.read_text())
  assert set(got) == set(want)
  for step in want:
    for key in STEP_KEYS:
      if want[step][key] is None:
        assert got[step][key] is None, (step, key)
      else:
        np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-4, atol=1e-6,
                                   err_msg=f"step {step} {key}")


@pytest.mark.parametrize("policy", [
    dict(mode="horizon", horizon_start=4, horizon_step=4, horizon_every=1),
    dict(mode="topk", topk_k=4, topk_threshold=0.8, topk_drop=0.25),
    dict(mode="iw", iw_gamma=1.0)], ids=lambda p: p["mode"])
def test_truncation_policies_train_end_to_end(models, tmp_path, policy):
  cfg = tiny_config(*models, steps=3)
  cfg.eval_size = 0
  cfg.export = False
  cfg.log_rollouts = True
  cfg.kat.update(policy)
  if policy["mode"] == "iw":  # and a sweep's run that skips the shared evaluation before
    cfg.eval_size, cfg.eval_before = 4, False
  summary = train.train(cfg, tmp_path)
  assert (tmp_path / "eval_after.json").is_file() == (policy["mode"] == "iw")
  assert not (tmp_path / "eval_before.json").exists() and summary["avg_before"] is None
  steps = step_metrics(tmp_path)
  logged = [json.loads(l) for l in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
  assert all(np.isfinite(steps[k]["loss"]) and not steps[k]["skipped"] for k in steps)
  if policy["mode"] == "horizon":  # POPD: horizons 4, 8, 12 -- the traced tau of each step
    assert [steps[k]["tau"] for k in sorted(steps)] == [4.0, 8.0, 12.0]
    for rec, h in zip(logged, (4, 8, 12)):
      assert max(rec["trained_len"]) <= h
      assert rec["terminated"] == [n > h for n in rec["length"]]
  elif policy["mode"] == "topk":  # weights < 1 after drift events; cuts after the 4th
    assert summary["mean_trained_weight"] < summary["mean_trained_length"]
  else:  # iw: weights in [1, 2], nothing cut
    assert not any(t for rec in logged for t in rec["terminated"])
    assert summary["mean_trained_length"] < summary["mean_trained_weight"] <= (
        2 * summary["mean_trained_length"])


def test_resume_after_process_exit_is_bit_exact(models, tmp_path):
  straight = tmp_path / "straight"
  spec = f"tests/tiny_config.py:{models[0]},{models[1]}"
  # Both runs in subprocesses with the same devices: a 1-device and an 8-device mesh differ in
  # the last bits of cross-device sums, which is not what this test is about.
  out = run_main(["--config", f"{spec},4", "--workdir", str(straight)])
  assert out.returncode == 0, out.stderr[-2000:]
  resumed = tmp_path / "resumed"
  first = run_main(["--config", f"{spec},2", "--workdir", str(resumed)])
  assert first.returncode == 0, first.stderr[-2000:]
  second = run_main(["--config", f"{spec},4", "--workdir", str(resumed)])
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from" in second.stdout and "at step 2" in second.stdout
  a, b = step_metrics(straight), step_metrics(resumed)
  assert sorted(b) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):
    for key in STEP_KEYS:
      assert a[step][key] == b[step][key], (step, key)
  # The summary covers the whole run, not the steps since the resume: token counts, rates and
  # the before-training evaluation the first process ran.
  sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
  assert sa.pop("export") != sb.pop("export")
  assert sa == sb and "counted_from_step" not in sb
  assert sb["avg_before"] is not None and sb["mean_rollout_length"] > 0
  ta = {n: safetensors_io.read_tensor(i).tobytes() for n, i in
        safetensors_io.read_header(straight / "export" / "model.safetensors").items()}
  tb = {n: safetensors_io.read_tensor(i).tobytes() for n, i in
        safetensors_io.read_header(resumed / "export" / "model.safetensors").items()}
  assert ta == tb
  # The export is a model transformers-compatible tooling (and kat_jax) loads back.
  model, _ = hf.load(resumed / "export")
  assert model.cfg.vocab_size == 19


def test_non_finite_updates_stop_without_touching_the_good_checkpoint(models, tmp_path):
  import jax.numpy as jnp
  cfg = tiny_config(*models, steps=2)
  cfg.eval_size = 0
  train.train(cfg, tmp_path / "run")
  ckpt = tmp_path / "run" / "checkpoints" / "2"
  before = {p: p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}
  teacher, t_cfg = hf.load(models[1])
  teacher.layers[0].mlp.up_proj[...] = teacher.layers[0].mlp.up_proj[...] * jnp.nan
  hf.save(teacher, t_cfg, tmp_path / "nan_teacher", tokenizer_dir=models[1])
  bad = tiny_config(models[0], tmp_path / "nan_teacher", steps=6)
  bad.max_consecutive_skips = 2
  bad.loss.objective = "reverse_kl"
  bad.eval_size = 0
  with pytest.raises(train.TrainingStopped, match=r"2 consecutive non-finite.*last good checkpoint "
                     r"is step 2"):
    train.train(bad, tmp_path / "run")
  # The skipped step was logged, and its rollout did not feed the threshold.
  step3 = step_metrics(tmp_path / "run")[3]
  assert step3["skipped"] == 1 and step3["tau_rejected"] == 1
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
  assert {p: p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()} == before


def _bad(models, **edits):
  """tiny_config with edits; `kat__window=3` sets config.kat.window (unknown keys added too)."""
  cfg = tiny_config(*models)
  for key, value in edits.items():
    node = cfg
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    with cfg.unlocked():
      if leaf in node:  # ConfigDict is type-safe: a config *file* could still hold any type
        del node[leaf]
      node[leaf] = value
  return cfg

BAD = [
    (dict(kat__windw=4), r"config\.kat\.windw is not a known setting; did you mean 'kat\.window'"),
    (dict(steps="10"), r"config\.steps='10': must be of type int"),
    (dict(steps=0), r"config\.steps=0: must be >= 1"),
    (dict(kat__window=64), r"config\.kat\.window=64: longer than max_new_tokens=16"),
    (dict(prompts_per_step=3), r"config\.prompts_per_step=3: the batch .* = 6 must be divisible "
                               r"by the 8 batch shards"),
    (dict(kat__mode="sometimes"), r"config\.kat\.mode='sometimes'; use one of"),
    (dict(loss__objective="ce"), r"config\.loss\.objective='ce'; use one of"),
    (dict(loss__beta=1.5), r"config\.loss\.beta=1\.5 must be in \[0, 1\]"),
    (dict(sampling__top_p=0.0), r"config\.sampling: .*top_p=0\.0 in \(0, 1\]"),
    (dict(optim__learning_rate=-1.0), r"config\.optim\.learning_rate=-1\.0 must be > 0"),
    (dict(threshold__mode="median"), r"config\.threshold\.mode='median'"),
    (dict(student="/nonexistent/model"), r"config\.student='/nonexistent/model': not a Hugging "
                                         r"Face model directory"),
    (dict(data__source="jsonl", data__path="/nope.jsonl"), r"config\.data\.path='/nope\.jsonl': "
                                                           r"no such file"),
    (dict(kat__mode="fixed"), r"config\.kat\.mode='fixed' needs kat\.fixed_len >= 1"),
    (dict(kat__mode="random", kat__random_lengths=[]), r"config\.kat\.random_lengths=\[\]"),
    (dict(kat__mode="horizon"), r"config\.kat\.mode='horizon' needs kat\.horizon_start >= 1"),
    (dict(kat__mode="topk", kat__topk_k=20), r"config\.kat\.topk_k=20: exceeds the 19-token"),
    (dict(kat__mode="topk", kat__topk_drop=-0.1), r"config\.kat\.mode='topk' needs .*"
                                                  r"kat\.topk_drop >= 0 \(got -0\.1\)"),
    (dict(eval__k=8), r"config\.eval\.k=8 must be between 1 and eval\.n=4"),
    (dict(eval__benchmarks="mathh500"), r"config\.eval\.benchmarks='mathh500': unknown benchmark"),
    (dict(eval__benchmarks="aime24=/nope/aime.jsonl"),
     r"config\.eval\.benchmarks=.*benchmark file '/nope/aime\.jsonl' \(aime24\) does not exist"),
    (dict(eval__temperature=-1.0), r"config\.eval\.temperature=-1\.0 must be >= 0"),
    (dict(mesh__tensor=3), r"config\.mesh=.*'tensor': 3.*8 devices are not a multiple of 3"),
    (dict(data__source="gym"), r"config\.data\.source='gym': use 'arith', 'jsonl', "
                               r"'reasoning_gym' or 'tfds'"),
    (dict(data__source="reasoning_gym", data__tasks="chain_summ"),
     r"config\.data\.tasks='chain_summ': task chain_summ: Dataset 'chain_summ' not registered"),
    (dict(data__source="reasoning_gym", data__tasks="chain_sum(bogus=1)"),
     r"config\.data\.tasks=.*unexpected keyword argument 'bogus'"),
    (dict(loss__chunk=6), r"config\.loss\.chunk=6: must divide the 16 generated positions .*"
                          r"use one of \[4, 8, 16\]"),
    (dict(data__source="reasoning_gym", data__tasks="chain_sum", data__size=0),
     r"config\.data\.size=0: must be between 1 and 10000000"),
    (dict(data__source="reasoning_gym", data__tasks="chain_sum", data__chat_template=True),
     r"config\.data\.chat_template=True: the student .* has no chat template"),
    (dict(data__extract="first"), r"config\.data\.extract='first': use 'boxed' or 'last_number'"),
    (dict(loss__microbatches=-2), r"config\.loss\.microbatches=-2: must be >= 0 \(0 = auto\)"),
    # sampled_pg must score the distribution that sampled (on-policy ratio 1).
    (dict(sampling__top_k=5), r"config\.sampling\.top_k=5: sampled_pg scores the untruncated "
                              r"softmax.*set sampling\.top_k=0"),
    (dict(sampling__top_p=0.8), r"config\.sampling\.top_p=0\.8: sampled_pg scores the"),
    (dict(sampling__temperature=0.0), r"config\.sampling\.temperature=0\.0: greedy decoding"),
    (dict(sampling__temperature=0.7, loss__temperature=1.0),
     r"config\.loss\.temperature=1\.0: differs from sampling\.temperature=0\.7.*loss\."
     r"temperature=0"),
    (dict(loss__objective="reverse_kl", sampling__top_k=99),
     r"config\.sampling\.top_k=99: exceeds the 19-token vocabulary"),
    (dict(eval__top_k=20), r"config\.eval\.top_k=20: exceeds the 19-token vocabulary"),
    (dict(loss__ratio_clip=-1.0), r"config\.loss\.ratio_clip=-1\.0 must be >= 0"),
    (dict(loss__temperature=-1.0), r"config\.loss\.temperature=-1\.0 must be >= 0"),
    (dict(threshold__estimator="mean"), r"config\.threshold\.estimator='mean'; use one of"),
    (dict(threshold__probe_fraction=0.0), r"config\.threshold\.probe_fraction=0\.0: leaves"),
    (dict(kat__cut="middle"), r"config\.kat\.cut='middle'; use one of"),
    (dict(data__heldout_size=-1), r"config\.data\.heldout_size=-1: must be >= 0"),
    (dict(compile_check="maybe"), r"config\.compile_check='maybe': use 'auto' \(on TPU\)"),
    (dict(mesh__rollout_tensor=-2), r"config\.mesh\.rollout_tensor=-2: use -1"),
    (dict(rollout__slots=4), r"config\.rollout\.slots=4: must be <= the 8 rollouts .* multiple "
                             r"of the 8 batch shards"),
    (dict(rollout__slots=-1), r"config\.rollout\.slots=-1 and rollout\.length_bucket=128 must"),
    (dict(mesh__rollout_tensor=4), r"config\.mesh\.rollout_tensor=4: .*does not divide "
                                   r"num_kv_heads=2"),
]


@pytest.mark.parametrize("edits,message", BAD, ids=[next(iter(e)) for e, _ in BAD])
def test_bad_configs_give_one_clear_line(models, edits, message):
  with pytest.raises(ConfigError, match=message) as info:
    config_lib.validate(_bad(models, **edits))
  assert "\n" not in str(info.value)


def test_tokenizer_mismatch_is_a_config_error(models, tmp_path):
  import shutil
  shutil.copytree(models[1], tmp_path / "teacher")
  tok = json.loads((tmp_path / "teacher" / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  vocab["+"], vocab["-"] = vocab["-"], vocab["+"]
  (tmp_path / "teacher" / "tokenizer.json").write_text(json.dumps(tok))
  with pytest.raises(ConfigError, match=r"config\.student / config\.teacher: .*vocab differ"):
    config_lib.validate(tiny_config(models[0], tmp_path / "teacher"))


def test_main_reports_bad_config_in_one_line_without_traceback(models, tmp_path):
  spec = f"tests/tiny_config.py:{models[0]},{models[1]},2"
  out = run_main(["--config", spec, "--workdir", str(tmp_path), "--config.kat.window=64"])
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.kat.window=64: longer than max_new_tokens=16; lower kat.window or raise "
      "max_new_tokens.")


def test_config_sections_take_the_dataclass_defaults():
  """One source of defaults: each section of config.defaults() holds its dataclass's defaults,
  except the config-level 'auto' values the run resolves (and fields the dataclass lacks)."""
  import dataclasses

  from kat_jax import evaluate, kat, opd, rollout, threshold
  auto = {("loss", "temperature"): 0.0, ("eval", "max_new_tokens"): 0}
  c = config_lib.defaults()
  for section, cls in (("sampling", rollout.SamplingConfig), ("kat", kat.KATConfig),
                       ("threshold", threshold.ThresholdConfig), ("loss", opd.LossConfig),
                       ("optim", opd.OptimConfig), ("eval", evaluate.EvalConfig)):
    for f in dataclasses.fields(cls):
      if f.name in c[section]:
        want = auto.get((section, f.name), f.default)
        assert c[section][f.name] == want, (section, f.name, c[section][f.name], want)
  # The auto values resolve to the dataclasses' meaning for a default run.
  assert config_lib.loss_config(c, 10).temperature == c.sampling.temperature
  assert config_lib.eval_config(c).max_new_tokens == c.max_new_tokens


@pytest.mark.parametrize("argv,message", [
    (["--config", "configs/nope.py"], "config file 'configs/nope.py' does not exist; give the "
                                      "path of a config file such as configs/arith.py"),
    (["--config=configs/arith.py", "--config.kat.windw=3"],
     "--config.kat.windw: config.kat has no field 'windw'; did you mean --config.kat.window?"),
    (["--config", "configs/arith.py", "--config.no_such_key", "1"],
     "--config.no_such_key: config has no field 'no_such_key'; config has: attn_chunk, "),
    (["--config", "configs/arith.py", "--config.steps=abc"],
     "--config.steps=abc: expected int (the default is 400)."),
    (["--config", "configs/arith.py", "--config.optim.learning_rate=1", "--config.steps=3"], None),
    (["--config", "configs/arith.py", "--config.kat.spike_tau=inf", "--config.steps=0x10"], None),
    (["--config", "configs/arith_sft.py"], None),  # get_config() with the file's own default
])
def test_command_line_mistakes_are_one_line(argv, message):
  from kat_jax import main
  got = main.preflight(argv)
  assert got == message if message is None or not message.endswith(", ") else (
      got.startswith(message)), got


def test_main_names_an_unknown_override_and_writes_nothing(tmp_path):
  out = run_main(["--config", "configs/arith.py", "--config.kat.windw=3", "--workdir",
                  str(tmp_path / "run")])
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [
      "error: --config.kat.windw: config.kat has no field 'windw'; did you mean "
      "--config.kat.window?"]
  assert not (tmp_path / "run").exists()


def test_eval_and_export_modes_use_the_latest_checkpoint(models, tmp_path):
  spec = f"tests/tiny_config.py:{models[0]},{models[1]},2"
  workdir = tmp_path / "run"
  out = run_main(["--config", spec, "--workdir", str(workdir), "--config.mode=export"])
  assert out.returncode != 0 and "no checkpoint" in out.stderr.splitlines()[-1]
  assert run_main(["--config", spec, "--workdir", str(workdir)]).returncode == 0
  trained = {n: safetensors_io.read_tensor(i).tobytes() for n, i in
             safetensors_io.read_header(workdir / "export" / "model.safetensors").items()}
  import shutil
  shutil.rmtree(workdir / "export")
  out = run_main(["--config", spec, "--workdir", str(workdir), "--config.mode=export"])
  assert out.returncode == 0, out.stderr[-2000:]
  again = {n: safetensors_io.read_tensor(i).tobytes() for n, i in
           safetensors_io.read_header(workdir / "export" / "model.safetensors").items()}
  assert again == trained  # the checkpoint's params, not the initial student's
  out = run_main(["--config", spec, "--workdir", str(workdir), "--config.mode=eval"])
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads((workdir / "eval.json").read_text())
  assert report["step"] == 2 and 0.0 <= report["macro"]["avg@4"] <= 1.0
  assert report["benchmarks"]["arith"]["problems"] == 8 and "pass@4" in out.stdout


def test_default_eval_is_the_training_datas_held_out_prompts(models, tmp_path):
  """eval.benchmarks="" evaluates held-out prompts formatted like training: data.eval_path of a
  JSONL source, else records of data.path that the training stream never yields."""
  from kat_jax.data import arith, sources
  rows = [arith.make_problem(3, i, split="eval") for i in range(20)]
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, _, a in rows))
  cfg = tiny_config(*models)
  cfg.data.source, cfg.data.path, cfg.eval_size, cfg.data.heldout_size = "jsonl", str(path), 3, 5
  (bench,) = train.setup(cfg, tmp_path / "run").benchmarks
  trained = {p for p, _ in sources.from_config(cfg.data, "train").batch(0, 200)}
  assert bench.name == "heldout" and len(bench.prompts) == 3
  assert len(trained) == 15 and not trained & set(bench.prompts)  # never trained on
  by_prompt = {p: a for p, _, a in rows}
  assert bench.golds == [by_prompt[p] for p in bench.prompts]
  # The same records are held out whatever the data seed.
  cfg.data.seed = 7
  assert train.setup(cfg, tmp_path / "run").benchmarks[0].prompts == bench.prompts
  # A separate eval file: evaluated as is, in file order; the whole data.path trains.
  held = tmp_path / "heldout.jsonl"
  held.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, _, a in rows[:4]))
  cfg.data.eval_path = str(held)
  (bench,) = train.setup(cfg, tmp_path / "run").benchmarks
  assert bench.prompts == [p for p, _, _ in rows[:3]]
  assert len({p for p, _ in sources.from_config(cfg.data, "train").batch(0, 200)}) == 20
  # Nothing held out and no eval file: evaluation would grade training prompts -- refused.
  cfg.data.eval_path, cfg.data.heldout_size = "", 0
  with pytest.raises(ConfigError, match=r"config\.data\.heldout_size=0: with no data\.eval_path"):
    config_lib.validate(cfg)
  one = tmp_path / "one.jsonl"
  one.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
  cfg.data.path, cfg.data.heldout_size = str(one), 5
  with pytest.raises(ConfigError, match=r"config\.data\.heldout_size=5: data\.path holds 1 record"):
    config_lib.validate(cfg)
  # Named benchmarks evaluate: nothing is held out of the file.
  cfg.data.path, cfg.eval.benchmarks = str(path), "arith"
  run = train.setup(cfg, tmp_path / "run")
  assert len({p for p, _ in run.source.batch(0, 200)}) == 20
  cfg.data.source, cfg.eval.benchmarks = "arith", ""
  (bench,) = train.setup(cfg, tmp_path / "run").benchmarks
  assert bench.name == "arith" and len(bench.prompts) == 3


def test_loss_temperature_follows_sampling_only_for_sampled_pg(models):
  cfg = tiny_config(*models)
  cfg.sampling.temperature = 0.7
  assert config_lib.loss_config(cfg, 19).temperature == 0.7  # on-policy ratio 1
  cfg.loss.objective = "reverse_kl"
  assert config_lib.loss_config(cfg, 19).temperature == 1.0  # the models' own distributions
  cfg.loss.temperature = 2.0
  assert config_lib.loss_config(cfg, 19).temperature == 2.0
  config_lib.validate(cfg)  # explicit GKD temperatures are fine for full-vocabulary objectives


def test_resume_with_another_batch_is_refused_before_loading(models, tmp_path):
  """The data position saved with a checkpoint must be where the new config continues."""
  cfg = tiny_config(*models, steps=1)
  cfg.eval_size, cfg.export, cfg.checkpoint_every = 0, False, 1
  train.train(cfg, tmp_path)
  cfg.steps, cfg.prompts_per_step = 2, 8
  with pytest.raises(ConfigError, match=r"config\.prompts_per_step=8: the checkpoint at step 1 .* "
                     r"consumed 4 prompts .* Resume with prompts_per_step=4"):
    train.train(cfg, tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
