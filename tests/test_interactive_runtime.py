"""runtime.start_local_runtime: the TFF worker for notebooks, where no `with` block spans cells."""

from __future__ import annotations

import tensorflow_federated as tff

from fedmnist import runtime


def test_interactive_runtime_serves_until_closed_and_restores_the_context():
    context_stack = tff.framework.get_context_stack()
    previous = context_stack.current
    others = set(runtime.worker_children())  # workers of other tests in this session
    session = runtime.start_local_runtime()
    try:
        [worker] = set(runtime.worker_children()) - others
        assert context_stack.current is not previous
        assert tff.federated_computation(lambda: "Hello, World!")() == b"Hello, World!"
        assert set(runtime.worker_children()) - others == {worker}  # the same worker serves later calls
    finally:
        session.close()
    assert set(runtime.worker_children()) == others
    assert context_stack.current is previous
    session.close()  # closing twice is harmless (it also runs at interpreter exit)
