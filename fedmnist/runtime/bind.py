"""Makes a `worker_binary` child listen on one address: builds and preloads `loopback_bind.c`.

TFF's `worker_binary` always listens on `[::]:port`, every interface. `loopback_bind.c` is an
`LD_PRELOAD` shim that turns its wildcard `bind()` into a bind to `FEDMNIST_BIND_ADDRESS`. It is
compiled on first use with the C compiler (`$CC`, else `cc`) into the user's cache directory
(`$XDG_CACHE_HOME/fedmnist`, else `~/.cache/fedmnist`), under a name that holds a hash of its source,
so an upgraded shim is rebuilt and concurrent builds do not clash. This module needs no TensorFlow.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("loopback_bind.c")
ADDRESS_VARIABLE = "FEDMNIST_BIND_ADDRESS"
_COMPILE_TIMEOUT_SECONDS = 60


class ShimBuildError(RuntimeError):
    """The bind shim could not be built (no C compiler, a compile error, an unusable cache directory)."""


def is_all_interfaces(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedmnist"


def shim_path() -> Path:
    """The shim's cached shared object, built first if it is not there yet."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    target = cache_dir() / f"loopback_bind-{digest}.so"
    if any(c.isspace() or c == ":" for c in str(target)):
        # LD_PRELOAD splits its list at spaces and colons.
        raise ShimBuildError(f"the cache directory {target.parent} has a space or colon in its path; "
                             "set XDG_CACHE_HOME to another directory")
    if not target.is_file():
        _build(target)
    return target


def _build(target: Path) -> None:
    compiler = shlex.split(os.environ.get("CC") or "cc")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as error:
        raise ShimBuildError(f"cannot write to the cache directory {target.parent}: {error.strerror}") from None
    try:
        try:
            result = subprocess.run([*compiler, "-shared", "-fPIC", "-O2", "-o", temporary, str(SOURCE), "-ldl"],
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=_COMPILE_TIMEOUT_SECONDS)
        except FileNotFoundError:
            raise ShimBuildError(f"no C compiler: {compiler[0]!r} was not found") from None
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ShimBuildError(f"the C compiler {compiler[0]!r} could not run: {error}") from None
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise ShimBuildError(f"the C compiler {compiler[0]!r} failed (exit {result.returncode}): {first}")
        os.replace(temporary, target)  # atomic: a concurrent build's file is replaced by an equal one
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def child_env(host: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment additions that make a `worker_binary` child listen on `host` only.

    Empty for an all-interfaces host (`0.0.0.0`, `::`). Raises ShimBuildError if the shim cannot be built.
    """
    if is_all_interfaces(host):
        return {}
    environ = os.environ if environ is None else environ
    preload = [str(shim_path())] + ([environ["LD_PRELOAD"]] if environ.get("LD_PRELOAD") else [])
    return {"LD_PRELOAD": ":".join(preload), ADDRESS_VARIABLE: host}
