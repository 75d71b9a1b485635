"""Shared fixtures: a TFF runtime owned by the test session, the CLI as a subprocess, EMNIST files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedmnist.runtime  # noqa: F401  (before any test imports TFF: its default worker is then ours)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tff_runtime():
    """TFF's execution context backed by a worker this session starts and stops."""
    from fedmnist import runtime

    with runtime.local_runtime() as worker:
        yield worker


def run_cli(*args: str, cwd: Path, timeout: float = 300, module: str = "fedmnist.train",
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m fedmnist.train ARGS` with stdout and stderr captured through pipes.

    The pipes matter: if a TFF worker outlived the CLI holding its stdout, this call would hang
    until `timeout` instead of returning.
    """
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def worker_pid(run_dir: Path) -> int:
    """The worker_binary pid that runtime.LocalWorker recorded in the run's worker.log."""
    first = (Path(run_dir) / "worker.log").read_text().splitlines()[0]
    return int(first.split(" pid ")[1].split()[0])


LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1"}  # the second: 127.0.0.1 on a dual-stack socket
WILDCARD_IPS = {"0.0.0.0", "::"}


def listening_ips(pid: int) -> set[str]:
    """The local IP addresses that process `pid` listens on."""
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def process_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def write_emnist_sqlite(path: Path, clients: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """Writes `clients[split][client_id] = (pixels, labels)` in TFF's emnist_all.sqlite format."""
    import tensorflow as tf

    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                       "serialized_example_proto BLOB NOT NULL)")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                       "num_examples INTEGER NOT NULL)")
    for split, by_client in clients.items():
        for client_id, (pixels, labels) in by_client.items():
            for image, label in zip(pixels, labels):
                example = tf.train.Example(features=tf.train.Features(feature={
                    "pixels": tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1))),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                }))
                connection.execute("INSERT INTO examples VALUES (?, ?, ?)",
                                   (split, client_id, example.SerializeToString()))
            connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, split, len(labels)))
    connection.commit()
    connection.close()
