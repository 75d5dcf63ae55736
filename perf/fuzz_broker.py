"""Fuzz and flood the broker (issue 7): whatever arrives on either socket, the broker process stays up,
answers a proper client within 2 s, and keeps its memory within a stated bound.

    python perf/fuzz_broker.py --messages 100000     # fuzz both sockets -> perf/results/fuzz-cpu.json + .png
    python perf/fuzz_broker.py --flood               # 70,000 generates from 10,000 clients, no worker
                                                     #   -> perf/results/flood-cpu.json + .png

tests/test_fuzz.py runs the same code with CI-sized counts (it imports this file).

Fuzz: a seeded generator (Fuzzer) sends valid messages and mutations of them (bit flips, truncation, dropped /
duplicated / extra frames, other protocol versions, unknown header keys of every msgpack type, wrong types,
out-of-range values, deep nesting, too many or too large frames, commands for the other side) from 6 client
identities on the front and, on the back, from 4 identities that registered with a valid READY and 2 that
never did. The fake workers take what the broker assigns them and answer it (or a mutation of an answer),
so the request table, placement, pending queue and control replies are exercised, not only the decoder.
Every CHECK_EVERY messages: the broker process is alive, rolloutd.Client answers ping("broker") and
status() within ANSWER_S, RSS is sampled, and a barrier (a ping on every fuzz client socket, FIFO behind
what it sent) proves the broker read everything so far: the fuzz cannot run ahead of a stuck broker.
A failed check is a crash (dead: its traceback is read from its log) or a broker alive and not answering;
either way the messages since the last good check are replayed against fresh brokers and cut down (ddmin)
to the few that fail it the same way, and the run goes on with a new broker (the CI test stops at the
first). The broker's own bugs that its guard survives are counted in its status()["faults"]["internal"]
and collected from its log: findings too.

Flood (FloodPlan): 10,000 DEALER connections, held by child processes (one process cannot hold 10,000 zmq
sockets under a 20,000 file limit: each takes a TCP and a mailbox descriptor), send 70,000 token-id
generates, 300 of them 1M-token (4 MiB) prompts, to a broker with no worker and small budgets
(--max-pending, --max-pending-bytes, --max-client-bytes). Every request must be answered: busy at once, or
held; an abort-all then ends each held one with an aborted result, which tells exactly what was held
(count, bytes, bytes per client) to check against the budgets. The broker's RSS must stay under its
baseline with the connections made + the byte budget + flood_slack().
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import dataclasses
from dataclasses import dataclass

import msgpack
import psutil
import zmq

from rolloutd import protocol as p
from rolloutd.client import Client
from rolloutd.errors import RolloutdError

PERF = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PERF)
# The broker under test is the rolloutd this process imports (PYTHONPATH can point both at another tree).
SRC = os.path.dirname(os.path.dirname(os.path.abspath(p.__file__)))
if PERF not in sys.path:  # perf/common.py, when this file is imported (tests/test_fuzz.py) rather than run
    sys.path.insert(0, PERF)
from common import maybe_plot, percentiles, save  # noqa: E402
MiB = 1 << 20

ANSWER_S = 2.0  # a proper client's ping and status must be answered within this, all along
CHECK_EVERY = 250  # fuzz messages between checks
DRAIN_EVERY = 50  # fuzz messages between reads of what the broker sent the fake peers
BARRIER_S = 10.0  # a barrier waits this long for the broker to catch up before it calls it stuck
# A broker that died may take this long to exit: it closes its sockets with a 10 s linger.
_EXIT_WAIT_S = 12.0
# The fuzz broker's RSS may grow by this over its start: the largest message of the fuzz that its sockets
# take (two 64 MiB frames on the back; the front refuses frames over 4 MiB), one more such arriving while
# it is read, and 128 MiB for what the pending queue holds (a few 4 MiB prompts) and the allocator keeps.
FUZZ_RSS_GROWTH = 384 * MiB

CLIENTS = [b"fz-c%d" % i for i in range(6)]
WORKERS = [b"fz-w%d" % i for i in range(4)]  # send a valid READY first
STRANGERS = [b"fz-u%d" % i for i in range(2)]  # never send a valid READY

C = p.Cmd
WORKER_CMDS = {C.READY: 12, C.HEARTBEAT: 12, C.DISCONNECT: 3, C.TOKENS: 10, C.RESULT: 25, C.RESULTS: 10,
               C.REPLY: 10, C.ERROR: 8}
CLIENT_CMDS = {C.GENERATE: 40, C.ABORT: 12, C.ABORT_ALL: 2, C.STATUS: 8, C.PING: 12, C.PAUSE: 4, C.RESUME: 4,
               C.SLEEP: 3, C.WAKE: 3, C.LOAD_WEIGHTS: 4}
CONTROL_CMDS = (C.ABORT, C.ABORT_ALL, C.PAUSE, C.RESUME, C.SLEEP, C.WAKE, C.LOAD_WEIGHTS, C.PING)

# How often each kind of message is sent (relative weights).
KINDS = {
    "valid": 16, "wrong_side": 8, "random_bytes": 5, "bitflip": 8, "truncate": 5, "drop_frame": 4,
    "dup_frame": 4, "extra_frame": 4, "version": 5, "unknown_keys": 6, "mixed_keys": 2, "wrong_type": 8,
    "out_of_range": 12, "missing_field": 3, "not_a_map": 2, "bad_utf8": 2, "deep": 2, "many_frames": 0.5,
    "large_frame": 0.05,
}


# ------------------------------------------------------------------------------------------ msgpack by hand

class Raw(bytes):
    """msgpack bytes spliced into a packed value as they are: deep nesting, bad UTF-8, any ext code."""


class Pairs(list):
    """A map as (key, value) pairs: keys of any msgpack type (even arrays and maps), repeated keys."""


class _Special(Exception):
    pass


def _special(v):
    raise _Special


def pack(v) -> bytes:
    """msgpack.packb that also takes Raw and Pairs (msgpack-python cannot write either)."""
    try:  # fast when there are none inside (strict types: Raw and Pairs are not taken for bytes and list)
        return msgpack.packb(v, use_bin_type=True, strict_types=True, default=_special)
    except _Special:
        pass
    if isinstance(v, Raw):
        return bytes(v)
    if isinstance(v, dict):
        v = Pairs(v.items())
    if isinstance(v, Pairs):
        return _head(len(v), 0x80, 0xDE, 0xDF) + b"".join(pack(k) + pack(x) for k, x in v)
    if isinstance(v, (list, tuple)):
        return _head(len(v), 0x90, 0xDC, 0xDD) + b"".join(pack(x) for x in v)
    return msgpack.packb(v, use_bin_type=True)


def _head(n: int, fix: int, h16: int, h32: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    return bytes([h16]) + struct.pack(">H", n) if n < 1 << 16 else bytes([h32]) + struct.pack(">I", n)


def ext(code: int, data: bytes) -> Raw:
    """An ext value of any code, -1 (timestamp) and the reserved negatives included."""
    n = len(data)
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    head = bytes([fixed[n]]) if n in fixed else bytes([0xC7, n]) if n < 256 else b"\xc8" + struct.pack(">H", n)
    return Raw(head + struct.pack("b", code) + data)


def nested(depth: int) -> Raw:
    """An array nested `depth` deep: msgpack-python unpacks up to about 1024 levels and packs fewer."""
    return Raw(b"\x91" * depth + b"\x01")


INTS = [0, 1, -1, 127, 128, -33, 255, 65536, 2**31 - 1, -2**31, 2**32, 2**63 - 1, -2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 0.5, -1.5, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
TEXTS = ["", "a", "rid", "\x00", "é漢🙂", "x" * 300, "cpu", "worker", "broker"]
VALUE_KINDS = ["nil", "bool", "int", "float", "str", "bytes", "array", "map", "ext"]


def value(r: random.Random, kind: str | None = None, scalar: bool = False):
    """A random value of a msgpack type (kind), containers holding scalars only."""
    kind = kind or r.choice(VALUE_KINDS[:7] if scalar else VALUE_KINDS)
    if kind == "nil":
        return None
    if kind == "bool":
        return r.random() < 0.5
    if kind == "int":
        return r.choice(INTS) if r.random() < 0.7 else r.randint(-10**6, 10**6)
    if kind == "float":
        return r.choice(FLOATS)
    if kind == "str":
        return r.choice(TEXTS) if r.random() < 0.6 else "".join(chr(r.randint(32, 0x2FFF)) for _ in range(r.randint(1, 24)))
    if kind == "bytes":
        return r.randbytes(r.randint(0, 24))
    if kind == "array":
        return [value(r, scalar=True) for _ in range(r.randint(0, 4))]
    if kind == "map":
        return {r.choice(TEXTS): value(r, scalar=True) for _ in range(r.randint(0, 3))}
    return ext(r.randint(-128, 127), r.randbytes(r.choice([0, 1, 2, 3, 4, 8, 12, 16, 40])))


def type_of(v) -> str:
    if v is None:
        return "nil"
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (bytes, "bytes"),
                    (list, "array"), (dict, "map")):
        if isinstance(v, t):
            return name
    return "ext"


# ---------------------------------------------------------------------------------------------- the fuzzer

@dataclass
class Case:
    """One message the fuzz sends: which socket, from which identity, what kind, which command it grew from."""
    side: str  # "front" (client socket) or "back" (worker socket)
    ident: bytes
    kind: str
    cmd: str
    frames: list


_BUFFER: memoryview | None = None


def big_buffer() -> memoryview:
    """Zeros for every large frame, made once: 2 x 64 MiB + 8 (a message over the broker's zmq size limit).
    Frames are slices of it, sent without copies."""
    global _BUFFER
    if _BUFFER is None:
        _BUFFER = memoryview(bytes(2 * p.MAX_FRAME_BYTES + 8))
    return _BUFFER


def token_frame(n: int) -> memoryview | bytes:
    return big_buffer()[:4 * n] if n > 4096 else bytes(4 * n)


class Fuzzer:
    """Seeded message generator. It learns from what the broker sends the fake peers (observe()) which
    requests and commands it assigned to which fake worker, so that answers to them can be sent."""

    def __init__(self, seed: int, kinds: dict | None = None):
        self.r = random.Random(seed)
        kinds = KINDS if kinds is None else kinds
        self.kind_names, self.kind_weights = list(kinds), list(kinds.values())
        self.ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        """Forget the broker's state (a new broker): every fake worker must register again."""
        self.assigned: collections.deque = collections.deque(maxlen=256)  # (worker ident, rid, n)
        self.controls: collections.deque = collections.deque(maxlen=256)  # (worker ident, cid)
        self.own = {c: collections.deque(maxlen=64) for c in CLIENTS}  # rids each client sent
        self.unregistered = set(WORKERS)  # registered identities the broker does not know (yet, or any more)

    # --- what the broker sent the fake peers

    def observe(self, side: str, ident: bytes, msg: p.Message) -> None:
        if side != "back":
            return
        if msg.CMD is C.GENERATE:
            self.assigned.append((ident, msg.rid, msg.n))
        elif msg.CMD in CONTROL_CMDS:
            self.controls.append((ident, msg.cid))
        elif msg.CMD is C.DISCONNECT and ident in WORKERS:
            self.unregistered.add(ident)  # dropped (its own DISCONNECT, a bad READY, expiry): READY again

    # --- valid messages

    def new_id(self, what: str) -> str:
        return f"{what}{next(self.ids)}"

    def ready(self, ident: bytes) -> p.Ready:
        return p.Ready(worker=ident.decode(), model="fuzz", devices=["cpu"], capacity=self.r.randint(1, 8),
                       weight_version=0, transports=["path"], pid=os.getpid(), engine={"vllm": "fuzz"})

    def sampling(self) -> dict:
        r = self.r
        s = {"n": r.randint(1, 4), "max_tokens": r.randint(1, 64)}
        for k, v, prob in (("temperature", 0.7, 0.5), ("top_p", 0.9, 0.2), ("stop", ["\n"], 0.1),
                           ("logprobs", True, 0.1), ("seed", 3, 0.1), ("stop_token_ids", [2], 0.1)):
            if r.random() < prob:
                s[k] = v
        return s

    def _assigned(self, ident: bytes):
        """A request the broker gave this fake worker, if any; else one it gave another, or an unknown one."""
        mine = [a for a in self.assigned if a[0] == ident]
        if mine and self.r.random() < 0.9:
            return self.r.choice(mine)
        if self.assigned and self.r.random() < 0.5:
            return self.r.choice(self.assigned)
        return ident, self.new_id("unknown-"), self.r.randint(1, 3)

    def _result(self, rid: str, n: int, worker: str) -> p.Result:
        samples, frames = [], []
        for i in range(n):
            lp = self.r.random() < 0.3
            k = self.r.randint(0, 16)
            samples.append({"index": i, "text": "x" * k, "finish_reason": self.r.choice(["stop", "length", "abort"]),
                            "logprobs": lp})
            frames.append(bytes(4 * k))
            if lp:
                frames.append(bytes(4 * k))
        return p.Result(rid=rid, worker=worker, weight_version=0, samples=samples, prompt_tokens=3, frames=frames)

    def valid(self, cmd: C, side: str, ident: bytes) -> p.Message:
        r = self.r
        name = ident.decode()
        if cmd is C.READY:
            return self.ready(ident)
        if cmd is C.HEARTBEAT:
            return p.Heartbeat(inflight=r.randint(0, 8), stopping=r.random() < 0.03)
        if cmd is C.DISCONNECT:
            return p.Disconnect(reason="fuzz")
        if cmd is C.GENERATE:
            rid = self.new_id(f"{name}-r")
            if side == "front":
                self.own.setdefault(ident, collections.deque(maxlen=64)).append(rid)
            roll = r.random()
            if roll < 0.15:
                return p.Generate(rid=rid, sampling=self.sampling(), prompt="hello " * r.randint(1, 20))
            if roll < 0.25:
                return p.Generate(rid=rid, sampling=self.sampling(), prompt=[{"role": "user", "content": "hi"}])
            # token ids; now and then the largest prompt the protocol allows (1M tokens, 4 MiB)
            n = p.MAX_PROMPT_TOKENS if r.random() < 0.001 else r.randint(1, 64)
            return p.Generate(rid=rid, sampling=self.sampling(), stream=r.random() < 0.2, frames=[token_frame(n)])
        if cmd is C.TOKENS:
            _, rid, n = self._assigned(ident)
            k = r.randint(1, n)
            return p.Tokens(rid=rid, deltas=[[i, "t"] for i in range(k)], frames=[bytes(4 * r.randint(1, 4))] * k)
        if cmd is C.RESULT:
            _, rid, n = self._assigned(ident)
            return self._result(rid, n, name)
        if cmd is C.RESULTS:
            picks = {self._assigned(ident)[1:] for _ in range(r.randint(2, 5))}
            if len(picks) < 2:
                picks.add((self.new_id("unknown-"), 1))
            return p.Results.join([self._result(rid, n, name) for rid, n in picks])
        if cmd in (C.REPLY, C.ERROR):
            mine = [cid for w, cid in self.controls if w == ident]
            cid = r.choice(mine) if mine and r.random() < 0.9 else self.new_id("cid-")
            if cmd is C.REPLY:
                return p.Reply(cid=cid, ok=r.random() < 0.8, data={"fuzz": 1, "weight_version": r.randint(0, 3)})
            if r.random() < 0.5:
                return p.Error(code="engine", message="fuzz", cid=cid)
            return p.Error(code="engine", message="fuzz", rid=self._assigned(ident)[1])
        cid = self.new_id(f"{name}-c")
        if cmd is C.ABORT:
            own = list(self.own.get(ident, ()))
            rids = r.sample(own, min(len(own), r.randint(0, 3))) + ([self.new_id("unknown-")] if r.random() < 0.3 else [])
            return p.Abort(cid=cid, rids=rids)
        if cmd is C.ABORT_ALL:
            return p.AbortAll(cid=cid)
        if cmd is C.STATUS:
            return p.Status(cid=cid)
        if cmd is C.PING:
            return p.Ping(cid=cid, target=r.choice(["broker", "worker", "fz-w0", "nobody"]))
        if cmd is C.PAUSE:
            return p.Pause(cid=cid, mode=r.choice(["abort", "wait", "keep"]), refuse=r.random() < 0.5)
        if cmd is C.RESUME:
            return p.Resume(cid=cid)
        if cmd is C.SLEEP:
            return p.Sleep(cid=cid, level=r.choice([1, 2]))
        if cmd is C.WAKE:
            return p.Wake(cid=cid, tags=r.choice([[], ["weights"], ["kv_cache"]]))
        if cmd is C.LOAD_WEIGHTS:
            return p.LoadWeights(cid=cid, version=r.randint(0, 9), source="path", spec={"path": "/nonexistent"})
        raise AssertionError(cmd)

    # --- the stream

    def next(self) -> Case:
        r = self.r
        for ident in sorted(self.unregistered):  # a fake worker the broker does not know registers first
            self.unregistered.discard(ident)
            return Case("back", ident, "valid", "READY", p.encode(self.ready(ident)))
        side = r.choice(["front", "back"])
        if side == "front":
            ident = r.choice(CLIENTS)
        else:
            ident = r.choice(WORKERS) if r.random() < 0.7 else r.choice(STRANGERS)
        kind = r.choices(self.kind_names, self.kind_weights)[0]
        native = CLIENT_CMDS if side == "front" else WORKER_CMDS
        other = WORKER_CMDS if side == "front" else CLIENT_CMDS
        cmds = other if kind == "wrong_side" or (kind != "valid" and r.random() < 0.15) else native
        cmd = r.choices(list(cmds), list(cmds.values()))[0]
        if kind == "valid" and cmd is C.READY and ident in STRANGERS:
            cmd = C.HEARTBEAT  # strangers never register on purpose
        frames = p.encode(self.valid(cmd, side, ident))
        if kind not in ("valid", "wrong_side"):
            frames = getattr(self, "_" + kind)(cmd, frames)
        return Case(side, ident, kind, cmd.name, frames)

    # --- mutations: each takes a valid message's frames and returns the frames to send

    def _header(self, frames) -> dict:
        return msgpack.unpackb(frames[1], raw=False)

    def _with(self, frames, header) -> list:
        return [frames[0], pack(header), *frames[2:]]

    def _random_bytes(self, cmd, frames):
        r = self.r
        out = [r.randbytes(r.choice([0, 1, 5, 16, 200])) for _ in range(r.randint(1, 4))]
        if r.random() < 0.4:  # a valid-looking head, so that garbage reaches the header decoder
            out[0] = p.TAG + bytes([r.choice([int(c) for c in C] + [0, 99, 255])])
        return out

    def _bitflip(self, cmd, frames):
        r = self.r
        i = r.choices(range(len(frames)), [2, 6] + [1] * (len(frames) - 2))[0]
        f = bytearray(frames[i])
        if not f:
            return frames
        for _ in range(r.randint(1, 8)):
            f[r.randrange(len(f))] ^= 1 << r.randrange(8)
        return frames[:i] + [bytes(f)] + frames[i + 1:]

    def _truncate(self, cmd, frames):
        i = self.r.randrange(len(frames))
        return frames[:i] + [bytes(frames[i][:self.r.randint(0, max(0, len(frames[i]) - 1))])] + frames[i + 1:]

    def _drop_frame(self, cmd, frames):
        i = self.r.randrange(len(frames))
        return (frames[:i] + frames[i + 1:]) or [b""]

    def _dup_frame(self, cmd, frames):
        i = self.r.randrange(len(frames))
        return frames[:i + 1] + [frames[i]] + frames[i + 1:]

    def _extra_frame(self, cmd, frames):
        r = self.r
        extra = [r.choice([b"", r.randbytes(r.randint(1, 64)), bytes(4 * r.randint(1, 8)), frames[1]])
                 for _ in range(r.randint(1, 3))]
        return frames + extra

    def _version(self, cmd, frames):
        c = bytes(frames[0][4:5])
        head = self.r.choice([b"RLD0" + c, b"RLD2" + c, b"RLD9" + c, b"rld1" + c, b"RLD\x001", b"RLD1",
                              b"RLD1" + c + b"\x00", b"", b"RLD", p.TAG + bytes([self.r.choice([0, 4, 9, 50, 99, 255])])])
        return [head, *frames[1:]]

    def _unknown_keys(self, cmd, frames):
        """Valid fields plus 1-3 keys of one random msgpack type (str, bytes, int, float, nil, bool, array,
        map, ext): msgpack-python refuses keys other than str and bytes."""
        r = self.r
        kind = r.choice(VALUE_KINDS)
        extra = [(value(r, kind), value(r)) for _ in range(r.randint(1, 3))]
        return self._with(frames, Pairs(list(self._header(frames).items()) + extra))

    def _mixed_keys(self, cmd, frames):
        """Valid fields plus unknown keys, a str one and a bytes one in the same map."""
        extra = [("bogus", 1), (b"bogus-bytes", 2)]
        self.r.shuffle(extra)
        return self._with(frames, Pairs(list(self._header(frames).items()) + extra))

    def _wrong_type(self, cmd, frames):
        h = self._header(frames)
        if not h:
            return self._with(frames, {"cid": self.r.choice([1, None, b"x", [1]])})
        k = self.r.choice(list(h))
        h[k] = value(self.r, self.r.choice([t for t in VALUE_KINDS if t != type_of(h[k])]))
        return self._with(frames, h)

    def _missing_field(self, cmd, frames):
        h = self._header(frames)
        if h:
            del h[self.r.choice(list(h))]
        return self._with(frames, h)

    def _not_a_map(self, cmd, frames):
        return [frames[0], pack(value(self.r, self.r.choice([k for k in VALUE_KINDS if k != "map"]))), *frames[2:]]

    def _bad_utf8(self, cmd, frames):
        h = Pairs(self._header(frames).items())
        bad = Raw(b"\xa3\xff\xfe\xc0")  # a 3-byte str that is not UTF-8
        if h and self.r.random() < 0.5:
            i = self.r.randrange(len(h))
            h[i] = (h[i][0], bad)
        else:
            h.append((bad, 1))
        return self._with(frames, h)

    def _deep(self, cmd, frames):
        """A value nested near msgpack's limits, where it is a free-form map (engine, data, spec, sampling)
        or anywhere: what unpacks may not pack again once the broker wraps it in a reply."""
        h = self._header(frames)
        depth = self.r.choice([100, 500, 1000, 1015, 1018, 1019, 1020, 1021, 1022, 1023, 1024, 1030, 5000])
        maps = [k for k, v in h.items() if isinstance(v, dict)]
        if maps:
            h[self.r.choice(maps)] = {"deep": nested(depth)}
        elif h:
            h[self.r.choice(list(h))] = nested(depth)
        return self._with(frames, h)

    def _many_frames(self, cmd, frames):
        most = 2 + 2 * p.MAX_N  # the most frames any message has: a result of MAX_N samples with logprobs
        return frames + [b""] * self.r.choice([1, most - len(frames), most + 1 - len(frames), 10_000])

    def _large_frame(self, cmd, frames):
        buf = big_buffer()
        roll = self.r.random()
        if roll < 0.3:  # one token over the prompt limit, as a generate
            h = {"rid": self.new_id("big-"), "sampling": {}}
            return [p.TAG + bytes([int(C.GENERATE)]), pack(h), buf[:4 * (p.MAX_PROMPT_TOKENS + 1)]]
        if roll < 0.6:  # one frame just over the frame limit
            return frames[:2] + [buf[:p.MAX_FRAME_BYTES + 4]]
        if roll < 0.8:  # a header over its limit
            return [frames[0], pack({"cid": "x" * (p.MAX_HEADER_BYTES + 1)})]
        return frames[:2] + [buf[:p.MAX_FRAME_BYTES], buf[:p.MAX_FRAME_BYTES + 8]]  # over zmq's MAXMSGSIZE

    def _out_of_range(self, cmd, frames):
        """Right type, wrong value: capacity 0 or negative, n out of range, huge/negative versions and
        indices, empty or huge ids, sample index out of range, prompts empty or over the limit."""
        r = self.r
        h = self._header(frames)
        bad_id = ["", "x" * (p.MAX_ID_LEN + 1), "x" * 100_000, "\x00", "é" * 200]
        table = {
            "capacity": [0, 0, -1, -2**63, 2**64 - 1], "weight_version": [-1, -2**63, 2**64 - 1],
            "version": [-1, 2**64 - 1], "pid": [-1, 0, 2**64 - 1], "inflight": [-1, 2**64 - 1],
            "prompt_tokens": [-1, 2**64 - 1], "level": [0, 3, -1, 2**64 - 1],
            "rid": bad_id, "cid": bad_id, "worker": bad_id, "target": bad_id, "model": ["", "x" * 100_000],
            "code": ["", "bogus", "x" * 100_000], "mode": ["", "bogus"], "source": ["", "bogus"],
            "message": ["x" * 500_000], "reason": ["x" * 100_000],
            "rids": [[], [""], ["x" * 200] * 1000, ["r"] * 50], "devices": [[], [""], ["cpu"] * 100_000],
            "transports": [[], ["bogus"]], "tags": [["bogus"], [""]],
            "prompt": ["", [], [{"role": 1}], [{}], "x" * 500_000],
        }
        options = [k for k in h if k in table or k in ("sampling", "samples", "deltas")]
        if cmd is C.GENERATE and len(frames) > 2:
            options.append("ids")
        if cmd is C.RESULTS:
            options.append("items")
        if not options:
            return self._wrong_type(cmd, frames)
        k = r.choice(options)
        if k in table:
            h[k] = r.choice(table[k])
        elif k == "sampling":
            bad = {"n": [0, -1, p.MAX_N + 1, 2**63 - 1, 2**64 - 1, True], "temperature": [-1.0, math.nan, -math.inf],
                   "top_p": [0.0, 1.5, math.nan], "top_k": [-2, -2**63], "min_p": [-0.1, 1.1],
                   "max_tokens": [0, -1, 2**64 - 1], "min_tokens": [-1], "stop": [[""], [1], [None]],
                   "stop_token_ids": [[-1], [2**64 - 1], ["a"]], "presence_penalty": [3.0, math.nan],
                   "repetition_penalty": [0.0, -1.0], "bogus": [1]}
            s = dict(h["sampling"])
            f = r.choice(list(bad))
            s[f] = r.choice(bad[f])
            h["sampling"] = s
        elif k == "samples":
            s = [dict(x) for x in h["samples"]] or [{"text": "", "finish_reason": "stop", "logprobs": False}]
            roll = r.random()
            if roll < 0.5:
                s[0]["index"] = r.choice([-1, len(s), 5000, p.MAX_N, 2**64 - 1])  # sample index out of range
            elif roll < 0.7:
                s.append(dict(s[0], index=len(s)))  # more samples than the request's n (and than frames)
            elif roll < 0.85:
                del s[0][r.choice(list(s[0]))]
            else:
                s = []
            h["samples"] = s
        elif k == "deltas":
            h["deltas"] = r.choice([[[-1, "x"]], [[2**64 - 1, "x"]], [[0]], [[0, 1]], [], [[0, "x"]] * 50])
        elif k == "ids":
            return frames[:2] + [r.choice([b"", b"\x01\x02\x03", bytes(4 * 3) + b"\x00"])]
        elif k == "items":
            items = r.choice([pack([[[{"tokens": -1, "text": "", "finish_reason": "stop"}], 0]]),
                              pack([[[{"tokens": 2**63, "text": "", "finish_reason": "stop"}], 0]] * len(h["rids"])),
                              pack([]), pack({"a": 1}), b"\xc1"])
            return frames[:2] + [items] + frames[3:]
        return self._with(frames, h)


# ------------------------------------------------------------------------------------- the broker process

ENDPOINTS = re.compile(r"broker: clients on (\S+), workers on (\S+)")


class BrokerProc:
    """`python -m rolloutd.cli broker` on ports it picks itself (`tcp://127.0.0.1:*`): the endpoints are read
    from its log line, never guessed. Its log (stderr) goes to a file: a pipe nobody reads would fill and
    stop the broker."""

    def __init__(self, log_path: str, args: tuple = ()):
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "rolloutd.cli", "--log-level", "INFO", "broker",
                    "--front", "tcp://127.0.0.1:*", "--back", "tcp://127.0.0.1:*", "--drain-s", "0", *args]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=SRC)
        deadline = time.monotonic() + 60
        while not (m := ENDPOINTS.search(self.head())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker did not report its endpoints (exit {self.proc.returncode}): "
                                   f"{' '.join(self.cmd)}\n{self.tail()}")
            time.sleep(0.05)
        self.front, self.back = m.groups()
        self.ps = psutil.Process(self.proc.pid)

    def head(self, n: int = 1 << 16) -> str:
        with open(self.log_path, "rb") as f:
            return f.read(n).decode(errors="replace")

    def tail(self, n: int = 1 << 16) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - n))
            return f.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def internal_faults(self, limit: int = 10) -> list[str]:
        """The broker's own failures it logged (its guard kept the loop going): text and traceback each."""
        with open(self.log_path, "rb") as f:
            text = f.read(64 * MiB).decode(errors="replace")
        out = []
        for m in re.finditer(r"^.* internal: .*$", text, re.M):
            end = re.search(r"^\d{4}-\d\d-\d\d ", text[m.end() + 1:], re.M)
            out.append(text[m.start():m.end() + 1 + (end.start() if end else 3000)].strip()[:3000])
            if len(out) >= limit:
                break
        return out

    def traceback(self) -> str:
        """The last traceback in its log ('' if none: killed by a signal, or hung). One through msgpack's
        packer nesting runs to hundreds of KB."""
        t = self.tail(64 * MiB)
        i = t.rfind("Traceback (most recent call last)")
        return t[i:].strip() if i >= 0 else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def signature(tb: str) -> str:
    """A crash's kind: the exception's type and the innermost place in rolloutd it came from (its text can
    differ for one bug: "'<' not supported between 'str' and 'bytes'", or 'bytes' and 'str')."""
    if not tb:
        return "no traceback (killed, or hung)"
    lines = [l.strip() for l in tb.splitlines() if l.strip()]
    files = [l for l in lines if l.startswith("File ")]
    # Python prints a traceback's innermost 1000 frames: one through msgpack's packer may show no rolloutd
    where = [l for l in files if "rolloutd" in l] or files or ["?"]
    exc = next((l for l in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", l)), lines[-1])
    return f"{exc.split(':')[0]} at {where[-1]}"


class RssSampler:
    """The broker's RSS every `every` s in a thread: the peak between checks is not missed."""

    def __init__(self, broker: BrokerProc, every: float = 0.02):
        self.broker, self.every = broker, every
        self.peak, self.samples, self._stop = 0, [], threading.Event()
        self.t0 = time.monotonic()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                rss = self.broker.rss()
            except psutil.Error:  # gone: the checks report it
                continue
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic() - self.t0, rss))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def checked_call(client: Client, what: str) -> tuple[bool, float, dict | str]:
    """(answered in time, seconds, the reply or what the client raised) for client.ping("broker") or
    client.status()."""
    t = time.perf_counter()
    try:
        reply = client.ping("broker", timeout=ANSWER_S) if what == "ping" else client.status(timeout=ANSWER_S)
        took = time.perf_counter() - t
        return took <= ANSWER_S, took, reply
    except RolloutdError as e:
        return False, time.perf_counter() - t, f"{type(e).__name__}: {e}"


