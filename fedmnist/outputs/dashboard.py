"""A TensorBoard server this package starts and stops.

`python -m fedmnist.train --tensorboard` serves the run directory while it trains and afterwards,
until Ctrl-C. A run directory is served under its own name (TensorBoard would call it `.`): through a
symbolic link named after it, in a temporary directory that TensorBoard reads as its logdir. By hand:
`uv run tensorboard --logdir runs` (all runs, each named by its directory). TensorBoard opens on its
TIME SERIES page, whose first groups are the learning curves (`accuracy/...`, `loss/...`); its CUSTOM
SCALARS page (`LEARNING_CURVES_PAGE`) draws local training and evaluation in one chart per metric.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import portpicker

from fedmnist.outputs import run_directory
from fedmnist.runtime.processes import dying_with_parent

DEFAULT_PORT = 6006
LEARNING_CURVES_PAGE = "#custom_scalars&_smoothingWeight=0"  # appended to the URL; 10 rounds are too few to smooth
_STARTUP_TIMEOUT_SECONDS = 60.0


class TensorBoardError(RuntimeError):
    """TensorBoard could not be started or did not answer."""


# --- The server -------------------------------------------------------------------------------------

def pick_port(preferred: int = DEFAULT_PORT) -> int:
    """TensorBoard's usual port when it is free, else any free local port."""
    return preferred if portpicker.is_port_free(preferred) else portpicker.pick_unused_port()


def is_run_directory(path: Path) -> bool:
    """A run's directory (its files, its lock, or its event files directly in it), as opposed to a
    directory of runs."""
    return (run_directory.looks_like_run(path) or (path / run_directory.LOCK_FILE).exists()
            or any(path.glob("events.out.tfevents.*")))


class TensorBoardServer:
    """`tensorboard --logdir LOGDIR` on 127.0.0.1 as a child process, killed with its parent. A run
    directory is served as one run named after the directory."""

    def __init__(self, logdir: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 reload_interval: float = 2.0):
        self.host = host
        self.port = port or portpicker.pick_unused_port()
        self._output = tempfile.TemporaryFile()
        self._links: tempfile.TemporaryDirectory | None = None
        logdir = Path(logdir)
        if is_run_directory(logdir):
            self._links = tempfile.TemporaryDirectory(prefix="fedmnist-tensorboard-")
            named = Path(self._links.name) / logdir.resolve().name
            os.symlink(logdir.resolve(), named, target_is_directory=True)
            logdir = named.parent
        self.process = subprocess.Popen(
            dying_with_parent([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host,
                               "--port", str(self.port), "--reload_interval", str(reload_interval)]),
            stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT,
            process_group=0)  # stopped by us, not by the terminal's Ctrl-C

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def learning_curves_url(self) -> str:
        return self.url + LEARNING_CURVES_PAGE

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        """The body of `GET <url><path>`, e.g. `get("data/runs")`."""
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=timeout) as response:
            return response.read()

    def wait_ready(self, timeout: float = _STARTUP_TIMEOUT_SECONDS) -> "TensorBoardServer":
        """Returns once the server answers its data API; raises if it exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise TensorBoardError(f"TensorBoard exited with code {self.process.returncode}: "
                                       f"{self._last_output_line()}")
            try:
                self.get("data/runs", timeout=2.0)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TensorBoardError(f"TensorBoard did not answer on port {self.port} within {timeout:.0f} s")
            time.sleep(0.2)

    def _last_output_line(self) -> str:
        self._output.seek(0)
        lines = [line for line in self._output.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        if self._links is not None:
            self._links.cleanup()
            self._links = None

    def __enter__(self) -> "TensorBoardServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve_until_interrupted(server: TensorBoardServer, echo=print) -> None:
    """Keeps the server up until Ctrl-C (or until it exits by itself)."""
    echo(f"TensorBoard is serving the run at {server.url}; learning curves, local training and evaluation "
         f"together: {server.learning_curves_url}; press Ctrl-C to stop it")
    try:
        while server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
