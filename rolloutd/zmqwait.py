"""Waiting for ZeroMQ sockets on the kernel's clock.

zmq_poll keeps its own time from the CPU's timestamp counter; on the 2-core VMs this project runs on, a
broker blocked in zmq_poll(timeout=1 s) while vLLM decoded next to it stayed blocked for 5-6 s, until a
peer's disconnect woke it. select() on the sockets' file descriptors, with the timeout kept by the
kernel, does not drift. A ZeroMQ FD only signals that the socket's state may have changed (it is
edge-triggered), so after every wake-up the truth is read from ZMQ_EVENTS.
"""
from __future__ import annotations

import select
import time

import zmq


def readable(socks: list[zmq.Socket], timeout_s: float) -> list[zmq.Socket]:
    """The sockets with a message waiting, after at most timeout_s (empty list at the deadline)."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    fds = [s.getsockopt(zmq.FD) for s in socks]
    while True:
        ready = [s for s in socks if s.getsockopt(zmq.EVENTS) & zmq.POLLIN]
        left = deadline - time.monotonic()
        if ready or left <= 0:
            return ready
        select.select(fds, [], [], left)