def decode_any(frames: list) -> p.Message:
    """What the broker sent a fake peer; its bulk frames unchecked (the harness reads headers only)."""
    return p.decode(frames, p.ANY, check_frames=False)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children and the broker inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ------------------------------------------------------------------------------------------ the fake peers

class Peers:
    """The fuzz's sockets, one DEALER per identity, each with its identity set (a replay reuses it)."""

    def __init__(self, broker: BrokerProc):
        self.ctx = zmq.Context()
        self.socks = {}
        for side, idents, addr in (("front", CLIENTS, broker.front), ("back", WORKERS + STRANGERS, broker.back)):
            for ident in idents:
                s = self.ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, ident)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(addr)
                self.socks[side, ident] = s
        self.received = collections.Counter()  # (side, what) -> count
        self.barriers: set[str] = set()  # barrier cids not answered yet
        self.unsent = 0

    def send(self, case: Case) -> bool:
        """Send without blocking for long: a broker that stopped reading must not stop the fuzz."""
        s = self.socks[case.side, case.ident]
        deadline = time.monotonic() + ANSWER_S
        while True:
            try:
                s.send_multipart(case.frames, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if time.monotonic() > deadline:
                    self.unsent += 1
                    return False
                s.poll(50, zmq.POLLOUT)

    def drain(self, fz: Fuzzer | None, limit: int = 2000) -> None:
        """Read what the broker sent every fake peer (bounded), tell the fuzzer, count it."""
        for (side, ident), s in self.socks.items():
            for _ in range(limit):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = decode_any(frames)
                except RolloutdError:
                    self.received[side, "undecodable"] += 1
                    continue
                what = msg.CMD.name + (f":{msg.code}" if msg.CMD is C.ERROR else "")
                self.received[side, what] += 1
                if getattr(msg, "cid", None) in self.barriers:
                    self.barriers.discard(msg.cid)
                if fz is not None:
                    fz.observe(side, ident, msg)

    def barrier(self, n: int, idents: list = CLIENTS, timeout: float = BARRIER_S) -> bool:
        """A ping to the broker on these fuzz client sockets; True once all are answered. Each comes after
        everything that socket sent: the broker has read all of it."""
        for ident in idents:
            cid = f"barrier-{n}-{ident.decode()}"
            self.barriers.add(cid)
            self.send(Case("front", ident, "barrier", "PING", p.encode(p.Ping(cid=cid, target="broker"))))
        deadline = time.monotonic() + timeout
        while self.barriers and time.monotonic() < deadline:
            self.drain(None)
            if self.barriers:
                time.sleep(0.002)
        ok = not self.barriers
        self.barriers.clear()
        return ok

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# ---------------------------------------------------------------------------------------------- the fuzz

def describe(case: Case) -> dict:
    """A message for a report: where it went, and its frames readably (and in hex when small)."""
    def header(f):
        for raw in (False, True):
            try:
                v = msgpack.unpackb(bytes(f), raw=raw, strict_map_key=False)
            except Exception as e:  # what the broker gets is garbage too
                err = f"not msgpack: {type(e).__name__}: {e}"
                continue
            try:
                return repr(v)[:400]
            except RecursionError:
                return f"<msgpack nested too deep for repr; it starts {bytes(f[:60])!r}>"
        return f"<{err[:100]}> {bytes(f[:40])!r}"

    frames = case.frames
    shown = [repr(bytes(frames[0][:8]))] + ([header(frames[1])] if len(frames) > 1 else [])
    shown += [f"<{len(f)} bytes>" for f in frames[2:6]] + ([f"... {len(frames) - 6} more frames"] if len(frames) > 6 else [])
    d = {"side": case.side, "ident": case.ident.decode(), "kind": case.kind, "from_cmd": case.cmd, "frames": shown}
    if sum(len(f) for f in frames) <= 4096 and len(frames) <= 8:
        d["hex"] = [bytes(f).hex() for f in frames]
    return d


def answer_problem(what: str, ok: bool, took: float, reply) -> str | None:
    """How a proper client's call went wrong, in words that do not change between runs (None: it did not)."""
    if ok:
        return None
    got = re.sub(r"tcp://\S+", "tcp://...", reply) if isinstance(reply, str) else f"answered after over {ANSWER_S:g} s"
    return f"{what} not answered ({got})"


def probe(broker: BrokerProc, client: Client) -> str | None:
    """What is wrong with the broker now: dead, or a proper client's ping or status not answered in time."""
    if not broker.alive():
        return "dead"
    for what in ("ping", "status"):
        problem = answer_problem(what, *checked_call(client, what))
        if problem:
            return problem
    return None


def failure(broker: BrokerProc, problem: str) -> str:
    """A failure's signature, the same for the same bug in another run: a dead broker's exception and where
    it came from, or what a proper client got instead of an answer. A broker that stopped answering may be
    on its way out (it flushes its sockets at exit): it gets the time to."""
    if broker.alive() and not re.search(r"InternalError|BadRequest|ProtocolError|Busy", problem):
        try:
            broker.proc.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
    return signature(broker.traceback()) if not broker.alive() else f"alive, {problem}"


def replay(cases: list, log_path: str, want: str | None = None) -> tuple[bool, int | None, str]:
    """Send cases in order to a fresh broker, each followed by a proper client's ping and status (so the next
    one arrives after it was read); (failed with signature `want` (any failure if None), index of the
    message after which it failed, signature)."""
    b = BrokerProc(log_path)
    peers = Peers(b)
    client = Client(b.front, timeout=ANSWER_S)
    at, sig = None, ""
    try:
        for i, case in enumerate(cases):
            peers.send(case)
            # Read before the probe: a ping behind it on its own connection (FIFO) for a client's message;
            # a worker's gets a moment (the probe travels on the other socket).
            if case.side == "front":
                peers.barrier(i, [case.ident], ANSWER_S)
            else:
                time.sleep(0.005)
            problem = probe(b, client)
            if problem is None and i == len(cases) - 1:
                time.sleep(0.3)  # what the last message started (a pending request placed) may fail it late
                problem = probe(b, client)
            peers.drain(None)
            if problem:
                at, sig = i, failure(b, problem)
                break
    finally:
        client.close()
        peers.close()
        b.stop(5)
    return at is not None and (want is None or sig == want), at, sig


def isolate(cases: list, log_dir: str, want: str, budget_s: float = 120.0) -> dict:
    """The fewest of `cases`, in their order, that still fail a fresh broker the same way (ddmin, bounded
    in time: "minimal" says whether it got to the end)."""
    log = os.path.join(log_dir, "replay.log")
    ok, at, sig = replay(cases, log, want)
    if not ok:
        return {"reproduced": False, "replayed": len(cases), "replay_signature": sig}
    deadline, tries = time.monotonic() + budget_s, 1

    def fails(subset):
        nonlocal tries
        tries += 1
        return replay(subset, log, want)[0]

    items = cases[:at + 1]
    if fails(items[-1:]):  # most often the one message alone
        items = items[-1:]
    n = 2
    while len(items) >= 2 and time.monotonic() < deadline:
        chunk = math.ceil(len(items) / n)
        parts = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        for part in parts:
            if fails(part):
                items, n = part, 2
                break
        else:
            for part in parts:
                rest = [c for c in items if not any(c is x for x in part)]
                if fails(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return {"reproduced": True, "minimal": time.monotonic() < deadline, "replays": tries,
            "inputs": [describe(c) for c in items]}


def run_fuzz(messages: int, seed: int, log_dir: str, *, kinds: dict | None = None, stop_on_crash: bool = False,
             isolate_crashes: bool = True, max_crashes: int = 50, kill_at: int | None = None,
             time_limit_s: float = 3600.0, progress: bool = False) -> dict:
    """Fuzz a broker subprocess with `messages` messages; returns the figures main() saves.

    kill_at: SIGKILL the broker after that many messages (the harness's own test: it must see the crash)."""
    os.makedirs(log_dir, exist_ok=True)
    fz = Fuzzer(seed, kinds)
    sent = {"front": collections.Counter(), "back": collections.Counter()}
    by_cmd, received = collections.Counter(), collections.Counter()
    crashes, timeline, lat = [], [], {"ping": [], "status": []}
    answers = {"ok": 0, "total": 0}
    seen_sigs: set[str] = set()
    faults = collections.Counter()  # status()["faults"], summed over the run's brokers
    internal = []  # failures of the broker's own code that its guard caught, from its logs
    run = {"starts": 0, "barriers_ok": 0, "unsent": 0, "last_status": {}, "rss_peak": 0}
    t0 = time.monotonic()
    ring: collections.deque = collections.deque(maxlen=2 * CHECK_EVERY)  # reaches back past the last check

    def start():
        run["starts"] += 1
        b = BrokerProc(os.path.join(log_dir, f"broker-{run['starts']}.log"))
        return b, Peers(b), Client(b.front, timeout=ANSWER_S), RssSampler(b)

    def close(broker, peers, client, sampler):
        ok, _, st = checked_call(client, "status") if broker.alive() else (False, 0, None)
        faults.update((st if ok else run["last_status"]).get("faults", {}))
        run["last_status"] = {}
        sampler.stop()
        run["rss_peak"] = max(run["rss_peak"], sampler.peak)
        client.close()
        peers.drain(fz)
        received.update(peers.received)
        run["unsent"] += peers.unsent
        peers.close()
        code = broker.stop(5)
        seen = {x.split(" internal: ")[-1].splitlines()[0] for x in internal}
        for x in broker.internal_faults():  # one of each kind
            if x.split(" internal: ")[-1].splitlines()[0] not in seen:
                internal.append(x)
                seen.add(x.split(" internal: ")[-1].splitlines()[0])
        return code

    def check(i, broker, peers, client) -> str | None:
        """What is wrong with the broker now (None: nothing): dead, not answering a proper client in time,
        or not reading the fuzz sockets. Records answer times and RSS."""
        if not broker.alive():
            return "dead"
        problem = None
        for what in ("ping", "status"):
            ok, took, reply = checked_call(client, what)
            answers["total"] += 1
            answers["ok"] += ok
            lat[what].append(took)
            if what == "status" and ok:
                run["last_status"] = reply
            problem = problem or answer_problem(what, ok, took, reply)
        if not problem and not peers.barrier(i):
            problem = f"the fuzz sockets' pings not all answered within {BARRIER_S} s"
        run["barriers_ok"] += problem is None
        alive = broker.alive()
        rss = broker.rss() if alive else 0
        timeline.append([i, round(rss / MiB, 1), round(lat["ping"][-1] * 1e3, 2), round(lat["status"][-1] * 1e3, 2)])
        return problem if alive else "dead"

    broker, peers, client, sampler = start()
    rss_before = broker.rss()
    i, exit_code = 0, None
    try:
        while i < messages and time.monotonic() - t0 < time_limit_s:
            case = fz.next()
            peers.send(case)
            ring.append(case)
            sent[case.side][case.kind] += 1
            by_cmd[f"{case.side}:{case.cmd}"] += 1
            i += 1
            if kill_at is not None and i == kill_at:
                broker.proc.kill()
                broker.proc.wait(5)
            if i % DRAIN_EVERY == 0:
                peers.drain(fz)
            # checked every CHECK_EVERY messages, at the end, and at once when the process is seen gone
            if i % CHECK_EVERY and i != messages and (i % DRAIN_EVERY or broker.alive()):
                continue
            problem = check(i, broker, peers, client)
            if progress and i % (20 * CHECK_EVERY) == 0:
                print(f"{i} messages, {time.monotonic() - t0:.0f} s, rss {timeline[-1][1]} MiB, crashes {len(crashes)}",
                      flush=True)
            if problem is None:
                continue
            # --- a failure: dead, or alive and not answering (restarted all the same: it may stay so)
            sig = failure(broker, problem)
            alive = broker.alive()
            tb = "" if alive else broker.traceback()
            crash = {"at_message": i, "exit_code": broker.proc.returncode, "signature": sig,
                     "exception": tb.strip().splitlines()[-1] if tb else "",
                     "traceback": tb if len(tb) < 4000 else f"{tb[:2500]}\n...\n{tb[-1500:]}", "log": broker.log_path}
            close(broker, peers, client, sampler)
            if isolate_crashes and sig not in seen_sigs and kill_at is None:
                crash["isolated"] = isolate(list(ring), log_dir, sig)
            seen_sigs.add(sig)
            crashes.append(crash)
            if progress:
                print(f"CRASH at message {i}: {sig}", flush=True)
            broker = None
            if stop_on_crash or len(crashes) >= max_crashes:
                break
            fz.reset()
            ring.clear()
            broker, peers, client, sampler = start()
    finally:
        rss_after = 0
        if broker is not None:
            peers.drain(fz)
            rss_after = broker.rss() if broker.alive() else 0
            exit_code = close(broker, peers, client, sampler)
    by_side = {"front": {}, "back": {}}
    for (side, what), n in sorted(received.items()):
        by_side[side][what] = n
    pct = lambda xs: {k: (round(v * 1e3, 3) if k != "n" else v) for k, v in percentiles(xs).items()} if xs else {}
    return {
        "messages": i, "seed": seed, "wall_s": round(time.monotonic() - t0, 1),
        "sent": {side: dict(sorted(c.items())) for side, c in sent.items()},
        "sent_total": {side: sum(c.values()) for side, c in sent.items()},
        "sent_by_command": dict(sorted(by_cmd.items())), "unsent": run["unsent"],
        "received": by_side, "barriers_ok": run["barriers_ok"],
        "crashes": crashes, "broker_starts": run["starts"], "last_exit_code": exit_code,
        "rss_mib": {"before": round(rss_before / MiB, 1), "after": round(rss_after / MiB, 1),
                    "peak": round(run["rss_peak"] / MiB, 1), "bound": round((rss_before + FUZZ_RSS_GROWTH) / MiB, 1)},
        "answers": answers, "latency_ms": {"ping": pct(lat["ping"]), "status": pct(lat["status"]),
                                           "all": pct(lat["ping"] + lat["status"])},
        "faults": dict(sorted(faults.items())), "internal_faults": internal[:20],
        "timeline": timeline,
    }


# --------------------------------------------------------------------------------------------- the flood

@dataclass
class FloodPlan:
    clients: int = 10_000
    requests: int = 70_000
    # 1M-token prompts (4 MiB each). 300 are 1.2 GiB offered, 19x the pending budget below: the byte budget
    # must refuse most of them, and the flood still takes seconds here (all 70,000 that size: 280 GiB).
    big: int = 300
    # Clients that send 5 big prompts each, first and back to back, while the budgets are still empty: 8 x 6 MiB
    # fits the overall budget, so only the per-client one stops each from holding 20 MiB.
    greedy: int = 8
    small_max_tokens: int = 512
    max_pending: int = 20_000
    max_pending_bytes: int = 64 * MiB
    max_client_bytes: int = 6 * MiB
    seed: int = 7

    def budget_args(self) -> list[str]:
        args = []
        for flag, v in (("--max-pending", self.max_pending), ("--max-pending-bytes", self.max_pending_bytes),
                        ("--max-client-bytes", self.max_client_bytes)):
            if v:  # 0: leave the broker's default (to run against a broker without that budget)
                args += [flag, str(v)]
        return args

    def prompts(self) -> list[list[int]]:
        """Token counts per client: requests spread evenly, `big` of them 1M tokens, 5 on each greedy client
        and one on each of as many others."""
        r = random.Random(self.seed)
        per = [[r.randint(1, self.small_max_tokens) for _ in range(self.requests // self.clients
                                                                    + (c < self.requests % self.clients))]
               for c in range(self.clients)]
        bigs = self.big
        greedy = r.sample(range(self.clients), min(self.greedy, self.clients))
        for c in greedy:
            for k in range(min(5, len(per[c]), bigs)):
                per[c][k], bigs = p.MAX_PROMPT_TOKENS, bigs - 1
        spread = [c for c in range(self.clients) if c not in set(greedy)]
        for c in r.sample(spread, bigs):
            per[c][r.randrange(len(per[c]))] = p.MAX_PROMPT_TOKENS
        return per


def _flood_child(k: int, front: str, plan: list[list[int]], first_client: int, counters, go, done, out) -> None:
    """One process holding len(plan) client connections: send every request, the greedy clients' (several
    big prompts) first and back to back, the rest round-robin over clients (the big prompts come spread over
    the run), then count answers until told to stop."""
    raise_nofile()
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, len(plan) + 64)
    socks = []
    for _ in plan:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(front)
        socks.append(s)
    ids = memoryview(bytes(4 * max(p.MAX_PROMPT_TOKENS, 1)))
    meta = {}  # rid -> (client index, prompt bytes)
    answers: dict[str, str] = {}
    codes, dups, odd = collections.Counter(), 0, collections.Counter()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    out.put(("ready", k))
    if not go.wait(300):
        out.put(("final", k, {"error": "never told to go"}))
        return

    def receive(timeout_ms: int) -> None:
        nonlocal dups
        for s, _ in poller.poll(timeout_ms):
            for _ in range(64):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = decode_any(frames)
                except RolloutdError:
                    odd["undecodable"] += 1
                    continue
                if msg.CMD is C.ERROR:
                    got = [(msg.rid, f"error:{msg.code}")]
                elif msg.CMD is C.RESULT:
                    got = [(msg.rid, "result:" + ",".join(sorted({x.get("finish_reason", "?") for x in msg.samples})))]
                elif msg.CMD is C.RESULTS:
                    got = [(rid, "result:batch") for rid in msg.rids]
                else:
                    odd[msg.CMD.name] += 1
                    continue
                for rid, what in got:
                    if rid in answers:
                        dups += 1
                    answers[rid] = what
                    codes[what] += 1
                    counters[k * 3 + 1] += 1
                    if what == "error:busy":
                        counters[k * 3 + 2] += 1

    greedy = [c for c, sizes in enumerate(plan) if sizes.count(p.MAX_PROMPT_TOKENS) > 1]
    order = [(c, slot) for c in greedy for slot in range(len(plan[c]))]
    order += [(c, slot) for slot in range(max(len(x) for x in plan)) for c in range(len(plan))
              if c not in set(greedy) and slot < len(plan[c])]
    sent = unsent = 0
    for c, slot in order:
        n = plan[c][slot]
        rid = f"f{first_client + c}-{slot}"
        frames = p.encode(p.Generate(rid=rid, sampling={"max_tokens": 16}, frames=[ids[:4 * n]]))
        try:
            socks[c].send_multipart(frames, zmq.NOBLOCK, copy=n * 4 < 65536)
            sent += 1
            meta[rid] = (first_client + c, 4 * n)
        except zmq.Again:
            unsent += 1
        if sent % 512 == 0:
            receive(0)
            counters[k * 3] = sent
    counters[k * 3] = sent
    out.put(("sent", k, sent, unsent))
    deadline = time.monotonic() + 900  # the parent sets done long before; this is for a parent gone wrong
    while not done.is_set() and time.monotonic() < deadline:
        receive(100)
    receive(0)
    # What the broker held: the requests answered with an aborted result after the abort-all.
    held = collections.Counter()
    held_n = 0
    for rid, what in answers.items():
        if what.startswith("result:") and rid in meta:
            c, nbytes = meta[rid]
            held[c] += nbytes
            held_n += 1
    out.put(("final", k, {"sent": sent, "unsent": unsent, "answered": len(answers), "duplicates": dups,
                          "answers": dict(codes), "other_messages": dict(odd), "held_count": held_n,
                          "held_bytes": sum(held.values()), "max_client_held_bytes": max(held.values(), default=0),
                          "clients_holding": len(held), "unanswered": sum(1 for r in meta if r not in answers)}))
    ctx.destroy(linger=0)


def run_flood(plan: FloodPlan, log_dir: str, *, time_limit_s: float = 300.0) -> dict:
    """The flood (module doc); returns its figures. Budgets 0 are left out of the broker's command line."""
    os.makedirs(log_dir, exist_ok=True)
    soft, hard = raise_nofile()
    per_child = max(1, min(5000, (soft - 256) // 2))  # a DEALER takes 2 descriptors: its TCP connection, its mailbox
    children = math.ceil(plan.clients / per_child)
    t0 = time.monotonic()
    broker = BrokerProc(os.path.join(log_dir, "flood-broker.log"), tuple(plan.budget_args()))
    rss_idle = rss_connected = rss_settled = broker.rss()
    sampler = RssSampler(broker, every=0.05)
    prompts = plan.prompts()
    ctx = mp.get_context("spawn")  # children start clean: no copy of this process's zmq context
    counters = ctx.Array("q", 3 * children, lock=False)  # per child: sent, answered, busy
    go, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = []
    for k in range(children):
        lo, hi = k * per_child, min(plan.clients, (k + 1) * per_child)
        procs.append(ctx.Process(target=_flood_child, args=(k, broker.front, prompts[lo:hi], lo, counters, go, done, out),
                                 daemon=True))
        procs[-1].start()
    total = sum(len(x) for x in prompts)
    client = Client(broker.front, timeout=ANSWER_S)
    pings, events = [], {}
    result: dict = {"clients": plan.clients, "requests": total, "big_prompts": sum(x.count(p.MAX_PROMPT_TOKENS) for x in prompts),
                    "big_prompt_bytes": 4 * p.MAX_PROMPT_TOKENS, "children": children, "nofile": [soft, hard],
                    "budgets": {"max_pending": plan.max_pending, "max_pending_bytes": plan.max_pending_bytes,
                                "max_client_bytes": plan.max_client_bytes}, "broker_args": plan.budget_args()}
    finals = {}

    def wait_queue(kind: str, n: int, timeout: float) -> list:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            try:
                m = out.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except Exception:  # queue.Empty
                continue
            if m[0] == "final":
                finals[m[1]] = m[2]
            if m[0] == kind:
                got.append(m)
        return got

    def ping_now(tag: str) -> tuple[bool, float]:
        ok, took, _ = checked_call(client, "ping")
        pings.append((round(time.monotonic() - t0, 3), round(took * 1e3, 2), tag))
        return ok, took

    try:
        if len(wait_queue("ready", children, 300)) < children:
            raise RuntimeError(f"flood children did not start: {finals}")
        # Connections are made in the background: wait until the broker holds one descriptor for each.
        deadline = time.monotonic() + 120
        while broker.ps.num_fds() < plan.clients and time.monotonic() < deadline:
            time.sleep(0.1)
        result["broker_fds"] = broker.ps.num_fds()
        rss_connected = broker.rss()
        events["go"] = time.monotonic() - t0
        go.set()
        sent_msgs, last = [], 0.0
        while len(sent_msgs) < children and time.monotonic() - t0 < time_limit_s:
            sent_msgs += wait_queue("sent", children - len(sent_msgs), 0.1)
            if time.monotonic() - last > 0.1:
                ping_now("flood")
                last = time.monotonic()
        events["sent"] = time.monotonic() - t0
        sent = sum(m[2] for m in sent_msgs)
        result["unsent"] = sum(m[3] for m in sent_msgs)
        # Settled: every request is either refused (busy or another error, counted by the children) or pending.
        st, deadline = {}, time.monotonic() + 120
        while time.monotonic() < deadline and broker.alive():
            ok, took, reply = checked_call(client, "status")
            pings.append((round(time.monotonic() - t0, 3), round(took * 1e3, 2), "status"))
            answered = sum(counters[k * 3 + 1] for k in range(children))
            st = reply if ok else st
            if ok and answered + st.get("pending", 0) >= sent:
                break
            time.sleep(0.2)
        events["settled"] = time.monotonic() - t0
        time.sleep(1.0)  # what was refused is freed as its reply leaves
        rss_settled = broker.rss()
        result["after_flood"] = answered_in_time(client)
        result["status_settled"] = {k: v for k, v in st.items() if k != "workers"}
        result["refused_before_abort"] = sum(counters[k * 3 + 1] for k in range(children))
        result["busy"] = sum(counters[k * 3 + 2] for k in range(children))
        # The abort-all ends every held request with an aborted result: what was held, exactly.
        t = time.perf_counter()
        try:
            with Client(broker.front) as c:
                result["abort_all"] = {"reply_ok": c.abort_all(timeout=60).get("ok")}
        except RolloutdError as e:
            result["abort_all"] = {"error": repr(e)}
        result["abort_all"]["ms"] = round((time.perf_counter() - t) * 1e3, 1)
        deadline = time.monotonic() + 120
        while sum(counters[k * 3 + 1] for k in range(children)) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        events["answered"] = time.monotonic() - t0
        done.set()
        wait_queue("final", children - len(finals), 120)
        result["after_abort"] = answered_in_time(client)
    finally:
        done.set()
        go.set()
        for pr in procs:
            pr.join(30)
            if pr.is_alive():
                pr.kill()
        client.close()
        sampler.stop()
        result["broker_alive"] = broker.alive()
        result["rss_mib_final"] = round(broker.rss() / MiB, 1) if broker.alive() else None
        result["broker_exit_code"] = broker.stop()
        result["broker_log_tail"] = broker.tail(3000) if result["broker_exit_code"] not in (0, None) else ""
    f = list(finals.values())
    summed = lambda key: sum(x.get(key, 0) for x in f)
    answers = collections.Counter()
    for x in f:
        answers.update(x.get("answers", {}))
    result.update({
        "sent": summed("sent"), "answered": summed("answered"), "unanswered": summed("unanswered"),
        "duplicates": summed("duplicates"), "answers": dict(answers), "held_count": summed("held_count"),
        "held_bytes": summed("held_bytes"), "max_client_held_bytes": max((x.get("max_client_held_bytes", 0) for x in f), default=0),
        "clients_holding": summed("clients_holding"), "children_reports": len(f),
        "child_errors": [x["error"] for x in f if "error" in x],
        "other_messages": dict(sum((collections.Counter(x.get("other_messages", {})) for x in f), collections.Counter())),
        "rss_mib": {"idle": round(rss_idle / MiB, 1), "connected": round(rss_connected / MiB, 1),
                    "settled": round(rss_settled / MiB, 1),
                    "settled_bound": round((rss_connected + plan.max_pending_bytes + flood_slack(plan)) / MiB, 1),
                    "peak": round(sampler.peak / MiB, 1),
                    "bound": round((rss_connected + plan.max_pending_bytes + flood_slack(plan)
                                    + in_transit(result["big_prompts"])) / MiB, 1)},
        "events_s": {k: round(v, 2) for k, v in events.items()}, "wall_s": round(time.monotonic() - t0, 1),
        "ping_timeline": pings, "rss_timeline": [(round(t, 2), round(r / MiB, 1)) for t, r in sampler.samples[::5]],
    })
    lat = [x[1] for x in pings if x[2] == "flood"]
    result["ping_during_flood_ms"] = {k: v for k, v in percentiles(lat).items()} if lat else {}
    return result


def answered_in_time(client: Client) -> dict:
    """A proper client's ping and status: answered within ANSWER_S?, how long, and the status reply."""
    out = {}
    for what in ("ping", "status"):
        ok, took, reply = checked_call(client, what)
        out[what] = {"ok": ok, "ms": round(took * 1e3, 2)}
        if what == "status":
            out["status_reply"] = {k: v for k, v in reply.items() if k != "workers"} if ok else reply
    return out


def flood_slack(plan: FloodPlan) -> int:
    """RSS the flood broker may hold, once every request is answered or held, beyond its baseline with the
    connections made and its byte budget: 1 KiB of Python objects per held request (table entries, frame
    objects), 8 KiB per connection that has carried traffic (libzmq's buffers and queues grow with it: the
    10,000 connections here took 66-86 MiB over the baseline plus budget, with 6,200 requests held), and
    64 MiB the allocator keeps. The broker's own budget (held_bytes) is checked exactly, apart from this."""
    return plan.max_pending * 1024 + plan.clients * 8 * 1024 + 64 * MiB


def in_transit(big_prompts: int) -> int:
    """What may sit in libzmq's receive queues on top, at the peak: every big prompt offered. libzmq reads
    each connection into its own queue as fast as the peer sends, and has no bound across connections;
    the broker's loop refuses them as busy only as it reads them."""
    return big_prompts * 4 * p.MAX_PROMPT_TOKENS


# ------------------------------------------------------------------------------------------- results, plots

def git_state() -> dict:
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"head": run("log", "-1", "--format=%h %s"), "changed": run("status", "--porcelain", "rolloutd").splitlines()}


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    if result["benchmark"].startswith("flood"):
        fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        t = [x[0] for x in result["rss_timeline"]]
        a.plot(t, [x[1] for x in result["rss_timeline"]], label="broker RSS")
        a.axhline(result["rss_mib"]["bound"], color="r", ls="--", label="bound")
        for name, at in result["events_s"].items():
            a.axvline(at, color="gray", ls=":")
            a.text(at, a.get_ylim()[1] * 0.95, name, fontsize=7, rotation=90, va="top")
        a.set_ylabel("MiB")
        a.legend()
        a.set_title(f"flood: {result['requests']:,} generates from {result['clients']:,} clients, "
                    f"{result['big_prompts']} of 4 MiB, no worker")
        b.plot([x[0] for x in result["ping_timeline"]], [x[1] for x in result["ping_timeline"]], ".", ms=3)
        b.axhline(ANSWER_S * 1e3, color="r", ls="--", label=f"{ANSWER_S:.0f} s")
        b.set_yscale("log")
        b.set_ylabel("client answer (ms)")
        b.set_xlabel("seconds")
        b.legend()
    else:
        fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        tl = result["timeline"]
        x = [r[0] for r in tl]
        a.plot(x, [r[1] for r in tl], label="broker RSS")
        a.axhline(result["rss_mib"]["bound"], color="r", ls="--", label="bound")
        a.set_ylabel("MiB")
        a.set_title(f"fuzz: {result['messages']:,} messages, {len(result['crashes'])} failed check(s) (red), "
                    f"{result['faults'].get('internal', 0)} internal fault(s)")
        b.plot(x, [r[2] for r in tl], ".", ms=3, label="ping")
        b.plot(x, [r[3] for r in tl], ".", ms=3, label="status")
        b.axhline(ANSWER_S * 1e3, color="r", ls="--", label=f"{ANSWER_S:.0f} s")
        b.set_yscale("log")
        b.set_ylabel("client answer (ms)")
        b.set_xlabel("messages sent")
        for c in result["crashes"]:
            for ax in (a, b):
                ax.axvline(c["at_message"], color="r", alpha=0.3)
        a.legend()
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--without", nargs="*", default=[], choices=list(KINDS),
                    help="leave these kinds out (to look past a crash that every run hits first)")
    ap.add_argument("--stop-on-crash", action="store_true")
    ap.add_argument("--flood", action="store_true", help="the flood instead of the fuzz")
    ap.add_argument("--clients", type=int, default=FloodPlan.clients)
    ap.add_argument("--requests", type=int, default=FloodPlan.requests)
    ap.add_argument("--big", type=int, default=FloodPlan.big)
    ap.add_argument("--max-pending", type=int, default=FloodPlan.max_pending, help="0: the broker's default")
    ap.add_argument("--max-pending-bytes", type=int, default=FloodPlan.max_pending_bytes, help="0: not passed")
    ap.add_argument("--max-client-bytes", type=int, default=FloodPlan.max_client_bytes, help="0: not passed")
    ap.add_argument("--logs", default=os.path.join("/tmp", f"fuzz-broker-{os.getpid()}"))
    a = ap.parse_args()
    # This broker-only benchmark runs on CPU wherever it runs: name the result as the other cpu ones are.
    os.environ.setdefault("BENCH_TAG", "cpu")
    command = "python perf/fuzz_broker.py " + " ".join(sys.argv[1:])
    if a.flood:
        plan = FloodPlan(clients=a.clients, requests=a.requests, big=a.big, max_pending=a.max_pending,
                         max_pending_bytes=a.max_pending_bytes, max_client_bytes=a.max_client_bytes)
        r = run_flood(plan, a.logs)
        r["plan"] = dataclasses.asdict(plan)
        name = "flood"
    else:
        kinds = {k: w for k, w in KINDS.items() if k not in a.without}
        r = run_fuzz(a.messages, a.seed, a.logs, kinds=kinds, stop_on_crash=a.stop_on_crash, progress=True)
        r["kinds"] = kinds
        name = "fuzz"
    r["git"] = git_state()
    r["broker_source"] = SRC
    r["logs"] = a.logs
    with contextlib.redirect_stdout(io.StringIO()):  # save() prints it all: the timelines would bury the figures
        saved = save(name, r, command)
    print(summary(r))
    print("wrote", saved["_path"])
    maybe_plot(plot, saved)


def summary(r: dict) -> str:
    keys = ("messages", "wall_s", "sent_total", "broker_starts", "faults", "rss_mib", "answers", "latency_ms") \
        if "timeline" in r else ("sent", "answered", "answers", "held_count", "held_bytes", "max_client_held_bytes",
                                 "rss_mib", "after_flood", "after_abort", "ping_during_flood_ms", "events_s", "wall_s")
    out = {k: r.get(k) for k in keys}
    if "crashes" in r:
        out["crashes"] = [f"{c['at_message']}: {c['signature']}" for c in r["crashes"]]
    return json.dumps(out, indent=1, default=str)


if __name__ == "__main__":
    main()
