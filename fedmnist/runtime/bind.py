"""Makes a `worker_binary` child listen where it should and accept only its own user: builds and
preloads `loopback_bind.c`.

TFF's `worker_binary` always listens on `[::]:port`, every interface, and serves whoever connects.
`loopback_bind.c` is an `LD_PRELOAD` shim that turns its wildcard `bind()` into a bind to one address
(`FEDMNIST_BIND_ADDRESS`) or to a Unix socket (`FEDMNIST_UNIX_SOCKET`), and that closes every accepted
connection not made by one user (`FEDMNIST_PEER_UID`) before the worker reads from it
(docs/security.md). It is compiled on first use with the C compiler (`$CC`, else `cc`) into the
user's cache directory (`$XDG_CACHE_HOME/fedmnist`, else `~/.cache/fedmnist`), under a name that holds
a hash of its source, so an upgraded shim is rebuilt and concurrent builds do not clash. This module
needs no TensorFlow.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import platform
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from fedmnist.errors import ShimBuildError

SOURCE = Path(__file__).with_name("loopback_bind.c")
ADDRESS_VARIABLE = "FEDMNIST_BIND_ADDRESS"
SOCKET_VARIABLE = "FEDMNIST_UNIX_SOCKET"
PEER_VARIABLE = "FEDMNIST_PEER_UID"
_COMPILE_TIMEOUT_SECONDS = 60


def is_all_interfaces(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def is_loopback(host: str) -> bool:
    """A loopback IP address (127.0.0.0/8, ::1, or 127.x in its v4-mapped form), or `localhost`."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


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


def child_env(host: str | None = None, environ: dict[str, str] | None = None, *, socket_path: str | None = None,
              peer_uid: int | None = None) -> dict[str, str]:
    """Environment additions that make a `worker_binary` child listen on `host` only, or on the Unix
    socket `socket_path` instead of any TCP port, and, with `peer_uid`, accept connections only from
    sockets of that user (on loopback or a Unix socket: a remote peer's owner cannot be known).

    Empty for an all-interfaces host (`0.0.0.0`, `::`) that admits everyone. Raises ShimBuildError if the
    shim cannot be built.
    """
    if peer_uid is not None and socket_path is None and not (host and is_loopback(host)):
        raise ValueError(f"only connections on loopback or a Unix socket have a known owner, not on {host}")
    variables = {}
    if socket_path is not None:
        variables[SOCKET_VARIABLE] = socket_path
    elif host is not None and not is_all_interfaces(host):
        variables[ADDRESS_VARIABLE] = host
    if peer_uid is not None:
        variables[PEER_VARIABLE] = str(peer_uid)
    if not variables:
        return {}
    environ = os.environ if environ is None else environ
    preload = [str(shim_path())] + ([environ["LD_PRELOAD"]] if environ.get("LD_PRELOAD") else [])
    return {"LD_PRELOAD": ":".join(preload), **variables}


def listener_owners(host: str, port: int) -> set[int]:
    """The users (uids) owning the TCP sockets in this network namespace that listen on `port` at `host`
    or at a wildcard address (which also receives `host`'s connections), from /proc/net/tcp and tcp6."""
    wanted = ipaddress.ip_address("127.0.0.1" if host.strip("[]").lower() == "localhost" else host.strip("[]"))
    wanted = getattr(wanted, "ipv4_mapped", None) or wanted
    owners = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address_hex)  # 32-bit words, each printed in this machine's byte order
            if sys.byteorder == "little":
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(raw)
            address = getattr(address, "ipv4_mapped", None) or address
            if address == wanted or address.is_unspecified:
                owners.add(int(fields[7]))
    return owners


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF


def tcp_owner(source: tuple[str, int], destination: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket connected from `source` to `destination` (IPv4 addresses) in this
    network namespace, as the kernel's socket diagnostics report it (the shim's own question); None
    when there is no such socket or the kernel does not answer."""
    def packed(address: str) -> bytes:
        return socket.inet_aton(address) + bytes(12)

    request = (struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
               + struct.pack("!HH", source[1], destination[1]) + packed(source[0]) + packed(destination[0])
               + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))
    message = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + request
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)
            diag.sendto(message, (0, 0))
            answer = diag.recv(8192)
    except OSError:
        return None
    if len(answer) < 16 + 72:
        return None
    _, kind = struct.unpack_from("=IH", answer)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None
    # inet_diag_msg: family, state, timer, retrans (4 bytes), the socket id (48), expires, rqueue, wqueue, uid
    return struct.unpack_from("=I", answer, 16 + 4 + 48 + 12)[0]


_owner_lookup_checked: list[bool] = []


def check_owner_lookup() -> None:
    """Raises ShimBuildError when this system does not tell who owns the socket at the other end of a
    loopback connection (what the shim asks the kernel before a worker reads from a connection); checked
    once per process, on a connection of its own."""
    if _owner_lookup_checked:
        return
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        accepted.close()
        owner = tcp_owner(client.getsockname(), listener.getsockname())
    if owner != os.geteuid():
        raise ShimBuildError("this system does not report who owns a loopback connection (the kernel's "
                             "socket diagnostics, NETLINK_SOCK_DIAG, are unavailable), so a worker cannot "
                             "refuse other users")
    _owner_lookup_checked.append(True)
