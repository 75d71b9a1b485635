"""Speed features keep the numbers: prepared client tensors (same batches and metrics as the article's
tf.data path), several local TFF workers, and `python -m fedmnist.worker` processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import portpicker
import psutil
import pytest
import tensorflow as tf

from fedmnist import config as config_lib
from conftest import LOOPBACK_IPS, listening_ips
from fedmnist import data, logs, loop, prepared, runtime, train, worker

SMALL = ["data.dataset=synthetic", "data.num_clients=8", "data.examples_per_client=33",
         "clients_per_round=4", "client_selection=uniform", "rounds=3", "eval_clients=4", "seed=3"]


def small_config(*overrides: str) -> config_lib.Config:
    return config_lib.load(None, SMALL + list(overrides))


def run(config: config_lib.Config, run_dir) -> list[dict]:
    before = runtime.worker_children()  # other tests' session-wide workers may be running
    loop.train(config, run_dir, echo=lambda line: None, progress=False)
    assert runtime.worker_children() == before
    return [json.loads(line) for line in (run_dir / logs.METRICS_FILE).read_text().splitlines()]


def assert_same_rounds(a: list[dict], b: list[dict], tolerance: float) -> None:
    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    for row_a, row_b in zip(a, b):
        for key in ("loss", "sparse_categorical_accuracy", "num_examples", "num_batches"):
            assert row_a["train"][key] == pytest.approx(row_b["train"][key], abs=tolerance), (row_a, row_b)
    for split in ("train", "test"):
        for key, value in a[-1]["eval"][split].items():
            assert value == pytest.approx(b[-1]["eval"][split][key], abs=tolerance)


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory) -> list[dict]:
    return run(small_config("client_input=prepared"), tmp_path_factory.mktemp("prepared"))


def test_shuffle_order_reproduces_the_articles_batches():
    dataset = data.load_synthetic(num_clients=2, examples_per_client=37, seed=5)
    client = dataset.train.create_tf_dataset_for_client(dataset.train.client_ids[0])
    kwargs = dict(epochs=3, batch_size=7, shuffle_buffer=10, prefetch_buffer=2, seed=4)
    tf.keras.utils.set_random_seed(11)
    article = list(data.preprocess(client, **kwargs))
    tf.keras.utils.set_random_seed(11)
    arrays = prepared.prepare_client(client, **kwargs)
    order, n = arrays["order"], len(list(client))
    assert len(order) == 3 * n and order.max() == n - 1
    # Rows past the examples are padding to a size class: zeros that no batch reads.
    assert len(arrays["x"]) == len(arrays["y"]) == prepared.padded_rows(n) > n
    assert not arrays["x"][n:].any() and not arrays["y"][n:].any()
    batches = [order[i:i + 7] for i in range(0, len(order), 7)]
    assert len(batches) == len(article)
    for indices, batch in zip(batches, article):
        np.testing.assert_array_equal(arrays["x"][indices], batch["x"].numpy())
        np.testing.assert_array_equal(arrays["y"][indices], batch["y"].numpy())


def test_size_classes_are_few_and_pad_at_most_half():
    sizes = range(1, 1025)
    rows = [prepared.padded_rows(n) for n in sizes]
    assert all(n <= r <= 1.5 * n for n, r in zip(sizes, rows))
    assert rows == sorted(rows)
    # 1 to 3 rows are classes of their own, then two per doubling from 4 to 1,024.
    assert len(set(rows)) == 3 + 2 * 8 + 1


def test_sampled_clients_are_padded_to_size_classes_fixed_ones_are_not():
    dataset = data.load_synthetic(num_clients=2, examples_per_client=37, seed=5)
    client_id = dataset.train.client_ids[0]
    n = len(list(dataset.train.create_tf_dataset_for_client(client_id)))
    assert prepared.padded_rows(n) > n
    for selection, rows in (("uniform", prepared.padded_rows(n)), ("fixed", n)):
        config = small_config(f"client_selection={selection}")
        clients = prepared.prepared_clients(config, dataset.train, loop.preprocess_kwargs(config))
        assert len(clients.dataset(client_id).get_single_element()["x"]) == rows


def test_prepared_rounds_equal_the_articles_path(prepared_run, tmp_path):
    # SMALL samples clients, so their prepared tensors carry padding rows.
    train_data = data.load_dataset(small_config().data, 3).train
    sizes = [len(list(train_data.create_tf_dataset_for_client(c))) for c in train_data.client_ids]
    assert any(prepared.padded_rows(n) > n for n in sizes)
    article = run(small_config("client_input=datasets"), tmp_path)
    assert_same_rounds(prepared_run, article, tolerance=1e-6)
    assert prepared_run[-1]["train"]["loss"] < prepared_run[0]["train"]["loss"]


def test_benchmark_floor_does_the_same_sgd_steps(prepared_run):
    from fedmnist import bench

    floor = bench.run_floor(small_config())
    assert len(floor["per_round"]) == len(prepared_run)
    for row, floor_row in zip(prepared_run, floor["per_round"]):
        assert floor_row["loss"] == pytest.approx(row["train"]["loss"], abs=1e-5)
        assert floor_row["accuracy"] == pytest.approx(row["train"]["sparse_categorical_accuracy"], abs=1e-6)
    assert floor["steady_s_per_round"] > 0 and floor["peak_rss_gb"] > 0
    # One ulp on every initial weight moves a linear model's rounds by float32 rounding at most.
    nudged = bench.run_floor(small_config(), nudge_weights=True)
    tolerance, noise = bench.agreement_tolerance({"floor": floor, "floor_nudged": nudged})
    assert noise < 1e-3 and tolerance == max(bench.AGREEMENT_TOLERANCE, 2 * noise)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(floor["per_round"], nudged["per_round"])) < 1e-5


def test_cache_stays_within_its_byte_budget():
    dataset = data.load_synthetic(num_clients=6, examples_per_client=20, seed=1)
    kwargs = loop.preprocess_kwargs(small_config())
    one_client = prepared.PreparedClients(dataset.train, kwargs).dataset(dataset.train.client_ids[0])
    size = sum(t.numpy().nbytes for t in one_client.get_single_element().values())
    clients = prepared.PreparedClients(dataset.train, kwargs, max_bytes=int(2.5 * size))
    first = clients(dataset.train.client_ids[:1])[0].get_single_element()
    clients(dataset.train.client_ids)
    assert clients.cached_bytes <= 2.5 * size
    again = clients(dataset.train.client_ids[:1])[0].get_single_element()   # evicted, prepared anew
    for key in ("x", "y", "order"):
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())


def test_clients_of_any_size_share_one_dataset_kernel():
    # One traced function for every client size: TensorFlow keeps no per-size kernels, so memory
    # stays flat however many client sizes a long run samples (bench's `scale` workload).
    clients = {f"c{n}": (np.random.default_rng(n).uniform(size=(n, 28, 28)), np.arange(n) % 10)
               for n in (3, 17, 40)}
    client_data = data.client_data_from_arrays(clients)
    traces_before = (data.examples_dataset.experimental_get_tracing_count(),
                     prepared.as_dataset.experimental_get_tracing_count())
    cache = prepared.PreparedClients(client_data, loop.preprocess_kwargs(small_config()))
    for dataset, (client_id, (pixels, _)) in zip(cache(list(clients)), clients.items()):
        assert dataset.element_spec == prepared.PREPARED_SPEC
        x = dataset.get_single_element()["x"].numpy()
        assert len(x) == prepared.padded_rows(len(pixels))
        np.testing.assert_array_equal(x[:len(pixels)], pixels.reshape(-1, 784).astype(np.float32))
    traces_after = (data.examples_dataset.experimental_get_tracing_count(),
                    prepared.as_dataset.experimental_get_tracing_count())
    assert all(after - before <= 1 for before, after in zip(traces_before, traces_after))


# --- Several workers ---------------------------------------------------------------------------

def test_two_local_workers_give_the_same_rounds(prepared_run, tmp_path):
    two = run(small_config("num_workers=2"), tmp_path)
    # The two workers' partial sums are merged, so float32 sums are grouped differently.
    assert_same_rounds(prepared_run, two, tolerance=1e-6)


@contextlib.contextmanager
def worker_commands(*hosts: str | None) -> Iterator[list[SimpleNamespace]]:
    """Runs `python -m fedmnist.worker --port P [--host H]` for each host (None: no --host), started
    together so that their TensorFlow imports overlap. Yields each one's port, worker_binary and
    "serving" line; then stops them by SIGTERM, checks that each exits with 0 and its worker_binary
    is gone, and sets each one's `stderr`."""
    started = []
    for host in hosts:
        port = portpicker.pick_unused_port()
        command = subprocess.Popen([sys.executable, "-m", "fedmnist.worker", "--port", str(port),
                                    *(["--host", host] if host else [])],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(SimpleNamespace(port=port, command=command, binaries=[], stderr=""))
    try:
        for one in started:
            one.serving = one.command.stdout.readline()
            assert f"port {one.port}" in one.serving, one.serving
            one.binaries = psutil.Process(one.command.pid).children()
            assert [p.name() for p in one.binaries] == ["worker_binary"]
            one.binary = one.binaries[0]
        yield started
    finally:
        for one in started:
            one.command.send_signal(signal.SIGTERM)
        for one in started:
            one.code = one.command.wait(timeout=30)
            one.stderr = one.command.stderr.read()
    time.sleep(0.2)
    for one in started:
        assert one.code == 0, one.stderr
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in one.binaries)


