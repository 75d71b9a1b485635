"""Runs one TFF worker for other processes' (or machines') training runs: `python -m fedmnist.worker --port P`.

List the workers in a training config (`workers: [host1:8000, host2:8000]`) and each round's clients
are split across them. The worker is TFF's own `worker_binary`, run in the foreground until Ctrl-C or
SIGTERM. A worker runs whatever computation it is sent, as the user who started it, so who may send
one is chosen explicitly (docs/security.md):

- by default it listens on loopback (127.0.0.1) and reads only from connections made by this user's
  processes: training runs of this user on this machine, or an SSH tunnel logged in as this user;
- `--tls --ca CA --cert CERT --key KEY` serves any `--host` with mutual TLS: only a client holding a
  certificate that CA signed gets past the handshake (`fedmnist.runtime.gateway`; the worker itself
  then listens on a Unix socket only this user can reach);
- `--insecure` serves plain, unauthenticated gRPC to everyone who can reach `--host`, after a warning:
  for a network on which every machine and user is trusted.

`worker_binary` itself can only listen everywhere and serve anyone; `fedmnist.runtime.bind` changes
that with a shim built by the C compiler on first use. Without a compiler only `--insecure --host
0.0.0.0` starts. The command never imports TensorFlow (it serves the worker, it does not call it), so
it is serving about a second after it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedmnist.cli import ArgumentParser
from fedmnist.errors import RuntimeStartError, ShimBuildError, TlsError, UsageError
from fedmnist.runtime import bind, tls

DEFAULT_HOST = "127.0.0.1"
INSECURE_NOTE = ("warning: --insecure: the TFF worker serves unauthenticated, unencrypted gRPC, and anyone who "
                 "can reach {where} can run code in it as this user; use it only on a network where every "
                 "machine and user is trusted, else --tls (docs/security.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedmnist.worker",
                            description="Serve TFF computations for fedmnist runs that list this worker in `workers:`.")
    parser.add_argument("--port", type=int, required=True, help="TCP port to serve on (1-65535)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="IP address to listen on (default: %(default)s: this machine, this user's processes "
                             "only); any other address needs --tls or --insecure")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS: serve only clients with a certificate signed by --ca (docs/security.md)")
    parser.add_argument("--ca", type=Path, help="with --tls: the CA certificate that signs the clients' certificates")
    parser.add_argument("--cert", type=Path, help="with --tls: this worker's certificate (naming its address)")
    parser.add_argument("--key", type=Path, help="with --tls: this worker's private key (mode 600)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve unauthenticated gRPC to anyone who can reach --host (trusted networks only)")
    parser.add_argument("--worker-timeout", type=float, default=20.0, metavar="SECONDS",
                        help="with --tls: stop serving (exit 1) when the worker behind the TLS front has not "
                             "answered for this long, so that runs see a lost worker (default: %(default)g)")
    parser.add_argument("--max-concurrent-computation-calls", type=int, default=-1,
                        help="limit on parallel client computations (default: no limit)")
    parser.add_argument("--log", help="append the worker's own output to this file (default: discard)")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments; raises UsageError."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not between 1 and 65535")
    if not args.worker_timeout > 0:
        raise UsageError(f"--worker-timeout {args.worker_timeout:g} is not a positive number of seconds")
    try:
        args.host = str(ipaddress.ip_address(args.host))
    except ValueError:
        raise UsageError(f"--host {args.host!r} is not an IP address (e.g. 127.0.0.1 or 10.0.0.5)") from None
    files = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    if args.tls and args.insecure:
        raise UsageError("--tls and --insecure exclude each other")
    if args.tls and not all(files.values()):
        missing = ", ".join(flag for flag, value in files.items() if not value)
        raise UsageError(f"--tls needs --ca, --cert and --key ({missing} missing; docs/security.md makes them)")
    if not args.tls and any(files.values()):
        raise UsageError(f"{next(flag for flag, value in files.items() if value)} goes with --tls")
    if args.log:
        try:
            open(args.log, "ab").close()  # now, not once the worker runs: one line, not a traceback
        except OSError as error:
            raise UsageError(f"--log {args.log}: cannot write it ({error.strerror})") from None
    if not (args.tls or args.insecure or bind.is_loopback(args.host)):
        raise UsageError(f"--host {args.host}: a worker off loopback serves other machines, so it needs --tls "
                         "(mutual TLS, docs/security.md), or --insecure on a network where every machine and "
                         "user is trusted")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        credentials = tls.TlsFiles(args.ca, args.cert, args.key).load() if args.tls else None
    except (UsageError, TlsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    needs_shim = args.tls or not (args.insecure and bind.is_all_interfaces(args.host))
    if needs_shim:
        try:
            bind.shim_path()  # before the worker starts: fail fast, with one line
            if not (args.tls or args.insecure):
                bind.check_owner_lookup()
        except ShimBuildError as error:
            print(f"error: cannot keep the worker to {'its user' if not args.insecure else args.host}: {error}; "
                  "install a C compiler (e.g. gcc), or pass --insecure --host 0.0.0.0 on a trusted network",
                  file=sys.stderr)
            return 1
    if args.insecure:
        where = f"port {args.port} on any interface" if bind.is_all_interfaces(args.host) else f"{args.host}:{args.port}"
        print(INSECURE_NOTE.format(where=where), file=sys.stderr, flush=True)

    from fedmnist.runtime.workers import LocalWorker, private_directory  # no TensorFlow

    socket_dir = None
    try:
        try:
            if args.tls:
                socket_dir = private_directory()
                worker = LocalWorker(log_path=args.log, socket_dir=socket_dir,
                                     max_concurrent_computation_calls=args.max_concurrent_computation_calls)
            else:
                worker = LocalWorker(port=args.port, log_path=args.log, host=args.host, only_user=not args.insecure,
                                     max_concurrent_computation_calls=args.max_concurrent_computation_calls)
            worker.wait_ready()
        except RuntimeStartError as error:
            hint = ("" if args.tls else f" (is port {args.port} already in use" +
                    ("" if bind.is_all_interfaces(args.host) else f", or {args.host} not an address of this machine") + "?)")
            print(f"error: {error}{hint}", file=sys.stderr)
            return 1
        if args.tls:
            return asyncio.run(_serve_tls(worker, args, credentials))
        return _serve(worker, args)
    finally:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)


def _serving_line(args: argparse.Namespace) -> str:
    who = (" with mutual TLS (clients with a certificate signed by the CA)" if args.tls
           else " to anyone who can reach it (--insecure)" if args.insecure else " for this user's processes only")
    return f"TFF worker serving on {args.host} port {args.port}{who}; Ctrl-C to stop"


def _serve(worker, args: argparse.Namespace) -> int:
    """Until SIGTERM or Ctrl-C (exit 0) or the worker's own end (exit 1); the worker is stopped either way."""
    print(_serving_line(args), flush=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping and worker.process.poll() is None:
            try:
                worker.process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        return 0
    finally:
        worker.stop()  # SIGINT, then SIGKILL after 5 s: a worker whose shutdown waits on a lost client ends too
    if stopping:
        return 0
    print(f"error: the TFF worker exited with code {worker.process.returncode}", file=sys.stderr)
    return 1


async def _serve_tls(worker, args: argparse.Namespace, credentials: tls.Credentials) -> int:
    """The gateway on --host:--port in front of the worker's Unix socket, until SIGTERM or Ctrl-C (exit 0),
    or until the worker exits or stops answering (exit 1)."""
    from grpc import aio

    from fedmnist.runtime.gateway import Gateway
    from fedmnist.runtime.channels import GRPC_OPTIONS, PROBE_OPTIONS, PROBE_SECONDS

    listen = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    gateway = Gateway(listen, worker.address, credentials.server(), GRPC_OPTIONS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    last_answer = time.monotonic()
    try:
        try:
            await gateway.start()
        except OSError:
            print(f"error: cannot serve on {args.host} port {args.port} (is the port already in use, or "
                  f"{args.host} not an address of this machine?)", file=sys.stderr)
            return 1
        print(_serving_line(args), flush=True)
        while not stop.is_set():
            if worker.process.poll() is not None:
                print(f"error: the TFF worker exited with code {worker.process.returncode}", file=sys.stderr)
                return 1
            probe = aio.insecure_channel(worker.address, PROBE_OPTIONS)
            try:
                await asyncio.wait_for(probe.channel_ready(), PROBE_SECONDS)
                last_answer = time.monotonic()
            except asyncio.TimeoutError:
                if time.monotonic() - last_answer > args.worker_timeout:
                    print(f"error: the TFF worker did not answer for {args.worker_timeout:g} s (--worker-timeout); "
                          "stopped serving", file=sys.stderr)
                    return 1
            finally:
                await probe.close()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        return 0
    finally:
        await gateway.stop()
        worker.stop(force=time.monotonic() - last_answer > PROBE_SECONDS + 1.0)  # a silent one: SIGKILL at once


if __name__ == "__main__":
    sys.exit(main())
