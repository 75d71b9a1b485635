"""Runs one TFF worker for other machines' (or processes') training runs: `python -m fedmnist.worker --port P`.

List the workers in a training config (`workers: [host1:8000, host2:8000]`) and each round's clients
are split across them. The worker is TFF's own `worker_binary`, run in the foreground until Ctrl-C or
SIGTERM. It speaks unauthenticated, unencrypted gRPC and has no option to choose its listening
address: it accepts connections on every interface. Run it only on a trusted network, or where a
firewall keeps the port closed to everyone but the training host.
"""

from __future__ import annotations

import argparse
import signal
import sys

SECURITY_NOTE = ("note: the TFF worker listens on all network interfaces with unauthenticated gRPC; "
                 "run it only on a trusted network or behind a firewall")


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fedmnist.worker",
                     description="Serve TFF computations for fedmnist runs that list this worker in `workers:`.")
    parser.add_argument("--port", type=int, required=True, help="TCP port to serve on (1-65535)")
    parser.add_argument("--max-concurrent-computation-calls", type=int, default=-1,
                        help="limit on parallel client computations (default: no limit)")
    parser.add_argument("--log", help="append the worker's own output to this file (default: discard)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not 0 < args.port < 65536:
            raise UsageError(f"--port {args.port} is not between 1 and 65535")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from fedmnist import runtime  # TensorFlow Federated starts here, after the arguments are good.

    print(SECURITY_NOTE, file=sys.stderr)
    try:
        worker = runtime.LocalWorker(port=args.port, log_path=args.log,
                                     max_concurrent_computation_calls=args.max_concurrent_computation_calls)
        runtime.connect(worker.address, worker.process)
    except runtime.RuntimeStartError as error:
        print(f"error: {error} (is port {args.port} already in use?)", file=sys.stderr)
        return 1
    print(f"TFF worker serving on port {args.port}; Ctrl-C to stop", flush=True)
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