def test_worker_command_listens_on_loopback_unless_told_and_serves_a_training_run(prepared_run, tmp_path):
    with worker_commands(None, "0.0.0.0") as (default, everywhere):
        assert "serving on 127.0.0.1 port" in default.serving
        assert listening_ips(default.binary.pid) <= LOOPBACK_IPS and listening_ips(default.binary.pid)
        assert "serving on 0.0.0.0 port" in everywhere.serving
        assert listening_ips(everywhere.binary.pid) == {"::"}  # gRPC's dual-stack wildcard socket
        remote = run(small_config(f"workers=[127.0.0.1:{default.port}]"), tmp_path)
        assert_same_rounds(prepared_run, remote, tolerance=1e-6)
    assert "unauthenticated" not in default.stderr
    assert "unauthenticated" in everywhere.stderr and "trusted network" in everywhere.stderr


def test_worker_command_rejects_a_bad_host(capsys):
    assert worker.main(["--port", "8000", "--host", "worker.example"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an IP address" in err[0]


def test_worker_command_rejects_a_bad_port(capsys):
    assert worker.main(["--port", "70000"]) == 2
    assert "between 1 and 65535" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["workers=[localhost]"], "is not host:port"),
    (["workers=localhost:8000"], "expected a list"),
    (["workers=[localhost:8000]", "num_workers=2"], "num_workers"),
    (["num_workers=0"], "at least 1"),
    (["client_input=fast"], "one of 'prepared', 'datasets'"),
])
def test_bad_runtime_settings_are_config_errors(overrides, message, tmp_path, capsys):
    argv = ["--run-dir", str(tmp_path / "run")] + [f"--set={o}" for o in overrides]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_unreachable_worker_is_a_runtime_error(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "_STARTUP_TIMEOUT_SECONDS", 1.0)
    port = portpicker.pick_unused_port()
    before = runtime.worker_children()
    with pytest.raises(runtime.RuntimeStartError, match="did not answer"):
        with runtime.local_runtime(addresses=[f"localhost:{port}"]):
            pass
    assert runtime.worker_children() == before
    config_lib.check_address("workers[0]", f"localhost:{port}")
