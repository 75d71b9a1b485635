"""Runs one TFF worker for other machines' (or processes') training runs: `python -m fedmnist.worker --port P`.

List the workers in a training config (`workers: [host1:8000, host2:8000]`) and each round's clients
are split across them. The worker is TFF's own `worker_binary`, run in the foreground until Ctrl-C or
SIGTERM. It speaks unauthenticated, unencrypted gRPC, so it listens on loopback (127.0.0.1) unless
`--host` names another address: a private interface's address on a trusted network, or `0.0.0.0` for
every interface (with a warning). For a worker on another machine without a trusted network, keep it
on loopback and reach it through an SSH tunnel (`ssh -N -L 8000:127.0.0.1:8000 workerhost`).

`worker_binary` itself can only listen everywhere; `fedmnist.runtime.bind` keeps it to one address with a
shim built by the C compiler on first use. Without a compiler the worker refuses to start (exit 1)
unless `--host 0.0.0.0` is given.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys

from fedmnist.runtime import bind
from fedmnist.cli import ArgumentParser, UsageError

DEFAULT_HOST = "127.0.0.1"
SECURITY_NOTE = ("note: the TFF worker listens on all network interfaces with unauthenticated gRPC; "
                 "use this only on a trusted network or behind a firewall")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedmnist.worker",
                     description="Serve TFF computations for fedmnist runs that list this worker in `workers:`.")
    parser.add_argument("--port", type=int, required=True, help="TCP port to serve on (1-65535)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="IP address to listen on (default: %(default)s, this machine only; "
                             "0.0.0.0 for every interface, on trusted networks only)")
    parser.add_argument("--max-concurrent-computation-calls", type=int, default=-1,
                        help="limit on parallel client computations (default: no limit)")
    parser.add_argument("--log", help="append the worker's own output to this file (default: discard)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not 0 < args.port < 65536:
            raise UsageError(f"--port {args.port} is not between 1 and 65535")
        try:
            args.host = str(ipaddress.ip_address(args.host))
        except ValueError:
            raise UsageError(f"--host {args.host!r} is not an IP address (e.g. 127.0.0.1 or 10.0.0.5)") from None
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if bind.is_all_interfaces(args.host):
        print(SECURITY_NOTE, file=sys.stderr)
    else:
        try:
            bind.shim_path()  # before TensorFlow loads: fail fast, with one line
        except bind.ShimBuildError as error:
            print(f"error: cannot keep the worker on {args.host}: {error}; install a C compiler (e.g. gcc), "
                  "or pass --host 0.0.0.0 on a trusted network", file=sys.stderr)
            return 1

    from fedmnist.runtime.workers import LocalWorker, RuntimeStartError  # TensorFlow starts here

    try:
        worker = LocalWorker(port=args.port, log_path=args.log, host=args.host,
                                     max_concurrent_computation_calls=args.max_concurrent_computation_calls)
        worker.connect()
    except RuntimeStartError as error:
        hint = "" if bind.is_all_interfaces(args.host) else f", or {args.host} not an address of this machine"
        print(f"error: {error} (is port {args.port} already in use{hint}?)", file=sys.stderr)
        return 1
    print(f"TFF worker serving on {args.host} port {args.port}; Ctrl-C to stop", flush=True)
    stopping = []

    def on_sigterm(*_) -> None:
        stopping.append(True)
        worker.process.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = worker.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        worker.stop()
    if stopping:
        return 0
    print(f"error: the TFF worker exited with code {code}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
