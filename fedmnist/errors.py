"""The errors a command turns into an exit code, in one TensorFlow-free module.

`train.main` and the other commands catch these by type and exit with the error's `exit_code` after its
one-line message: 2 for a usage or config error (`UsageError`, `ConfigError`, `PlanTooLargeError`, `RunError`),
130 for `Interrupted`, 1 for every other `FedmnistError`.
"""

from __future__ import annotations


class FedmnistError(Exception):
    """A failure the package reports as one line; `exit_code` is what the command returns."""

    exit_code = 1


class UsageError(FedmnistError):
    """Bad command-line usage."""

    exit_code = 2


class ConfigError(FedmnistError, ValueError):
    """A configuration mistake; the message names the key and the fix."""

    exit_code = 2


class PlanTooLargeError(FedmnistError, ValueError):
    """The configured sizes would need more memory than the machine has; the message names what to lower."""

    exit_code = 2


class DataUnavailableError(FedmnistError, RuntimeError):
    """The requested dataset cannot be loaded here."""


class CheckpointError(FedmnistError, RuntimeError):
    """No usable checkpoint, or one that cannot be written."""


class DamagedFileError(FedmnistError, RuntimeError):
    """A file of a run directory is damaged beyond what a resume can repair by itself."""


class TrainingDivergedError(FedmnistError, RuntimeError):
    """The training loss, the global weights or the evaluation loss became NaN or infinite, or no client
    contributed a finite update. `saved_round` is the last good round whose state is checkpointed."""

    saved_round = 0


class WorkerFailedError(FedmnistError, RuntimeError):
    """A worker was lost and could not be replaced: retries used up, or a remote worker. `saved_round`
    is the last round whose state is checkpointed (0: none)."""

    saved_round = 0


class RunError(FedmnistError, ValueError):
    """A directory that is not a readable fedmnist run (`fedmnist report`, the paper's table)."""

    exit_code = 2


class TlsError(ConfigError):
    """The TLS files are missing, unreadable, unprotected, or do not fit together (one line; a command
    exits 2, as for any other setting it cannot use)."""


class RuntimeStartError(FedmnistError, RuntimeError):
    """A TFF worker could not be started or reached, or listens where it should not."""


class ShimBuildError(FedmnistError, RuntimeError):
    """The bind shim that keeps a worker to its address and user could not be built (no C compiler, a compile
    error, an unusable cache directory) or cannot work on this system."""


class Interrupted(FedmnistError):
    """A stop was requested (SIGINT/SIGTERM); the state after `round_num` is saved."""

    exit_code = 130

    def __init__(self, round_num: int):
        super().__init__(f"interrupted after round {round_num}")
        self.round_num = round_num
