"""Every message rolloutd puts on the wire, and the one codec for all of them.

A message is a list of ZeroMQ frames:

    frame 0   5 bytes: the protocol tag b"RLD1" and one command byte
    frame 1   a msgpack map: the message's header fields (names and types below)
    frame 2.. raw bulk frames (token ids as little-endian int32, logprobs as float32), never msgpack lists:
              lists cost about 3x the latency, and the broker forwards these frames without reading them

Decoding checks the tag, the command, the header's size, every field's type and, where asked, the bulk
frames; anything off raises ProtocolError (or BadRequest for valid-looking but impossible sampling), whose
text the broker sends back as the error reply. There is no pickle anywhere: a CUDA IPC handle, when
weights travel, is plain fields rebuilt on the other side.

Message classes are named after their command (Cmd.ABORT_ALL -> AbortAll); `_register` checks that at
import, so a new message cannot be half-added.
"""
from __future__ import annotations

import dataclasses
import reprlib
import struct
import sys
import types
import typing
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Union

import msgpack
import msgspec
import numpy as np

from .errors import BadRequest, ProtocolError

TAG = b"RLD1"  # protocol name + version: a peer speaking another version is refused by name

MAX_HEADER_BYTES = 1 << 20  # headers are small; a bigger one is garbage or abuse
# ... except those that carry generated text (Tokens, and Finished's items frame): n samples of long answers
MAX_TEXT_HEADER_BYTES = 1 << 26
MAX_N = 1024
MAX_FRAME_BYTES = 1 << 26  # 64 MiB: what a worker may send in one frame; bulk weights never ride these sockets
MAX_PROMPT_TOKENS = 1 << 20
# The largest frame a client has any reason to send: a prompt of MAX_PROMPT_TOKENS int32 ids.
MAX_CLIENT_FRAME_BYTES = 4 * MAX_PROMPT_TOKENS
MAX_ID_LEN = 128
MAX_IDS = 1 << 16  # request ids in one abort or one results batch
MAX_CAPACITY = 1 << 20  # sequences one worker may say it takes at once
MAX_DEPTH = 16  # lists and maps within one another in a header: the packer itself stops at 512
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# A request whose client named no deadline ends after this: a vanished client cannot hold it forever.
DEFAULT_TIMEOUT_S = 3600.0
PAUSE_MODES = ("abort", "wait", "keep")
WAKE_TAGS = ("weights", "kv_cache")
WEIGHT_SOURCES = ("path", "cuda_ipc", "shm")
# Tensor dtypes a weight update may carry, by torch's names.
DTYPES = ("bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "int16",
          "int32", "int64", "bool")
MAX_TENSORS = 1 << 16  # in one update's manifest, and in one bucket
MAX_TENSOR_NAME = 1024
MAX_DIMS = 8

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")


class Cmd(IntEnum):
    # worker <-> broker session
    READY = 1
    HEARTBEAT = 2
    DISCONNECT = 3
    # generation
    GENERATE = 10
    TOKENS = 11
    FINISHED = 12
    ABORT = 13
    ABORT_ALL = 14
    # engine state, fanned out to every worker (or, for weights, to the workers named)
    LOAD_WEIGHTS = 20
    SLEEP = 21
    WAKE = 22
    PAUSE = 23
    RESUME = 24
    WEIGHTS_BUCKET = 25
    WEIGHTS_END = 26
    READ_WEIGHTS = 27
    # queries
    STATUS = 30
    PING = 31
    # answers
    REPLY = 40
    ERROR = 41


def rule(check, what: str, **kw):
    """A header field whose value must also pass `check` (a range, a length, a set of names); decode
    refuses the message otherwise, naming the field and `what` it must be."""
    return field(metadata={"rule": (check, what)}, **kw)


def _is_id(v) -> bool:
    return 0 < len(v) <= MAX_ID_LEN


def _ids(limit: int = MAX_IDS):
    return lambda v: len(v) <= limit and all(_is_id(x) for x in v)


ID = f"1..{MAX_ID_LEN} characters"
IDS = f"a list of up to {MAX_IDS} ids of {ID}"
VERSION = (lambda v: -1 <= v < 1 << 63), "an integer from -1 up (-1: none yet)"
COUNT = (lambda v: 0 <= v < 1 << 31), "a count >= 0"


@dataclass
class Message:
    CMD: ClassVar[Cmd]
    _fields: ClassVar[tuple]  # (name, checker, required, type text) per header field, set by _register
    _names: ClassVar[tuple]  # the header fields' names (what header() takes: 3x faster than from _fields)
    _typed: ClassVar[msgspec.msgpack.Decoder]  # the header's fields, typed (see _typed_header)
    _rules: ClassVar[tuple]  # (name, rule or None, may hold untyped lists or maps) per header field

    MAX_HEADER: ClassVar[int] = MAX_HEADER_BYTES
    MAX_BULK: ClassVar[int] = 0  # bulk frames after the header, at most

    frames: list = field(default_factory=list, kw_only=True)

    def header(self) -> dict:
        return {name: getattr(self, name) for name in self._names}

    def check_frames(self) -> None:
        """Check the bulk frames against the header; most messages carry none."""
        if self.frames:
            raise ProtocolError(f"{type(self).__name__} carries no bulk frames, got {len(self.frames)}")


