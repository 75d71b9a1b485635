"""The TFF runtime this package owns: `worker_binary` processes it starts, watches and stops.

- `install()`: TFF's default context, backed by a worker started on first use (notebooks, library use).
- `local_runtime(...)`: a context manager giving a run its own workers (or remote ones) for its duration.
- `start_local_runtime()`: the same for interactive sessions; `.close()` it when done.
- `LocalWorker`, `loopback_worker`: one worker process; `python -m fedmnist.worker` serves one for others.
- `TlsFiles`: the CA, certificate and key a run uses for workers started with `--tls` (`fedmnist.runtime.tls`).

The workers a run starts serve its own user only, and remote workers can require mutual TLS:
docs/security.md.

Nothing runs at import, and TensorFlow loads only when one of these names is first used, so the
command-line tools check their arguments first.
"""

import importlib

_EXPORTS = {
    "install": "contexts", "local_runtime": "contexts", "start_local_runtime": "contexts",
    "Runtime": "contexts", "active_runtime": "contexts", "WorkerLostError": "watch",
    "execution_context": "contexts", "multi_worker_context": "contexts", "executor_factory": "contexts",
    "LocalWorker": "workers", "RuntimeStartError": "workers", "loopback_worker": "workers",
    "connect": "workers", "LOOPBACK": "workers", "private_directory": "workers",
    "TlsFiles": "tls", "TlsError": "tls",
    "dying_with_parent": "processes", "worker_children": "processes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fedmnist.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fedmnist.runtime' has no attribute {name!r}")
