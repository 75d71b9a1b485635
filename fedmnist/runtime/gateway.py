"""The TLS front of `python -m fedmnist.worker --tls`: TFF's executor service with mutual TLS.

TFF's `worker_binary` speaks only plain gRPC. So the worker command runs it on a Unix socket in a
directory only its user can enter (no TCP port at all), and this gateway, in the command's own
process, serves the executor service on the network with `grpc.ssl_server_credentials(...,
require_client_auth=True)`: a client without a certificate signed by the worker's CA fails the TLS
handshake, before any request is read. Every call it accepts is forwarded unchanged (the request's
bytes, not parsed) to the worker, with the caller's deadline; a call the caller cancels is cancelled
at the worker too. Needs no TensorFlow.
"""

from __future__ import annotations

import grpc
from grpc import aio

SERVICE = "/tensorflow_federated.v0.ExecutorGroup/"


class _Forward(grpc.GenericRpcHandler):
    """Every method of TFF's executor service (all unary), forwarded as bytes to the worker's channel."""

    def __init__(self, backend: aio.Channel):
        self._backend = backend
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(SERVICE):
            return None
        if method not in self._handlers:
            call = self._backend.unary_unary(method)  # no (de)serializers: bytes in, bytes out

            async def forward(request: bytes, context: aio.ServicerContext) -> bytes:
                try:
                    return await call(request, timeout=context.time_remaining())
                except aio.AioRpcError as error:
                    await context.abort(error.code(), error.details() or "")

            self._handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return self._handlers[method]


class Gateway:
    """Serves `listen` (host:port) with `credentials` and forwards to the worker at `target` (`unix:PATH`).
    `start()` and `stop()` run in an asyncio event loop."""

    def __init__(self, listen: str, target: str, credentials: grpc.ServerCredentials, options: list):
        self.listen, self.target, self.credentials, self.options = listen, target, credentials, options
        self._server: aio.Server | None = None
        self._backend: aio.Channel | None = None

    async def start(self) -> None:
        """Raises OSError when the address cannot be bound (in use, or not an address of this machine)."""
        self._backend = aio.insecure_channel(self.target, self.options)
        self._server = aio.server(options=self.options)
        self._server.add_generic_rpc_handlers([_Forward(self._backend)])
        try:
            self._server.add_secure_port(self.listen, self.credentials)
        except RuntimeError as error:  # grpc: "Failed to bind to address ..."
            await self.stop()
            raise OSError(str(error)) from None
        await self._server.start()

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._backend is not None:
            await self._backend.close()
            self._backend = None