# ---------------------------------------------------------------------------------------------- session

@dataclass
class Ready(Message):
    """Worker -> broker, first message of a session: what this worker serves."""
    CMD = Cmd.READY
    worker: str = rule(_is_id, ID)
    model: str = rule(lambda v: len(v) <= 4096, "at most 4096 characters")
    devices: list[str] = rule(_ids(64), "1..64 device names")  # GPU UUIDs, or ["cpu"]
    capacity: int = rule(lambda v: 1 <= v <= MAX_CAPACITY, f"1..{MAX_CAPACITY}")  # sequences (prompts x n) at once
    weight_version: int = rule(*VERSION)
    transports: list[str] = rule(lambda v: set(v) <= set(WEIGHT_SOURCES), f"a subset of {WEIGHT_SOURCES}")
    pid: int = rule(*COUNT)
    engine: dict  # {"vllm": "0.32.0", "tensor_parallel_size": 1, ...}
    host: str = rule(lambda v: len(v) <= 255, "at most 255 characters", default="")  # shared memory reaches only it


@dataclass
class Heartbeat(Message):
    """Both ways, every interval; a worker's also says how much it holds, and whether it is stopping (sent at
    once when it starts to: the broker places nothing new there, and waits for its goodbye)."""
    CMD = Cmd.HEARTBEAT
    inflight: int = rule(*COUNT, default=0)
    stopping: bool = False


@dataclass
class Disconnect(Message):
    """Either way: this session is over (a worker stopping, or a broker that does not know the sender).
    The broker answers a worker's with reason BYE once it has read everything that worker sent before."""
    CMD = Cmd.DISCONNECT
    reason: str = rule(lambda v: len(v) <= 1024, "at most 1024 characters", default="")


BYE = "bye"


# ------------------------------------------------------------------------------------------- generation

@dataclass
class Generate(Message):
    """Client -> broker -> worker: one prompt, n samples (all n stay on one worker: shared prefix).

    The prompt is exactly one of: `prompt` text, `prompt` as chat messages ([{"role", "content"}, ...],
    rendered with the model's chat template), or token ids in frames[0] with `prompt` None.
    """
    CMD = Cmd.GENERATE
    MAX_BULK = 1
    rid: str = rule(_is_id, ID)
    sampling: dict
    prompt: Union[str, list, None] = None
    stream: bool = False
    # seconds the caller waits for it; the broker ends (and aborts) it once they have passed
    timeout_s: float = rule(lambda v: 0 < v <= MAX_TIMEOUT_S, f"in (0, {MAX_TIMEOUT_S:.0f}]", default=DEFAULT_TIMEOUT_S)

    def check_frames(self) -> None:
        self.sampling = check_sampling(self.sampling)
        if self.prompt is None:
            if len(self.frames) != 1:
                raise ProtocolError("generate without `prompt` needs exactly one frame of int32 token ids")
            n = _frame_len(self.frames[0], TOKEN_DTYPE, "prompt token ids")
            if n == 0:
                raise BadRequest("empty prompt")
            if n > MAX_PROMPT_TOKENS:
                raise BadRequest(f"prompt of {n} tokens is over the limit of {MAX_PROMPT_TOKENS}")
            return
        if self.frames:
            raise ProtocolError("generate carries either `prompt` or token-id frames, not both")
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise BadRequest("empty prompt")
        else:
            check_chat(self.prompt)

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


@dataclass
class Tokens(Message):
    """Worker -> broker -> client, streaming only: what each sample gained in one engine step.

    deltas[i] = [sample index, text delta]; frames[i] = that sample's new token ids (int32).
    """
    CMD = Cmd.TOKENS
    MAX_HEADER = MAX_TEXT_HEADER_BYTES
    MAX_BULK = MAX_N
    rid: str = rule(_is_id, ID)
    deltas: list[list] = rule(lambda v: len(v) <= MAX_N, f"at most {MAX_N} deltas")

    def check_frames(self) -> None:
        if len(self.frames) != len(self.deltas):
            raise ProtocolError(f"tokens: {len(self.deltas)} deltas but {len(self.frames)} frames")
        for d, f in zip(self.deltas, self.frames):
            if len(d) != 2 or type(d[0]) is not int or not 0 <= d[0] < MAX_N or not isinstance(d[1], str):
                raise ProtocolError(f"tokens: each delta is [sample index 0..{MAX_N - 1}, text]")
            _frame_len(f, TOKEN_DTYPE, "token ids")


