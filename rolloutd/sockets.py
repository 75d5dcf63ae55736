"""ZeroMQ socket set-up that the broker, the workers and the clients share."""
from __future__ import annotations

import uuid

import zmq

from . import config


def new(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """A socket with the options every rolloutd socket has: no linger at close (each part flushes what
    must leave itself), and high-water marks so that a peer that stops reading cannot grow its queue
    without bound."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, config.HWM)
    s.setsockopt(zmq.RCVHWM, config.HWM)
    return s


# What the monitors report: a dropped connection (its value the connection's fd), and a handshake the
# other side refused for its key (CURVE), so that a refused key is not mistaken for a broker not there.
EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def monitor(sock: zmq.Socket) -> zmq.Socket:
    """A socket that receives sock's EVENTS. It has its own inproc address: pyzmq's default is made from
    the socket's file descriptor, which a later socket of the same context may reuse, and would then
    receive this one's events."""
    return sock.get_monitor_socket(EVENTS, addr=f"inproc://rolloutd-monitor-{uuid.uuid4().hex}")
