"""A second "host" for the tests of remote workers across a real network boundary (issues 26 and 27): two
network namespaces joined by a veth pair, the run's side (10.213.7.1) and the worker's (10.213.7.2).

Each test makes its own pair, named after its process and a random tag, and the veth ends are created
inside the namespaces, so concurrent test sessions on one machine do not clash. Making namespaces
needs root and iproute2's `ip`; `made()` skips the test, with the reason, where they cannot be made.
Needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

IP_SECONDS = 60  # `ip` answers at once; a limit so that a wedged one fails the test instead of hanging it


def _ip(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=IP_SECONDS)


class Namespaces:
    """The run's namespace (`run`, address RUN) and the worker's (`worker`, address WORKER)."""

    RUN, WORKER = "10.213.7.1", "10.213.7.2"

    def __init__(self):
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.run, self.worker = f"fedmnist-run-{tag}", f"fedmnist-worker-{tag}"

    def create(self) -> None:
        """Raises pytest's skip when the namespaces or the veth pair between them cannot be made (no privilege,
        no kernel support); a later step that fails is an error."""
        steps = [
            ("netns", "add", self.run), ("netns", "add", self.worker),
            ("link", "add", "veth-run", "netns", self.run, "type", "veth", "peer", "name", "veth-worker",
             "netns", self.worker),
            ("-n", self.run, "addr", "add", f"{self.RUN}/30", "dev", "veth-run"),
            ("-n", self.worker, "addr", "add", f"{self.WORKER}/30", "dev", "veth-worker"),
            ("-n", self.run, "link", "set", "veth-run", "up"), ("-n", self.worker, "link", "set", "veth-worker", "up"),
            ("-n", self.run, "link", "set", "lo", "up"), ("-n", self.worker, "link", "set", "lo", "up"),
        ]
        for number, step in enumerate(steps):
            done = _ip(*step)
            if done.returncode != 0:
                reason = f"network namespaces cannot be made here (ip {' '.join(step[:3])}: {done.stderr.strip()})"
                if number <= 2:
                    self.delete()
                    pytest.skip(reason)
                raise AssertionError(reason)

    def inside(self, namespace: str) -> list[str]:
        """The prefix that runs a command in `namespace` (self.run or self.worker)."""
        return ["ip", "netns", "exec", namespace]

    def black_hole(self) -> None:
        """From now on the worker's side drops every packet for the run: they leave and are never answered."""
        self._check(_ip("-n", self.worker, "route", "add", "blackhole", f"{self.RUN}/32"))

    def cut(self) -> None:
        """Takes the link down (the cable pulled): nothing passes either way until `restore()`."""
        self._check(_ip("-n", self.worker, "link", "set", "veth-worker", "down"))

    def restore(self) -> None:
        self._check(_ip("-n", self.worker, "link", "set", "veth-worker", "up"))

    def listening(self, namespace: str) -> set[str]:
        """`address:port` of every TCP socket listening in `namespace` (an IPv4 address bound on a
        dual-stack socket as its plain IPv4 form)."""
        done = subprocess.run([*self.inside(namespace), "ss", "-Hltn"], capture_output=True, text=True,
                              timeout=IP_SECONDS)
        self._check(done)
        return {line.split()[3].replace("[::ffff:", "").replace("]:", ":") if "[::ffff:" in line else line.split()[3]
                for line in done.stdout.splitlines()}

    def delete(self) -> None:
        for name in (self.run, self.worker):
            _ip("netns", "delete", name)  # its veth end goes with it

    @staticmethod
    def _check(done: subprocess.CompletedProcess) -> None:
        assert done.returncode == 0, f"{' '.join(done.args)}: {done.stderr.strip()}"


def delete_abandoned() -> None:
    """Deletes the namespaces of test processes that are gone (killed before they could delete theirs):
    each is a mount in /run/netns that would otherwise stay until the machine restarts."""
    listed = _ip("netns", "list")
    for name in (line.split()[0] for line in listed.stdout.splitlines() if line.strip()):
        parts = name.split("-")  # fedmnist-run-PID-TAG, fedmnist-worker-PID-TAG
        if len(parts) == 4 and parts[0] == "fedmnist" and parts[2].isdigit() \
                and not os.path.exists(f"/proc/{parts[2]}"):
            _ip("netns", "delete", name)


@contextlib.contextmanager
def made() -> Iterator[Namespaces]:
    """A new pair of namespaces, deleted on the way out; skips the test, with the reason, where they
    cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): network namespaces cannot be made here")
    if os.geteuid() != 0:
        pytest.skip(f"running as uid {os.geteuid()}: making network namespaces needs root")
    delete_abandoned()
    namespaces = Namespaces()
    try:
        namespaces.create()
        yield namespaces
    finally:
        namespaces.delete()