def _check_samples(samples: list) -> None:
    """Each sample a map with text and finish_reason strings and its index: the indices are 0..n-1, once each."""
    seen = set()
    for s in samples:
        if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not isinstance(s.get("finish_reason"), str):
            raise ProtocolError("finished: each sample needs text and finish_reason strings")
        i = s.get("index")
        if type(i) is not int or not 0 <= i < len(samples) or i in seen:
            raise ProtocolError(f"finished: sample indices must be 0..{len(samples) - 1}, each once; got {i!r}")
        seen.add(i)


@dataclass
class Finished(Message):
    """Worker -> broker -> client: requests that ended, with every sample of each. One message for all that
    a worker finishes in one event-loop turn (an abort of 512 requests ends 512 at once), or for one.

    The header holds only what routes it: rids[i] names item i, and the broker reads nothing else. The rest
    costs a few frames whatever the count: frames[0] is a msgpack list with, per item, [samples,
    prompt_tokens], each sample a map {"index", "text", "finish_reason" ("stop", "length" or "abort": an
    aborted request keeps what it had), "logprobs": bool, "tokens": its count}; frames[1] holds every
    sample's token ids (int32), item after item, sample after sample; frames[2], present when any sample has
    logprobs, those samples' logprobs (float32) in the same order. pack() is the one way to make it.
    """
    CMD = Cmd.FINISHED
    MAX_BULK = 3
    worker: str = rule(lambda v: len(v) <= MAX_ID_LEN, f"at most {MAX_ID_LEN} characters")  # "": the broker's
    weight_version: int = rule(*VERSION)
    rids: list[str] = rule(lambda v: v and _ids()(v), f"1..{MAX_IDS} ids of {ID}")

    def items(self) -> list[list]:
        """[[samples, prompt_tokens], ...] from frames[0], unpacked once; ProtocolError if malformed."""
        items = self.__dict__.get("_items")
        if items is None:
            if not self.frames or len(self.frames[0]) > MAX_TEXT_HEADER_BYTES:
                raise ProtocolError("finished: the items frame is missing or over the limit")
            items = _unpackb(self.frames[0], "finished: the items frame")
            if not isinstance(items, list) or len(items) != len(self.rids):
                raise ProtocolError(f"finished: {len(self.rids)} rids need as many items")
            for it in items:
                if (not isinstance(it, list) or len(it) != 2 or not isinstance(it[0], list)
                        or not all(isinstance(x, dict) for x in it[0]) or type(it[1]) is not int):
                    raise ProtocolError("finished: each item is [[sample maps], prompt_tokens]")
            self.__dict__["_items"] = items
        return items

    def check_frames(self) -> None:
        total = lp_total = 0
        any_lp = False
        for samples, prompt_tokens in self.items():
            if not 1 <= len(samples) <= MAX_N or prompt_tokens < 0:
                raise ProtocolError(f"finished: each item has 1..{MAX_N} samples and a prompt length >= 0")
            _check_samples(samples)
            for s in samples:
                k = s.get("tokens")
                if type(k) is not int or k < 0:
                    raise ProtocolError("finished: each sample needs its token count (tokens)")
                total += k
                if s.get("logprobs"):
                    any_lp, lp_total = True, lp_total + k
        want = 3 if any_lp else 2
        if len(self.frames) != want:
            raise ProtocolError(f"finished: the samples need {want} frames, got {len(self.frames)}")
        if _frame_len(self.frames[1], TOKEN_DTYPE, "token ids") != total:
            raise ProtocolError(f"finished: the samples count {total} token ids, the frame holds another number")
        if any_lp and _frame_len(self.frames[2], LOGPROB_DTYPE, "logprobs") != lp_total:
            raise ProtocolError(f"finished: the samples count {lp_total} logprobs, the frame holds another number")

    def spans(self):
        """Walk a checked message: per item (rid, samples, prompt_tokens, per sample (start, end, lp)),
        where [start:end] are its token ids in frames[1], counted in elements, and its logprobs are at
        [lp:lp + end - start] in frames[2] (lp None when it has none)."""
        i = j = 0
        for rid, (samples, prompt_tokens) in zip(self.rids, self.items()):
            spans = []
            for s in samples:
                k = s["tokens"]
                lp = None
                if s.get("logprobs"):
                    lp, j = j, j + k
                spans.append((i, i + k, lp))
                i += k
            yield rid, samples, prompt_tokens, spans

    def select(self, rids: set) -> Finished | None:
        """A Finished with only these requests' items (None if it has none of them): to each client its own
        when one message ended requests of several. Call on a checked message."""
        ids = memoryview(self.frames[1])
        lps = memoryview(self.frames[2]) if len(self.frames) > 2 else None
        ended = []
        for rid, samples, prompt_tokens, spans in self.spans():
            if rid in rids:  # int32 and float32 alike: 4 bytes an element
                ended.append((rid, prompt_tokens, [
                    (s["index"], s["text"], s["finish_reason"], ids[4 * a:4 * b],
                     None if lp is None else lps[4 * lp:4 * (lp + b - a)]) for s, (a, b, lp) in zip(samples, spans)]))
        return Finished.pack(self.worker, self.weight_version, ended) if ended else None

    @staticmethod
    def pack(worker: str, weight_version: int, ended: list) -> Finished:
        """The one way to make a Finished. ended[i] = (rid, prompt_tokens, samples), each sample (index, text,
        finish_reason, token ids, logprobs or None: one per token id when given); ids and logprobs as lists
        of numbers, or already packed (bytes, memoryview)."""
        items, ids, lps = [], [], []
        for _, prompt_tokens, samples in ended:
            maps = []
            for index, text, reason, sample_ids, sample_lps in samples:
                packed = _packed(sample_ids, "i")
                maps.append({"index": index, "text": text, "finish_reason": reason,
                             "logprobs": sample_lps is not None, "tokens": len(packed) // 4})
                ids.append(packed)
                if sample_lps is not None:
                    lps.append(_packed(sample_lps, "f"))
            items.append([maps, prompt_tokens])
        frames = [_packb(items), b"".join(ids)] + ([b"".join(lps)] if lps else [])
        return Finished(worker=worker, weight_version=weight_version, rids=[e[0] for e in ended], frames=frames)


@dataclass
class Abort(Message):
    """Client -> broker -> owning worker(s): stop these requests; each ends with its partial output."""
    CMD = Cmd.ABORT
    cid: str = rule(_is_id, ID)
    rids: list[str] = rule(_ids(), IDS)


@dataclass
class AbortAll(Message):
    """Client -> broker -> every worker: stop everything in flight."""
    CMD = Cmd.ABORT_ALL
    cid: str = rule(_is_id, ID)


# ------------------------------------------------------------------------------------------ engine state

def _tensor_entry(with_offset: bool):
    """[name, dtype, shape] (a manifest entry), or [name, dtype, shape, offset] (a tensor in a bucket)."""
    def ok(v) -> bool:
        if not isinstance(v, list) or len(v) != (4 if with_offset else 3):
            return False
        name, dtype, shape = v[:3]
        return (isinstance(name, str) and 0 < len(name) <= MAX_TENSOR_NAME and dtype in DTYPES
                and isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)
                and (not with_offset or (type(v[3]) is int and 0 <= v[3] < 1 << 48)))
    return lambda v: len(v) <= MAX_TENSORS and all(ok(x) for x in v)


TENSORS = f"up to {MAX_TENSORS} entries [name, dtype, shape]"
TIMEOUT = (lambda v: 0 < v <= MAX_TIMEOUT_S, f"seconds in (0, {MAX_TIMEOUT_S:.0f}]")


@dataclass
class LoadWeights(Message):
    """Client -> broker -> workers (`workers` names them; empty: every worker): begin weight update `update`,
    to be served as `version`.

    source "path": `path` is a HF safetensors folder on the workers' disk, loaded in this one step.
    source "cuda_ipc" / "shm": `manifest` lists every tensor that will come as [name, dtype, shape]; each
    worker checks it against its model before anything is loaded, the tensors follow in WeightsBucket
    messages, and WeightsEnd commits or drops them. While the update runs, generation is paused (`pause`
    is the pause mode). `atomic`: the worker keeps the new tensors aside until the set is whole, so the
    old weights serve on if the update fails; otherwise buckets load straight into the model, and a
    failure part-way leaves the worker refusing requests until a complete update lands. A worker that
    hears nothing of the update for `timeout_s` drops it.

    `device` is where the trainer's buffers are ("GPU-<uuid>", or "host" for shared memory). A worker whose
    ranks use several GPUs takes one update of a version from one trainer process per GPU (each rank reads
    the buffers on its own GPU): the first LoadWeights begins it, the others join it with their own
    `update` ids, and it commits once every one of them has sent WeightsEnd.
    """
    CMD = Cmd.LOAD_WEIGHTS
    cid: str = rule(_is_id, ID)
    update: str = rule(_is_id, ID)
    version: int = rule(lambda v: 0 <= v < 1 << 63, "an integer >= 0")
    source: str = rule(lambda v: v in WEIGHT_SOURCES, f"one of {WEIGHT_SOURCES}")
    workers: list[str] = rule(_ids(1024), "up to 1024 worker names", default_factory=list)
    path: str = rule(lambda v: len(v) <= 4096, "at most 4096 characters", default="")
    manifest: list = rule(_tensor_entry(False), TENSORS, default_factory=list)
    pause: str = rule(lambda v: v in PAUSE_MODES, f"one of {PAUSE_MODES}", default="wait")
    wake: bool = False  # a sleeping worker wakes first (else it refuses the update)
    atomic: bool = True
    timeout_s: float = rule(*TIMEOUT, default=120.0)
    trainer_pid: int = rule(*COUNT, default=0)  # whose staging files to remove should it die (same host)
    device: str = rule(lambda v: v == "" or _is_id(v), ID, default="")


@dataclass
class WeightsBucket(Message):
    """Client -> broker -> workers: the next bucket of update `update`. `buffer` maps a device (a GPU UUID,
    or "host" for shared memory) to the handle of the staging buffer that holds the bucket there, as plain
    fields (see rolloutd.weights); `tensors` says where each tensor lies in it ([name, dtype, shape, byte
    offset]). Each engine rank reads the buffer of its own device; the worker answers once the bucket is
    loaded and nothing reads the buffer any more, so the trainer may refill it."""
    CMD = Cmd.WEIGHTS_BUCKET
    cid: str = rule(_is_id, ID)
    update: str = rule(_is_id, ID)
    index: int = rule(*COUNT)
    buffer: dict = rule(lambda v: 0 < len(v) <= 64 and all(isinstance(k, str) and _is_id(k) and isinstance(h, dict)
                                                          for k, h in v.items()), "a map of 1..64 device -> handle")
    tensors: list = rule(_tensor_entry(True), TENSORS)
    workers: list[str] = rule(_ids(1024), "up to 1024 worker names", default_factory=list)
    timeout_s: float = rule(*TIMEOUT, default=120.0)


@dataclass
class WeightsEnd(Message):
    """Client -> broker -> workers: commit update `update` (serve it from now on) or drop it."""
    CMD = Cmd.WEIGHTS_END
    cid: str = rule(_is_id, ID)
    update: str = rule(_is_id, ID)
    commit: bool
    workers: list[str] = rule(_ids(1024), "up to 1024 worker names", default_factory=list)
    timeout_s: float = rule(*TIMEOUT, default=120.0)


@dataclass
class ReadWeights(Message):
    """Client -> broker -> workers: the first `count` values and the sum of each named parameter (vLLM's
    names), from every engine rank: what a test reads back to see that an update landed."""
    CMD = Cmd.READ_WEIGHTS
    cid: str = rule(_is_id, ID)
    names: list[str] = rule(lambda v: 0 < len(v) <= 1024 and all(0 < len(n) <= MAX_TENSOR_NAME for n in v),
                            "1..1024 parameter names")
    count: int = rule(lambda v: 0 <= v <= 1024, "0..1024", default=8)
    workers: list[str] = rule(_ids(1024), "up to 1024 worker names", default_factory=list)


@dataclass
class Sleep(Message):
    """Level 1 offloads weights and drops the KV cache; level 2 drops both."""
    CMD = Cmd.SLEEP
    cid: str = rule(_is_id, ID)
    level: int = rule(lambda v: v in (1, 2), "1 or 2", default=1)


@dataclass
class Wake(Message):
    """Wake from sleep; tags pick what to bring back ("weights", "kv_cache"), empty means all."""
    CMD = Cmd.WAKE
    cid: str = rule(_is_id, ID)
    tags: list[str] = rule(lambda v: set(v) <= set(WAKE_TAGS), f"a subset of {WAKE_TAGS}", default_factory=list)


@dataclass
class Pause(Message):
    """mode "abort": abort in flight; "wait": let in flight finish; "keep": freeze in flight until resume.
    New requests while paused wait for resume (within their timeout), or with `refuse` get a Paused error."""
    CMD = Cmd.PAUSE
    cid: str = rule(_is_id, ID)
    mode: str = rule(lambda v: v in PAUSE_MODES, f"one of {PAUSE_MODES}", default="abort")
    refuse: bool = False


@dataclass
class Resume(Message):
    CMD = Cmd.RESUME
    cid: str = rule(_is_id, ID)


# ------------------------------------------------------------------------------------------------ queries

@dataclass
class Status(Message):
    """Client -> broker: the worker table (the broker answers itself)."""
    CMD = Cmd.STATUS
    cid: str = rule(_is_id, ID)


@dataclass
class Ping(Message):
    """Client -> broker (target "broker") or -> broker -> a worker (target "worker", or a worker id)."""
    CMD = Cmd.PING
    cid: str = rule(_is_id, ID)
    target: str = rule(_is_id, ID, default="worker")


# ------------------------------------------------------------------------------------------------ answers

@dataclass
class Reply(Message):
    """The answer to a cid-carrying command. A worker's carries its own data; the broker's carries its own
    part in data (the status table, ids it did not know, ...) and, for commands that went to workers, one
    entry per worker in workers: {name: {"ok": bool, "data": {...}}} or, when that worker failed or did not
    answer, {name: {"ok": false, "error": code, "message": text}}."""
    CMD = Cmd.REPLY
    cid: str = rule(_is_id, ID)
    ok: bool = True
    data: dict = field(default_factory=dict)
    workers: dict = field(default_factory=dict)


@dataclass
class Error(Message):
    """Something went wrong; `code` is one of rolloutd.errors' codes. rid or cid names what it answers."""
    CMD = Cmd.ERROR
    code: str = rule(lambda v: 0 < len(v) <= 64, "1..64 characters")
    message: str
    rid: Union[str, None] = rule(lambda v: v is None or _is_id(v), ID, default=None)
    cid: Union[str, None] = rule(lambda v: v is None or _is_id(v), ID, default=None)


# ------------------------------------------------------------------------------------------------- codec

_BY_CMD: dict[int, type[Message]] = {}
_HEAD: dict[int, bytes] = {}

_packb = msgpack.Packer(use_bin_type=True).pack


def _unpackb(raw, what: str):
    """Unpack msgpack that a peer sent: garbage, or nesting deeper than MAX_DEPTH (which could be neither
    shown nor packed again), is a ProtocolError."""
    try:
        v = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"{what} is not valid msgpack ({type(e).__name__})") from None
    if _too_deep(v):
        raise ProtocolError(f"{what} nests lists or maps deeper than {MAX_DEPTH}")
    return v


