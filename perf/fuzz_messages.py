"""The fuzz's messages (perf/fuzz_broker.py sends them): a seeded generator (Fuzzer) of valid messages and
mutations of them (bit flips, truncation, dropped / duplicated / extra frames, other protocol versions,
unknown header keys of every msgpack type, wrong types, out-of-range values, deep nesting, too many or too
large frames, commands for the other side), from 6 client identities on the front and, on the back, from 4
identities that register with a valid READY and 2 that never do. It learns from what the broker sends the
fake workers which requests and commands they were given, so that their answers name real ones.

msgpack by hand (pack, Raw, Pairs, ext, nested) writes what msgpack-python will not: keys of any type,
repeated keys, bad UTF-8, any ext code, nesting past the packer's limit.
"""
from __future__ import annotations

import collections
import itertools
import math
import os
import random
import struct
from dataclasses import dataclass

import msgpack

from rolloutd import protocol as p

# -------------------------------------------------------------------------------- who sends what, how often

CLIENTS = [b"fz-c%d" % i for i in range(6)]
WORKERS = [b"fz-w%d" % i for i in range(4)]  # send a valid READY first
STRANGERS = [b"fz-u%d" % i for i in range(2)]  # never send a valid READY

C = p.Cmd
WORKER_CMDS = {C.READY: 12, C.HEARTBEAT: 12, C.DISCONNECT: 3, C.TOKENS: 10, C.FINISHED: 35, C.REPLY: 10,
               C.ERROR: 8}
CLIENT_CMDS = {C.GENERATE: 40, C.ABORT: 12, C.ABORT_ALL: 2, C.STATUS: 8, C.PING: 12, C.PAUSE: 4, C.RESUME: 4,
               C.SLEEP: 3, C.WAKE: 3, C.LOAD_WEIGHTS: 4, C.WEIGHTS_BUCKET: 3, C.WEIGHTS_END: 2}
CONTROL_CMDS = (C.ABORT, C.ABORT_ALL, C.PAUSE, C.RESUME, C.SLEEP, C.WAKE, C.LOAD_WEIGHTS, C.WEIGHTS_BUCKET,
                C.WEIGHTS_END, C.PING)

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


# ----------------------------------------------------------------------------------------------- the fuzzer

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

    def _ended(self, rid: str, n: int) -> tuple:
        """One request's end, as protocol.Finished.pack takes it: n samples of random length."""
        samples = []
        for i in range(n):
            k = self.r.randint(0, 16)
            samples.append((i, "x" * k, self.r.choice(["stop", "length", "abort"]), bytes(4 * k),
                            bytes(4 * k) if self.r.random() < 0.3 else None))
        return rid, 3, samples

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
        if cmd is C.FINISHED:  # one request (most often), or several, some perhaps not the sender's
            picks = {self._assigned(ident)[1:] for _ in range(1 if r.random() < 0.7 else r.randint(2, 5))}
            return p.Finished.pack(name, 0, [self._ended(rid, n) for rid, n in picks])
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
        workers = r.choice([[], ["fz-w0"], ["nobody"]])
        if cmd is C.LOAD_WEIGHTS:
            return p.LoadWeights(cid=cid, update=self.new_id("u-"), version=r.randint(0, 9), source="path",
                                 path="/nonexistent", workers=workers)
        if cmd is C.WEIGHTS_BUCKET:
            return p.WeightsBucket(cid=cid, update=self.new_id("u-"), index=r.randint(0, 3), workers=workers,
                                   buffer={"host": {"kind": "shm", "id": "1-x", "name": "rolloutd-x", "size": 256}},
                                   tensors=[["w", "bfloat16", [8, 8], 0]])
        if cmd is C.WEIGHTS_END:
            return p.WeightsEnd(cid=cid, update=self.new_id("u-"), commit=r.random() < 0.5, workers=workers)
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
        options = [k for k in h if k in table or k in ("sampling", "deltas")]
        if cmd is C.GENERATE and len(frames) > 2:
            options.append("ids")
        if cmd is C.FINISHED:
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
        elif k == "deltas":
            h["deltas"] = r.choice([[[-1, "x"]], [[2**64 - 1, "x"]], [[0]], [[0, 1]], [], [[0, "x"]] * 50])
        elif k == "ids":
            return frames[:2] + [r.choice([b"", b"\x01\x02\x03", bytes(4 * 3) + b"\x00"])]
        elif k == "items":  # Finished's samples, in its items frame
            try:
                good = msgpack.unpackb(bytes(frames[2])) if len(frames) > 2 else []
            except Exception:  # a mutation before this one broke it: garbage it stays
                good = []
            s = [dict(x) for x in good[0][0]] if good and good[0] and good[0][0] else \
                [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": False, "tokens": 0}]
            roll = r.random()
            if roll < 0.3:
                s[0]["index"] = r.choice([-1, len(s), 5000, p.MAX_N, 2**64 - 1])  # sample index out of range
            elif roll < 0.45:
                s.append(dict(s[0], index=len(s)))  # more samples than the request's n (and than its ids)
            elif roll < 0.6:
                del s[0][r.choice(list(s[0]))]
            elif roll < 0.7:
                s = []
            elif roll < 0.8:
                s[0]["tokens"] = r.choice([-1, 2**63])
            items = pack([[s, 0]] * len(h["rids"])) if roll < 0.8 else r.choice([pack([]), pack({"a": 1}), b"\xc1"])
            return frames[:2] + [items] + frames[3:]
        return self._with(frames, h)


# ---------------------------------------------------------------------------------------------- for reports

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

