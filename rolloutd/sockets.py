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


# pyzmq's flags and options are enums: `zmq.SNDMORE | flags` in send_multipart, getsockopt(zmq.RCVMORE) in
# recv_multipart and `& zmq.POLLIN` run enum code in Python on every frame, which costs about as much as the
# sends and receives themselves (perf/results/README.md, "Round trip"). Every message of the broker, the
# workers and the clients goes through these instead, with plain ints.
_SNDMORE, _EVENTS, _POLLIN = int(zmq.SNDMORE), int(zmq.EVENTS), int(zmq.POLLIN)
_SENDABLE = (bytes, memoryview, zmq.Frame)


def send(sock: zmq.Socket, frames: list, flags: int = 0, copy: bool = True) -> None:
    """sock.send_multipart(frames, flags, copy=copy), less its per-frame enum arithmetic. Frames of other types
    (any buffer) go to send_multipart itself, which refuses a frame that is no buffer before any frame
    leaves: a message half sent would take the next one as its rest."""
    if not all(isinstance(f, _SENDABLE) for f in frames):
        sock.send_multipart(frames, flags, copy=copy)
        return
    flags = int(flags)
    for f in frames[:-1]:
        sock.send(f, flags | _SNDMORE, copy=copy)
    sock.send(frames[-1], flags, copy=copy)


def recv(sock: zmq.Socket, flags: int = 0, copy: bool = True) -> list:
    """sock.recv_multipart(flags, copy=copy), less a socket option call per frame: each frame says itself
    whether more follow."""
    f = sock.recv(flags, copy=False)
    frames = [f.bytes if copy else f]
    while f.more:
        f = sock.recv(flags, copy=False)
        frames.append(f.bytes if copy else f)
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on sock (ZMQ_EVENTS has POLLIN)."""
    return bool(sock.get(_EVENTS) & _POLLIN)