def _too_deep(v) -> bool:
    """Whether v nests lists and maps deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(v, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            x = x.values()
        elif not isinstance(x, list):
            continue
        if depth >= MAX_DEPTH:
            return True
        stack.extend((y, depth + 1) for y in x if isinstance(y, (list, dict)))
    return False


def encode(msg: Message) -> list[bytes]:
    """The frames for one message (bulk frames are passed through as given: bytes, memoryview, Frame)."""
    return [_HEAD[msg.CMD], _packb(msg.header()), *msg.frames]


def decode(frames: list, allowed: frozenset, *, check_frames: bool = True) -> Message:
    """Parse and validate one message that may only be one of `allowed` (commands, e.g. CLIENT_TO_BROKER).
    Raises ProtocolError / BadRequest naming what is wrong.

    Everything that costs nothing is checked before the header is unpacked: the tag, the command against
    the socket's allowlist, the number of frames and their bytes. check_frames=False skips the bulk-frame
    checks (the broker forwards frames it does not read).
    """
    if len(frames) < 2:
        raise ProtocolError(f"a message has at least 2 frames (tag+command, header), got {len(frames)}")
    head = bytes(memoryview(frames[0])[:6])
    if len(head) != 5 or head[:4] != TAG:
        raise ProtocolError(f"bad protocol tag {head[:5]!r}: this peer speaks {TAG.decode()}")
    cls = _BY_CMD.get(head[4])
    if cls is None:
        raise ProtocolError(f"unknown command byte {head[4]}")
    if cls.CMD not in allowed:
        raise ProtocolError(f"{cls.__name__} is not taken here")
    if len(frames) - 2 > cls.MAX_BULK:
        raise ProtocolError(f"{cls.__name__} carries at most {cls.MAX_BULK} bulk frames, got {len(frames) - 2}")
    raw = frames[1]
    if len(raw) > cls.MAX_HEADER:
        raise ProtocolError(f"{cls.__name__} header of {len(raw)} bytes is over the limit of {cls.MAX_HEADER}")
    kwargs = _typed_header(cls, raw)
    if kwargs is None:
        kwargs = _checked_header(cls, raw)
    msg = cls(**kwargs, frames=list(frames[2:]))
    if check_frames:
        msg.check_frames()
    return msg


def _typed_header(cls: type[Message], raw) -> dict | None:
    """The header's fields, decoded by msgspec into the message's field types in C (a Ping's in 0.2 us warm,
    against 2.5 us to unpack a dict and check each field here; decode is on every hop of every message,
    see perf/results/README.md, "Round trip"), then the fields' rules. None if anything is off, or if a
    value holds what msgpack.unpackb would make differently (see _plain): _checked_header then refuses the
    header with its reason, or takes it as it always did."""
    try:
        hdr = cls._typed.decode(raw)
    except Exception:  # msgspec.DecodeError, ValidationError; RecursionError on deep nesting
        return None
    kwargs = {}
    for name, rule_ok, nests in cls._rules:
        v = getattr(hdr, name)
        if v is msgspec.UNSET:
            continue
        if (rule_ok is not None and not rule_ok(v)) or (nests and not _plain(v)):
            return None
        kwargs[name] = v
    return kwargs


def _checked_header(cls: type[Message], raw) -> dict:
    """The header's fields, each checked here; raises ProtocolError naming the first fault."""
    hdr = _unpackb(raw, f"{cls.__name__} header")
    if not isinstance(hdr, dict):
        raise ProtocolError(f"{cls.__name__} header must be a map, got {type(hdr).__name__}")
    kwargs = {}
    for name, check, required, tname in cls._fields:
        if name in hdr:
            v = hdr[name]
            if not check(v):
                raise ProtocolError(f"{cls.__name__}.{name} must be {tname}, got {_show(v)}")
            kwargs[name] = v
        elif required:
            raise ProtocolError(f"{cls.__name__} is missing field `{name}`")
    if len(kwargs) != len(hdr):
        extra = [_show(k) for k in hdr if k not in kwargs]
        raise ProtocolError(f"{cls.__name__} has unknown field(s) {', '.join(extra[:8])}")
    return kwargs


