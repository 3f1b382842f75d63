"""Each bad input stops the run with one message that names the value and the fix."""

import os

import pytest

from moa_jax import train
from moa_jax.data import train_bpe


def test_mesh_that_does_not_match_the_devices(debug_config, tmp_path):
  debug_config.mesh.data = 3
  with pytest.raises(train.TrainingError, match=r"mesh.data=3, .* needs 3 devices but 1 are present"):
    train.train(debug_config, str(tmp_path))


def test_two_fill_axes(debug_config, tmp_path):
  debug_config.mesh.fsdp = -1
  with pytest.raises(train.TrainingError, match=r"at most one may be -1"):
    train.train(debug_config, str(tmp_path))


def test_missing_corpus(debug_config, tmp_path):
  debug_config.data.source = f"glob:{tmp_path}/nothing/*.txt"
  with pytest.raises(train.TrainingError, match=r"data.source = .*nothing.* matched no files"):
    train.train(debug_config, str(tmp_path / "run"))


def test_empty_corpus(debug_config, tmp_path):
  (tmp_path / "empty.txt").write_text("")
  debug_config.data.source = f"glob:{tmp_path}/*.txt"
  with pytest.raises(train.TrainingError, match=r"data.source"):
    train.train(debug_config, str(tmp_path / "run"))


def test_tokenizer_larger_than_the_vocabulary(debug_config, tmp_path):
  text = open(os.__file__).read()
  path = str(tmp_path / "tokenizer.json")
  train_bpe([text], 700, path)
  debug_config.data.tokenizer = path
  with pytest.raises(train.TrainingError, match=r"model.vocab_size = 512.*vocab_size="):
    train.train(debug_config, str(tmp_path / "run"))


def test_checkpoint_of_another_model_is_refused_and_kept(debug_config, tmp_path):
  workdir = str(tmp_path / "run")
  debug_config.train.steps = 4
  train.train(debug_config, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  debug_config.model.d_model = 96
  debug_config.model.ffn.gate = "softmax"
  with pytest.raises(train.TrainingError, match=r"different model:(.|\n)*model.d_model: 64 in the checkpoint, 96 now"
                                                 r"(.|\n)*model.ffn.gate: 'sigmoid' in the checkpoint, 'softmax' now"):
    train.train(debug_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before == ["4"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(debug_config, tmp_path):
  workdir = str(tmp_path / "run")
  debug_config.train.steps = 4
  train.train(debug_config, workdir)
  debug_config.train.steps = 12
  debug_config.optim.lr = float("inf")
  debug_config.optim.warmup_steps = 0
  with pytest.raises(train.TrainingError, match=r"(loss|param_norm) is (nan|inf) at step [56]; stopped without saving\. "
                                                 r"Last good checkpoint: step 4"):
    train.train(debug_config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]


@pytest.mark.parametrize("field,value,message", [
    ("model.n_heads", 5, r"model.n_heads = 5 does not divide model.d_model = 64"),
    ("model.ffn.activations", ("relu", "swish2"), r"model.ffn.activations contains 'swish2'; known: identity"),
    ("model.ffn.groups", 5, r"model.ffn.groups = 5 must be ≥ 1 and divide model.ffn.d_ff = 192"),
    ("optim.name", "sgd", r"optim.name = 'sgd'; allowed: adamw, muon"),
    ("optim.schedule", "linear", r"optim.schedule = 'linear'; allowed: cosine, wsd, constant"),
])
def test_bad_config_values(debug_config, tmp_path, field, value, message):
  group, _, key = field.rpartition(".")
  node = debug_config
  for part in group.split("."):
    node = node[part]
  node[key] = value
  with pytest.raises(train.TrainingError, match=message):
    train.train(debug_config, str(tmp_path))
