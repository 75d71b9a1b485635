"""Your own Keras model, as the article's `create_keras_model` but yours: `model: module:function` from YAML
or the CLI, checked with one-line errors, recorded in config.yaml, reloaded on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import ROOT, metrics_rows, run_cli, train_main

BASE = ["--dataset", "digits", "--quiet", "--set", "histogram_every=0"]


def test_a_user_model_trains_from_the_cli_is_recorded_and_resumes(tmp_path):
    import tensorflow as tf

    import user_models

    run_dir = tmp_path / "run"
    done = train_main(*BASE, "--model", "user_models:small_mlp", "--rounds", "2", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == "user_models:small_mlp"
    rows = metrics_rows(run_dir)
    assert rows[1]["train"]["loss"] < rows[0]["train"]["loss"]
    saved = tf.keras.models.load_model(run_dir / "model.keras")
    expected = user_models.small_mlp(10)
    assert [w.shape for w in saved.trainable_weights] == [w.shape for w in expected.trainable_weights]
    assert saved.predict(np.zeros((2, 784), np.float32), verbose=0).shape == (2, 10)
    resumed = train_main("--resume", str(run_dir), "--rounds", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["round"] for r in metrics_rows(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["model"] == "user_models:small_mlp"


def test_a_user_model_from_a_yaml_config_in_a_subprocess(tmp_path):
    (tmp_path / "my_models.py").write_text((ROOT / "tests" / "user_models.py").read_text())
    (tmp_path / "mine.yaml").write_text("model: my_models:small_mlp\nrounds: 1\nhistogram_every: 0\n"
                                        "data:\n  dataset: digits\n")
    done = run_cli("--config", "mine.yaml", "--quiet", cwd=tmp_path)  # the module beside the config, in cwd
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "model.keras").is_file()


@pytest.mark.parametrize("model, message", [
    ("nowhere_to_be_found:create", "model: cannot import 'nowhere_to_be_found'"),
    ("user_models:missing", "model: 'user_models' has no function 'missing'"),
    ("user_models:images_in", "model: user_models:images_in takes inputs of shape (None, 28, 28), not (None, 784)"),
    ("user_models:three_classes", "model: user_models:three_classes gives outputs of shape (None, 3), not (None, 10)"),
    ("user_models:logits", "model: user_models:logits's outputs are not class probabilities; end it with a softmax"),
    ("user_models:compiled", "model: user_models:compiled(10) returned a compiled model"),
    ("lineer", "model: 'lineer' is not linear, cnn, 2nn or module:function (did you mean 'linear'?"),
])
def test_a_model_that_does_not_fit_is_one_line_and_exit_2(tmp_path, model, message):
    done = train_main(*BASE, "--model", model, "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: " + message), done.stderr
    assert not (tmp_path / "run").exists()