_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def _plain(v) -> bool:
    """Whether a field value that msgspec decoded untyped is what msgpack.unpackb gives too: maps with str or
    bytes keys (unpackb's strict_map_key), lists and scalars, no extension types (msgspec makes Ext and
    datetime of those), nested within MAX_DEPTH as a header's field (walked without recursion)."""
    stack = [(v, 1)]
    while stack:
        x, depth = stack.pop()
        if type(x) is dict:
            if not all(type(k) is str or type(k) is bytes for k in x):
                return False
            x = x.values()
        elif type(x) is not list:
            if type(x) not in _SCALARS:
                return False
            continue
        if depth >= MAX_DEPTH:
            return False
        for y in x:
            if type(y) is dict or type(y) is list:
                stack.append((y, depth + 1))
            elif type(y) not in _SCALARS:
                return False
    return True


def ids_of(frames: list) -> tuple[list[str], str | None]:
    """Best effort: the request ids (rid, or a batch's rids) and cid of a message that failed to decode, so
    that the error reply, or the failure of the requests it was for, can name them. Headers over
    MAX_HEADER_BYTES are not read."""
    if len(frames) < 2 or len(frames[1]) > MAX_HEADER_BYTES:
        return [], None
    try:
        hdr = _unpackb(frames[1], "header")
    except ProtocolError:
        return [], None
    if not isinstance(hdr, dict):
        return [], None
    ok = lambda v: isinstance(v, str) and _is_id(v)
    rids = hdr.get("rids") if isinstance(hdr.get("rids"), list) else [hdr.get("rid")]
    cid = hdr.get("cid")
    return [r for r in rids[:MAX_IDS] if ok(r)], (cid if ok(cid) else None)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 40, 40, 4, 4


