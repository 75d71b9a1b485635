"""gRPC channels to TFF workers, and the options every one uses, without TensorFlow: the `fedmnist worker`
command imports only this side of the runtime, so that it starts in a second, not after TensorFlow's import."""

from __future__ import annotations

import grpc

GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
RECONNECT_BACKOFF_MS = (50, 2000)  # the first and the longest wait between connection attempts
GRPC_OPTIONS = [
    ("grpc.max_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    # gRPC waits 1 s after a failed connection before it tries again, doubling up to 2 minutes: a worker
    # that is still starting (it listens a few tens of milliseconds after its process starts) would cost
    # every run a second, and a remote worker back after a network cut minutes.
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
]
# A probe opens a connection of its own: sharing one with another channel to the same address, it could
# see a connection that is still "ready" while the worker behind it no longer answers.
PROBE_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
PROBE_SECONDS = 2.0  # a probe's longest wait for the connection and the answer


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None,
                 options: list[tuple[str, object]] = GRPC_OPTIONS) -> grpc.Channel:
    """A gRPC channel to a worker: TLS with `credentials` (`python -m fedmnist.worker --tls`), else plain."""
    if credentials is None:
        return grpc.insecure_channel(address, options)
    return grpc.secure_channel(address, credentials, options)


PROBE_METHOD = "/fedmnist.Probe/Answer"  # served by no worker: its UNIMPLEMENTED is the worker answering


def answers_on(channel: grpc.Channel, deadline: float) -> bool:
    """Whether the server behind `channel` answers a call within `deadline` seconds. The call, to a method
    no worker serves, waits for the connection itself. gRPC's own readiness (`subscribe`,
    `channel_ready_future`) runs a thread that polls the channel and raises "Channel closed!" when the
    channel closes between two polls: a traceback in the output of a run that ended normally."""
    try:
        channel.unary_unary(PROBE_METHOD)(b"", timeout=deadline, wait_for_ready=True)
        return True  # no worker serves the method: not reached
    except grpc.RpcError as error:
        return error.code() is grpc.StatusCode.UNIMPLEMENTED  # the server's answer
    except ValueError:  # the channel is closed
        return False


class ChannelReadiness:
    """Whether a channel's server has answered (`answers_on`), asked anew until it has: the `is_ready` of
    TFF's `RemoteExecutorGrpcStub`, without gRPC's polling thread and without TFF."""

    def __init__(self, channel: grpc.Channel, poll: float = 0.2):
        self.channel, self.poll, self._answered = channel, poll, False

    @property
    def is_ready(self) -> bool:
        self._answered = self._answered or answers_on(self.channel, self.poll)
        return self._answered
