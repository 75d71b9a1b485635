"""Populations: the describe command, capped and 62-class EMNIST through the whole loop."""

import json

import numpy as np
import pytest
import tensorflow as tf

from fedmnist import config as config_lib
from fedmnist import data
from fedmnist.data import population
from helpers import quiet_train, write_emnist_sqlite


@pytest.mark.unit
def test_describe_tells_iid_from_shards(tmp_path, capsys):
    outputs = {}
    for partition in ("iid", "shards"):
        png = tmp_path / f"{partition}.png"
        assert population.main(["describe", "--dataset", "digits", "--set", f"data.partition={partition}",
                                "--output", str(png)]) == 0
        outputs[partition] = capsys.readouterr().out
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    skew = {p: float(out.split("label skew")[1].split()[0]) for p, out in outputs.items()}
    assert skew["iid"] < 0.15 < 0.6 < skew["shards"]
    assert "clients            20" in outputs["iid"]
    assert population.main(["describe", "--dataset", "digits", "--output", str(tmp_path / "iid.png")]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.unit
def test_describe_names_the_source_and_partition_and_refuses_too_many_digits_clients(tmp_path, monkeypatch, capsys):
    from fedmnist.data import sources

    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: False)   # the digits stand in for EMNIST
    common = ["describe", "--set", f"data.cache_dir={tmp_path}", "--set", "data.partition=shards"]
    assert population.main([*common, "--output", str(tmp_path / "auto.png")]) == 0
    assert "digits, partition shards" in capsys.readouterr().out
    assert population.main([*common, "--set", "data.num_clients=1000", "--output", str(tmp_path / "many.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == ("error: data.num_clients: digits has 1,797 examples, too few for 1,000 clients "
                                    "(at most 898)")


@pytest.mark.unit
def test_describe_writes_its_png_under_runs_never_into_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    written = []
    for _ in range(2):  # as `fedmnist describe` passes its arguments: no "describe"
        assert population.main(["--dataset", "digits", "--set", "data.partition=shards"]) == 0
        written.append(capsys.readouterr().out.splitlines()[-1].split("label histograms: ")[1])
    assert [path.name for path in tmp_path.iterdir()] == ["runs"]
    assert sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / "runs").iterdir()) == sorted(written)
    assert len(set(written)) == 2 and all(name.startswith("runs/population-digits-shards-") for name in written)
    for bad, message in (("figure.jpg", "give a .png file name"), ("missing/figure.png", "does not exist")):
        assert population.main(["--dataset", "digits", "--output", bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.unit
def test_describe_statistics_on_a_known_matrix():
    stats = population.describe(np.array([[5, 5, 0], [0, 0, 10]]))
    assert stats["clients"] == 2 and stats["examples_median"] == 10
    assert stats["labels_per_client"] == 1.5 and stats["top_label_share"] == 0.75
    # Population mix (0.25, 0.25, 0.5): distances 0.5 and 0.5.
    assert stats["label_tv_distance"] == 0.5


def fake_emnist_62(directory, clients=4, per_client=12, seed=0):
    rng = np.random.default_rng(seed)
    split = {}
    for name, n in (("all_train", per_client), ("all_test", 4)):
        split[name] = {f"f{i:04d}_00": (rng.uniform(0, 1, (n, 28, 28)).astype(np.float32),
                                        rng.integers(0, 62, n)) for i in range(clients)}
    split["digits_only_train"] = {"f0000_00": split["all_train"]["f0000_00"]}
    split["digits_only_test"] = {"f0000_00": split["all_test"]["f0000_00"]}
    write_emnist_sqlite(directory / data.EMNIST_FILE, split)


def test_62_class_emnist_with_caps_trains_a_62_way_model(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    fake_emnist_62(cache)
    capped = data.load_dataset(config_lib.DataConfig(
        dataset="emnist", only_digits=False, cache_dir=str(cache), max_clients=3, max_examples_per_client=5))
    assert capped.num_classes == 62 and len(capped.train.client_ids) == 3
    assert all(len(list(capped.train.create_tf_dataset_for_client(c))) == 5 for c in capped.train.client_ids)

    config = config_lib.load(None, ["data.dataset=emnist", "data.only_digits=false", f"data.cache_dir={cache}",
                                    "data.max_clients=3", "clients_per_round=2", "rounds=1", "preprocess.epochs=1"])
    run_dir = tmp_path / "run"
    summary = quiet_train(config, run_dir)
    assert summary["dataset"] == "emnist" and summary["num_clients"] == 3
    keras_model = tf.keras.models.load_model(run_dir / "model.keras")
    assert keras_model.output_shape == (None, 62)
    assert json.loads((run_dir / "summary.json").read_text())["evaluation_on_test_data"]["num_examples"] == 12