def _show(v) -> str:
    """A value for an error text: its type and a short, shallow repr (keys of any msgpack type can be here)."""
    return f"{type(v).__name__} {_REPR.repr(v)}"


# Which commands each hop takes: decode refuses the rest before unpacking anything.
CLIENT_TO_BROKER = frozenset({Cmd.GENERATE, Cmd.ABORT, Cmd.ABORT_ALL, Cmd.LOAD_WEIGHTS, Cmd.WEIGHTS_BUCKET,
                              Cmd.WEIGHTS_END, Cmd.READ_WEIGHTS, Cmd.SLEEP, Cmd.WAKE, Cmd.PAUSE, Cmd.RESUME, Cmd.STATUS, Cmd.PING})
WORKER_TO_BROKER = frozenset({Cmd.READY, Cmd.HEARTBEAT, Cmd.DISCONNECT, Cmd.TOKENS, Cmd.FINISHED, Cmd.REPLY,
                              Cmd.ERROR})
BROKER_TO_WORKER = frozenset({Cmd.HEARTBEAT, Cmd.DISCONNECT, Cmd.GENERATE, Cmd.ABORT, Cmd.ABORT_ALL,
                              Cmd.LOAD_WEIGHTS, Cmd.WEIGHTS_BUCKET, Cmd.WEIGHTS_END, Cmd.READ_WEIGHTS, Cmd.SLEEP,
                              Cmd.WAKE,
                              Cmd.PAUSE, Cmd.RESUME, Cmd.PING})
