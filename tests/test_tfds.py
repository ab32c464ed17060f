"""Prompts from a prepared TFDS dataset (array_record, no TensorFlow): a tiny builder made here,
read by data.source='tfds' into a training run that resumes exactly."""

import json

import pytest

from kat_jax import config as config_lib
from kat_jax import train
from kat_jax.data import arith, sources
from kat_jax.errors import ConfigError
from train_fixtures import make_models, tiny_config

tfds = pytest.importorskip("tensorflow_datasets")


def _build(data_dir, n_train=40, n_test=8, prompt_field="prompt"):
  """A TFDS dataset of arithmetic problems, written by tfds itself as array_record."""

  class KatPrompts(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {prompt_field: tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train", n_train),
              "test": self._generate_examples("eval", n_test)}

    def _generate_examples(self, split, n):
      for i in range(n):
        prompt, _, answer = arith.make_problem(7, i, 3, split)
        yield i, {prompt_field: prompt, "answer": answer}

  builder = KatPrompts(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return data_dir / "kat_prompts" / "1.0.0"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("tfds"))


def test_the_source_reads_every_record_once_per_epoch(dataset):
  src = sources.TfdsSource(dataset.parent, "train", seed=3)  # the dataset dir: latest version
  assert src.path == dataset
  want = {arith.make_problem(7, i, 3, "train")[::2] for i in range(40)}
  epoch = src.batch(0, 40)
  assert set(epoch) == want and len(set(epoch)) == 40
  assert src.batch(37, 6) == epoch[37:] + src.batch(40, 3)  # positions run across epochs
  assert sources.TfdsSource(dataset, "train", seed=3).batch(5, 10) == epoch[5:15]


def test_a_training_run_on_tfds_prompts_resumes_exactly(dataset, tmp_path):
  student, teacher = make_models(tmp_path)

  def cfg(steps):
    c = tiny_config(student, teacher, steps=steps)
    c.data.source, c.data.path = "tfds", str(dataset)
    c.eval_size, c.export, c.checkpoint_every, c.log_samples = 8, False, 1, 0
    config_lib.validate(c)
    return c

  train.train(cfg(3), tmp_path / "straight")
  train.train(cfg(2), tmp_path / "resumed")
  train.train(cfg(3), tmp_path / "resumed")
  read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text(  # noqa: E731
      ).splitlines()]
  step3 = [[r for r in read(d) if r["step"] == 3 and "loss" in r][0] for d in
           ("straight", "resumed")]
  assert step3[0]["loss"] == step3[1]["loss"] and step3[0]["kl"] == step3[1]["kl"]
  before = [r for r in read("straight") if r["step"] == 0][0]
  assert 0.0 <= before["eval/avg@4"] <= 1.0  # held out: the dataset's test split


def test_a_missing_or_unusable_dataset_is_one_line(dataset, tmp_path):
  student, teacher = make_models(tmp_path)
  c = tiny_config(student, teacher)
  c.data.source = "tfds"
  for path, field, match in (
      (tmp_path / "nope", "prompt", r"config\.data\.source='tfds': data\.path='.*nope' is not a "
                                    r"prepared TFDS dataset"),
      (dataset, "question", r"no feature 'question' \(data\.prompt_field\); its features are"),
  ):
    c.data.path, c.data.prompt_field = str(path), field
    with pytest.raises(ConfigError, match=match) as e:
      config_lib.validate(c)
    assert "\n" not in str(e.value)
  c.data.prompt_field, c.data.eval_split = "prompt", "validation"
  with pytest.raises(ConfigError, match=r"has no split 'validation' \(it has \['train', 'test'\]|"
                                        r"has no split 'validation' \(it has \['test', 'train'\]"):
    config_lib.validate(c)