BROKER_TO_CLIENT = frozenset({Cmd.TOKENS, Cmd.FINISHED, Cmd.REPLY, Cmd.ERROR})
ANY = frozenset(Cmd)


# ------------------------------------------------------------------------------------- field validators

SAMPLING_FIELDS: dict[str, tuple] = {
    # name: (types, check, what the check means)
    "n": (int, lambda v: 1 <= v <= MAX_N, f"between 1 and {MAX_N}"),
    "temperature": (float, lambda v: v >= 0, ">= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= -1, ">= -1 (0 or -1: off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "max_tokens": (int, lambda v: v >= 1, ">= 1"),
    "min_tokens": (int, lambda v: v >= 0, ">= 0"),
    "stop": (list, lambda v: all(isinstance(s, str) and s for s in v), "a list of non-empty strings"),
    "stop_token_ids": (list, lambda v: all(isinstance(t, int) and t >= 0 for t in v), "a list of token ids"),
    "seed": (int, lambda v: True, "an integer"),
    "ignore_eos": (bool, lambda v: True, "true or false"),
    "logprobs": (bool, lambda v: True, "true or false"),
    "presence_penalty": (float, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (float, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "repetition_penalty": (float, lambda v: v > 0, "> 0"),
}


def check_sampling(s: dict) -> dict:
    """Validate sampling options (None means default and is dropped); raises BadRequest naming the field."""
    out = {}
    for k, v in s.items():
        spec = SAMPLING_FIELDS.get(k)
        if spec is None:
            raise BadRequest(f"unknown sampling option `{k}`; known: {', '.join(SAMPLING_FIELDS)}")
        if v is None:
            continue
        tp, ok, what = spec
        if k == "stop" and isinstance(v, str):
            v = [v]
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)) or not ok(v):
            raise BadRequest(f"sampling option `{k}` must be {what}, got {v!r}")
        out[k] = v
    return out


def check_chat(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("a chat prompt is a non-empty list of {role, content} maps")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRequest("each chat message needs string `role` and `content`")


def _frame_len(frame, dtype: np.dtype, what: str) -> int:
    nbytes = len(frame)
    if nbytes > MAX_FRAME_BYTES:
        raise ProtocolError(f"{what}: frame of {nbytes} bytes is over the limit of {MAX_FRAME_BYTES}")
    if nbytes % dtype.itemsize:
        raise ProtocolError(f"{what}: {nbytes} bytes is not a whole number of {dtype.name}")
    return nbytes // dtype.itemsize


# ------------------------------------------------------------------------------------------ bulk helpers

def _struct(values, code: str) -> bytes:
    # struct is the fastest way from a list of Python numbers to bytes (perf/results/README.md), and "<"
    # fixes the wire's byte order and sizes whatever the machine's C types
    return struct.pack(f"<{len(values)}{code}", *values)


def _packed(values, code: str):
    """Numbers as wire bytes ("i" int32, "f" float32); what is packed already passes as it is."""
    return values if isinstance(values, (bytes, memoryview)) else _struct(values, code)


def pack_ids(ids) -> bytes:
    """Token ids (list, tuple or numpy array) as one little-endian int32 frame."""
    if isinstance(ids, (list, tuple)):
        return _struct(ids, "i")
    return np.asarray(ids, dtype=TOKEN_DTYPE).tobytes()


def unpack_ids(frame) -> list[int]:
    return np.frombuffer(frame, dtype=TOKEN_DTYPE).tolist()


# ------------------------------------------------------------------------------------------- registration

def _checker(tp) -> typing.Callable[[Any], bool]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda v: True
    if origin is Union or origin is types.UnionType:
        subs = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(c(v) for c in subs)
    if tp is type(None):
        return lambda v: v is None
    if tp is int:
        return lambda v: type(v) is int
    if tp is float:
        return lambda v: type(v) in (int, float)
    if tp in (str, bytes, bool, dict, list):
        return lambda v: isinstance(v, tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        c = _checker(inner)
        return lambda v: isinstance(v, list) and all(c(x) for x in v)
    if origin is dict:
        return lambda v: isinstance(v, dict)
    raise TypeError(f"protocol field type {tp!r} has no wire checker")


def _wire_type(tp):
    """The type msgspec decodes a field as: what _checker(tp) takes (a float field takes an int, kept an int)."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return Union[tuple(_wire_type(a) for a in typing.get_args(tp))]
    if origin is list:
        return list[_wire_type(typing.get_args(tp)[0])]
    if origin is dict:
        return dict
    if tp is float:
        return Union[int, float]
    return tp


def _nests(tp) -> bool:
    """Whether a field of this type can hold lists or maps that msgspec decodes untyped (see _plain)."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return any(_nests(a) for a in typing.get_args(tp))
    if origin is list:
        return _nests(typing.get_args(tp)[0])
    return tp in (list, dict, Any) or origin is dict


def _typed_decoder(name: str, fields: list) -> msgspec.msgpack.Decoder:
    """A decoder of the header as a struct of these (name, type, required) fields, refusing unknown ones;
    a field left out is UNSET, and gets the message's own default."""
    spec = [(n, _wire_type(tp)) if required else (n, Union[_wire_type(tp), msgspec.UnsetType], msgspec.UNSET)
            for n, tp, required in fields]
    return msgspec.msgpack.Decoder(msgspec.defstruct(f"{name}Header", spec, kw_only=True,
                                                     forbid_unknown_fields=True))


def _and(type_ok, rule_ok):
    return lambda v: type_ok(v) and bool(rule_ok(v))


def _register() -> None:
    mod = sys.modules[__name__]
    for cmd in Cmd:
        name = "".join(p.capitalize() for p in cmd.name.split("_"))
        cls = getattr(mod, name, None)
        assert cls is not None and issubclass(cls, Message), f"Cmd.{cmd.name} needs a message class {name}"
        assert cls.CMD is cmd, f"{name}.CMD must be Cmd.{cmd.name}"
        hints = typing.get_type_hints(cls)
        fields, rules, typed = [], [], []
        for f in dataclasses.fields(cls):
            if f.name == "frames":
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            tp = hints[f.name]
            check, what = _checker(tp), getattr(tp, "__name__", str(tp))
            rule_ok = f.metadata["rule"][0] if "rule" in f.metadata else None
            if rule_ok is not None:
                check = _and(check, rule_ok)
                what = f"{what}, {f.metadata['rule'][1]}"
            fields.append((f.name, check, required, what))
            rules.append((f.name, rule_ok, _nests(tp)))
            typed.append((f.name, tp, required))
        cls._fields, cls._rules, cls._typed = tuple(fields), tuple(rules), _typed_decoder(name, typed)
        cls._names = tuple(f[0] for f in fields)
        _BY_CMD[int(cmd)] = cls
        _HEAD[cmd] = TAG + bytes([int(cmd)])


_register()
