"""What a trainer imports: `Client` (blocking) and `AsyncClient` (asyncio), both speaking to the broker.

    from rolloutd import Client
    with Client("tcp://127.0.0.1:5555", timeout=600) as c:
        results = c.generate(["What is 2+2?"], n=4, temperature=1.0, max_tokens=64)
        results[0].samples[3].token_ids

A prompt is text, a list of token ids, or chat messages ([{"role": ..., "content": ...}]). Every call
has a timeout and raises a typed error from rolloutd.errors: WorkerLost, Busy, BadRequest,
RequestTimeout, BrokerUnreachable, ... When some prompts of a generate call fail, the error raised is
the first one, and `err.results` holds every prompt's Result (None where it failed), so nothing that
was generated is lost.

One Client (one socket) per thread; to abort from elsewhere while a generate call blocks, use a second
Client, or AsyncClient, whose calls run side by side on one connection.

A call ends at once with BrokerUnreachable when the connection to the broker drops (the broker stopped or
restarted: what it held is gone); the same client object works again once a broker is back at the address.
With keys (`keys=DIR` or $ROLLOUTD_KEYS, see rolloutd.auth) the connection is CurveZMQ, as the broker's.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
import uuid
from typing import AsyncIterator, Iterator, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from . import auth, config, sockets, weights
from . import protocol as p
from .errors import BadRequest, BrokerUnreachable, ProtocolError, RequestTimeout, RolloutdError, from_code
from .results import Delta, Reply, Result, deltas_from_message, from_finished, reply_from_message

DEFAULT_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 5.0
_STREAM_QUEUE = 4096  # stream deltas buffered per request before the reader waits for the consumer


class _Base:
    """What both clients share: the socket's set-up, ids, and turning calls into messages."""

    def __init__(self, address: str, timeout: float, connect_timeout: float, keys: str | None, ctx):
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.sock = sockets.new(ctx, zmq.DEALER)
        # Queue messages only on a live connection: a broker that is not there shows up as BrokerUnreachable
        # (a send that times out) instead of a call that waits for nothing.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        keys = auth.keys_dir(keys)
        if keys:
            auth.make_client(self.sock, keys, "client")
        # A dropped connection means the broker lost what this client had sent: the calls waiting end at once.
        self.events = sockets.monitor(self.sock)
        self._refused = False  # the broker refused our key (CURVE): say so, not "unreachable"
        self.sock.connect(address)
        self._prefix = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}-"
        self._count = itertools.count()
        self._staging: dict[str, weights.Staging] = {}  # device -> this client's two weight buffers there

    def new_id(self) -> str:
        return self._prefix + str(next(self._count))

    def _close_sockets(self) -> None:
        for st in self._staging.values():
            st.close()
        self._staging.clear()
        self.sock.disable_monitor()
        self.events.close(0)
        self.sock.close(0)

    def _dropped(self) -> bool:
        """Whether the connection to the broker dropped since last asked (reads the monitor's events)."""
        if not sockets.readable(self.events):
            return False  # the common case, without a receive that raises
        dropped = False
        while True:
            try:
                event = parse_monitor_message(self.events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return dropped
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused = True
            dropped = dropped or event["event"] == zmq.EVENT_DISCONNECTED

    def _lost(self) -> BrokerUnreachable:
        return BrokerUnreachable(f"the connection to the broker at {self.address} dropped (it stopped or restarted); "
                                 "what it held for this call is gone")

    def _unreachable(self) -> BrokerUnreachable:
        self._dropped()
        if self._refused:
            return BrokerUnreachable(f"the broker at {self.address} refused this client's key: is its public key "
                                     f"in the broker's clients/ folder, and broker.key the broker's? (rolloutd keys)")
        return BrokerUnreachable(f"could not reach a broker at {self.address}")

    def _generate_msgs(self, prompts, request_ids, stream: bool, sampling: dict, timeout_s: float) -> list[p.Generate]:
        if isinstance(prompts, (str, np.ndarray)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            raise BadRequest("generate takes a list of prompts; wrap a single prompt in a list")
        sampling = p.check_sampling(sampling)
        if request_ids is not None and len(request_ids) != len(prompts):
            raise BadRequest(f"{len(prompts)} prompts but {len(request_ids)} request ids")
        if request_ids is not None and len(set(request_ids)) != len(request_ids):
            raise BadRequest("request ids repeat within one call")
        msgs = []
        for i, prompt in enumerate(prompts):
            rid = request_ids[i] if request_ids is not None else self.new_id()
            msgs.append(_generate_msg(rid, prompt, sampling, stream, timeout_s))
        return msgs

    def _update_flow(self, named_tensors, version: int, status: dict, deadline: float, *, bucket_bytes: int,
                     pause: str, atomic: bool, wake: bool, workers, started: float):
        named = weights.named_list(named_tensors)
        device = named[0][1].device
        staging = self._staging.get(str(device))
        if staging is None:
            staging = self._staging[str(device)] = weights.Staging(device)
        to = weights.targets(status, staging.key, workers)
        return weights.steps(named, version, staging, to, self.new_id, bucket_bytes=bucket_bytes, pause=pause,
                             atomic=atomic, wake=wake, timeout_s=max(1.0, deadline - time.monotonic()),
                             started=started)

    def _path_msg(self, path: str, version: int, deadline: float, *, pause: str, wake: bool, workers) -> p.LoadWeights:
        return p.LoadWeights(cid=self.new_id(), update=uuid.uuid4().hex[:16], version=version, source="path",
                             path=os.path.abspath(path), workers=list(workers or []), pause=pause, wake=wake,
                             timeout_s=max(1.0, deadline - time.monotonic()))

    def _timeout(self, timeout: float | None) -> float:
        t = self.timeout if timeout is None else timeout
        if not 0 < t <= p.MAX_TIMEOUT_S:
            raise BadRequest(f"timeout must be in (0, {p.MAX_TIMEOUT_S:.0f}] seconds, got {t}")
        return t


def _generate_msg(rid: str, prompt, sampling: dict, stream: bool, timeout_s: float) -> p.Generate:
    kw = dict(rid=rid, sampling=sampling, stream=stream, timeout_s=timeout_s)
    if isinstance(prompt, str):
        return p.Generate(prompt=prompt, **kw)
    if isinstance(prompt, np.ndarray) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (int, np.integer))):
        return p.Generate(frames=[p.pack_ids(prompt)], **kw)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        p.check_chat(prompt)
        return p.Generate(prompt=prompt, **kw)
    raise BadRequest(f"a prompt is text, a non-empty list of token ids or chat messages; got {type(prompt).__name__}")


def _received(frames: list) -> list:
    """What one received message means to the calls waiting: a Result per request a Finished message
    ended, or the message itself. One that cannot be decoded, or does not add up, becomes a ProtocolError
    for each request or call it names, so that those fail now instead of at their timeout."""
    try:
        msg = p.decode(frames, p.BROKER_TO_CLIENT)
        return from_finished(msg) if msg.CMD is p.Cmd.FINISHED else [msg]
    except RolloutdError as e:
        rids, cid = p.ids_of(frames)
        text = f"an undecodable answer came for it: {e}"[:2000]
        return ([p.Error(code=ProtocolError.code, message=text, rid=rid) for rid in rids]
                + ([p.Error(code=ProtocolError.code, message=text, cid=cid)] if cid else []))


def _key(msg: p.Message | Result) -> str | None:
    """The id an answer is for: a Result's request id, a message's rid or cid."""
    if isinstance(msg, Result):
        return msg.request_id
    return getattr(msg, "rid", None) or getattr(msg, "cid", None)


def _error(msg: p.Error) -> RolloutdError:
    return from_code(msg.code, msg.message, request_id=msg.rid)


def _reply(msg) -> Reply:
    if msg.CMD is p.Cmd.ERROR:
        raise _error(msg)
    return reply_from_message(msg)


def _read_reply(reply: Reply) -> dict:
    if not reply.ok:
        name, w = next(iter(reply.errors.items()), ("?", None))
        raise from_code(w.error if w else "internal", f"read_weights failed on worker {name}: {w.message if w else ''}")
    return reply.workers


def _finish(rids: list[str], results: dict, errors: dict) -> list[Result]:
    ordered = [results.get(r) for r in rids]
    if errors:
        first = errors[next(r for r in rids if r in errors)]
        first.results = ordered
        first.errors = errors
        raise first
    return ordered


class Client(_Base):
    """Blocking client. Not thread-safe: one per thread."""

    def __init__(self, address: str = config.FRONT, *, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S, keys: str | None = None):
        super().__init__(address, timeout, connect_timeout, keys, zmq.Context.instance())
        self._sndtimeo = -1  # the send timeout set on the socket (ms)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self.events, zmq.POLLIN)

    def close(self) -> None:
        self._close_sockets()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self, timeout: float | None) -> float:
        """A call begins: connection drops from before it are no concern of it. Returns its deadline."""
        deadline = time.monotonic() + self._timeout(timeout)
        self._dropped()
        return deadline

    def _send(self, msg: p.Message, deadline: float) -> None:
        """Send, waiting for a connection at most connect_timeout and never past the call's deadline."""
        wait_ms = max(0, int(min(self.connect_timeout, deadline - time.monotonic()) * 1000))
        if wait_ms != self._sndtimeo:  # most calls wait the same: no option call on their way
            self.sock.setsockopt(zmq.SNDTIMEO, wait_ms)
            self._sndtimeo = wait_ms
        try:
            sockets.send(self.sock, p.encode(msg), copy=False)
        except zmq.Again:
            raise self._unreachable() from None

    def _recv(self, deadline: float) -> list | None:
        """What the next message means (see _received), or None at the deadline; BrokerUnreachable at once
        if the connection drops. Messages that name nothing waiting are skipped by the callers."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready = dict(self._poller.poll(left * 1000))
            if self.events in ready and self._dropped():
                raise self._lost()
            if self.sock in ready:
                return _received(sockets.recv(self.sock, zmq.NOBLOCK))  # poll said one is there

    def _timed_out(self, what: str, rids: Sequence[str] = ()) -> RolloutdError:
        if rids:  # nobody will wait for these any more: free the engine (best effort, never blocks)
            try:
                self.sock.send_multipart(p.encode(p.Abort(cid=self.new_id(), rids=list(rids))), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return RequestTimeout(f"{what} did not finish in time")

    # ------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence, *, timeout: float | None = None,
                 request_ids: Sequence[str] | None = None, **sampling) -> list[Result]:
        """Generate for every prompt; returns one Result per prompt, in order.

        sampling: n, temperature, top_p, top_k, min_p, max_tokens, min_tokens, stop, stop_token_ids, seed,
        ignore_eos, logprobs (True: each sampled token's logprob), presence/frequency/repetition_penalty.
        """
        t = self._timeout(timeout)
        msgs = self._generate_msgs(prompts, request_ids, False, sampling, t)
        deadline = self._start(t)
        for m in msgs:
            self._send(m, deadline)
        rids = [m.rid for m in msgs]
        waiting = set(rids)
        results, errors = {}, {}
        while waiting:
            got = self._recv(deadline)
            if got is None:
                raise self._timed_out(f"generate of {len(rids)} prompt(s)", list(waiting))
            for m in got:
                rid = _key(m)
                if rid not in waiting:
                    continue  # a late answer to an earlier call
                if isinstance(m, Result):
                    results[rid] = m
                    waiting.discard(rid)
                elif m.CMD is p.Cmd.ERROR:
                    errors[rid] = _error(m)
                    waiting.discard(rid)
        return _finish(rids, results, errors)

    def stream(self, prompt, *, timeout: float | None = None, request_id: str | None = None,
               **sampling) -> Iterator[Delta | Result]:
        """Yield a Delta per engine step as tokens arrive, then the final Result."""
        t = self._timeout(timeout)
        (msg,) = self._generate_msgs([prompt], [request_id] if request_id else None, True, sampling, t)
        deadline = self._start(t)
        self._send(msg, deadline)
        while True:
            got = self._recv(deadline)
            if got is None:
                raise self._timed_out("stream", [msg.rid])
            for m in got:
                if _key(m) != msg.rid:
                    continue
                if isinstance(m, Result):
                    yield m
                    return
                if m.CMD is p.Cmd.TOKENS:
                    yield from deltas_from_message(m)
                elif m.CMD is p.Cmd.ERROR:
                    raise _error(m)

    # ----------------------------------------------------------------------------------------- control

    def _call(self, msg, timeout: float | None = None) -> Reply:
        deadline = self._start(timeout)
        self._send(msg, deadline)
        while True:
            got = self._recv(deadline)
            if got is None:
                raise RequestTimeout(f"{type(msg).__name__} got no answer in time")
            for m in got:
                if not isinstance(m, Result) and getattr(m, "cid", None) == msg.cid:
                    return _reply(m)

    def abort(self, request_ids: Sequence[str], timeout: float | None = None) -> Reply:
        """Abort these requests (their callers get partial outputs, finish_reason "abort"). The Reply names ids
        that were unknown or already finished in data["unknown"]; each worker's count in workers[name].data."""
        return self._call(p.Abort(cid=self.new_id(), rids=list(request_ids)), timeout)

    def abort_all(self, timeout: float | None = None) -> Reply:
        """Abort everything in flight on every worker; each worker's count in workers[name].data["aborted"]."""
        return self._call(p.AbortAll(cid=self.new_id()), timeout)

    def status(self, timeout: float | None = CONNECT_TIMEOUT_S) -> dict:
        """The broker's worker table: {"workers": [{id, model, devices, inflight, capacity, weight_version,
        pid, engine}], "pending": n, "requests": n}."""
        try:
            return self._call(p.Status(cid=self.new_id()), timeout).data
        except RequestTimeout:
            raise BrokerUnreachable(f"no answer from a broker at {self.address}") from None

    def ping(self, target: str = "worker", timeout: float | None = CONNECT_TIMEOUT_S) -> dict:
        """A round trip to the broker ("broker") or through it to a worker ("worker", or a worker id)."""
        return self._call(p.Ping(cid=self.new_id(), target=target), timeout).data

    def pause(self, mode: str = "abort", refuse: bool = False, timeout: float | None = None) -> Reply:
        """Pause every worker. mode "abort": abort in flight (partial outputs returned); "wait": let in
        flight finish (returns once drained); "keep": freeze in flight and continue them on resume. In
        modes abort and wait, the results of the requests it ended reach this client before the reply.
        New requests wait until resume, or with refuse=True fail with Paused."""
        return self._call(p.Pause(cid=self.new_id(), mode=mode, refuse=refuse), timeout)

    def resume(self, timeout: float | None = None) -> Reply:
        return self._call(p.Resume(cid=self.new_id()), timeout)

    def sleep(self, level: int = 1, timeout: float | None = None) -> Reply:
        """vLLM sleep mode on every worker (level 1 offloads weights, 2 drops them). Workers that cannot
        (CPU engines, sleep mode off) answer ok=False with error "unsupported"."""
        return self._call(p.Sleep(cid=self.new_id(), level=level), timeout)

    def wake_up(self, tags: Sequence[str] = (), timeout: float | None = None) -> Reply:
        """Wake every worker; tags ("weights", "kv_cache") pick what comes back first, none means all."""
        return self._call(p.Wake(cid=self.new_id(), tags=list(tags)), timeout)

    # ------------------------------------------------------------------------------------------ weights

    def update_weights(self, named_tensors, version: int, *, bucket_bytes: int = weights.DEFAULT_BUCKET_BYTES,
                       pause: str = "wait", atomic: bool = True, wake: bool = False, workers=None,
                       timeout: float | None = None) -> dict:
        """Hand new weights to the workers beside this process and have them serve them as `version`.

        named_tensors: a dict or (name, tensor) pairs (model.named_parameters() works), all on one device,
        named as in the HF checkpoint. Tensors on a GPU go to the workers on that GPU by CUDA IPC; tensors
        in CPU memory to the workers on this host by shared memory. Nothing is copied through the broker.
        A worker whose ranks use several GPUs (tensor parallel) takes the update from one trainer process
        per GPU, each calling update_weights with its own tensors there and the same version; each engine
        rank reads the trainer beside it, and the update commits once every one of them has sent all.
        pause: how generation pauses meanwhile ("wait": let requests finish; "abort"; "keep": freeze them).
        atomic: workers keep the new tensors aside until the set is whole, so a failure leaves the old
        weights serving; False loads each bucket straight in (faster, no extra memory), and a failure
        part-way leaves those workers refusing requests (WeightsIncomplete) until a complete update lands.
        wake: a sleeping worker wakes first (else the update fails with Paused). workers: worker names, if
        not every reachable one. Returns {worker: what it reported, with "trainer_ms": where this call's
        time went here (prepare: status and manifest; begin: until the workers began, the first two
        buckets packed meanwhile; buckets: from then to the last bucket's answer; pack: copying into the
        buffers, of all buckets; commit)}. Raises the typed error of the first
        failure (BadRequest for tensors the model does not have as sent, WorkerLost, RequestTimeout...),
        after every worker has dropped the update."""
        started = time.perf_counter()
        deadline = self._start(timeout)
        flow = self._update_flow(named_tensors, version, self.status(), deadline, bucket_bytes=bucket_bytes,
                                 pause=pause, atomic=atomic, wake=wake, workers=workers, started=started)
        return self._drive(flow, deadline)

    def load_weights_from_path(self, path: str, version: int, *, pause: str = "wait", wake: bool = False,
                               workers=None, timeout: float | None = None) -> Reply:
        """Every worker (or those named) loads a HF safetensors folder from its own disk, as `version`."""
        deadline = self._start(timeout)
        msg = self._path_msg(path, version, deadline, pause=pause, wake=wake, workers=workers)
        self._send(msg, deadline)
        return _reply(weights.check(self._answer(msg.cid, deadline, {}), "load from path"))

    def read_weights(self, names: Sequence[str], count: int = 8, workers=None, timeout: float | None = None) -> dict:
        """A round trip of weights for tests: {worker: [per engine rank {name: {"head": first `count` values,
        "sum", "numel"}}]} of the named parameters (vLLM's names: fused ones like qkv_proj differ from HF's)."""
        msg = p.ReadWeights(cid=self.new_id(), names=list(names), count=count, workers=list(workers or []))
        return {w: r.data["ranks"] for w, r in _read_reply(self._call(msg, timeout)).items()}

    def _answer(self, cid: str, deadline: float, early: dict):
        """The reply for cid (replies for other cids that come first wait in `early`)."""
        while cid not in early:
            got = self._recv(deadline)
            if got is None:
                raise RequestTimeout("a weight update step got no answer in time")
            for m in got:
                if not isinstance(m, Result) and getattr(m, "cid", None):
                    early[m.cid] = m
        return early.pop(cid)

    def _drive(self, flow, deadline: float):
        """Run a weights.steps flow: send its messages, answer its waits; errors go back into it."""
        early: dict = {}
        answer = None
        while True:
            try:
                step = flow.throw(answer) if isinstance(answer, BaseException) else flow.send(answer)
            except StopIteration as stop:
                return stop.value
            answer = None
            try:
                if isinstance(step, weights.Send):
                    self._send(step.msg, deadline)
                else:
                    answer = self._answer(step.cid, deadline if not step.quiet else max(deadline, time.monotonic() + 5), early)
            except RolloutdError as e:
                answer = None if getattr(step, "quiet", False) else e

    def wait_for_workers(self, count: int, timeout: float = 300.0) -> dict:
        """Block until at least `count` workers are registered (engines take a while to start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.status(timeout=min(CONNECT_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
                if len(st["workers"]) >= count:
                    return st
            except BrokerUnreachable:
                pass
            if time.monotonic() > deadline:
                raise RequestTimeout(f"fewer than {count} worker(s) registered within {timeout:.0f} s")
            time.sleep(0.25)


class _Gather:
    """What one AsyncClient.generate call waits for: answers land here by request id, and one future wakes
    the call when the last is in (not a future per request: 512 aborted requests answer at once)."""
    __slots__ = ("got", "want", "done")

    def __init__(self, rids: list[str], done: asyncio.Future):
        self.got: dict = {}
        self.want = len(rids)
        self.done = done

    def put(self, rid: str, msg) -> None:
        self.got.setdefault(rid, msg)
        if len(self.got) == self.want and not self.done.done():
            self.done.set_result(None)


class AsyncClient(_Base):
    """asyncio client: any number of calls may run at once on one connection.

    The socket is read from a callback on its file descriptor and every message is routed to the future
    (or stream queue) of its id, with no per-message futures of pyzmq's own: aborting 512 requests
    returns 512 results at once, and that path must stay cheap.
    """

    def __init__(self, address: str = config.FRONT, *, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S, keys: str | None = None):
        super().__init__(address, timeout, connect_timeout, keys, zmq.Context.instance())
        self._waiters: dict[str, asyncio.Future | asyncio.Queue | _Gather] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parked: collections.deque = collections.deque()  # read, not yet delivered (a stream queue was full)
        self._poll_handle: asyncio.TimerHandle | None = None
        self._drops = 0  # connection drops seen: a stream that started before the last one has lost its request

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.getsockopt(zmq.FD))
            self._loop.remove_reader(self.events.getsockopt(zmq.FD))
            if self._poll_handle is not None:
                self._poll_handle.cancel()
        self._close_sockets()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _attach(self) -> None:
        """On first use, inside the running loop: read the socket and its connection events from callbacks."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._dropped()  # drops before any call concern none
            self._loop.add_reader(self.sock.getsockopt(zmq.FD), self._on_readable)
            self._loop.add_reader(self.events.getsockopt(zmq.FD), self._on_events)
            self._safety_poll()

    def _deadline(self, timeout: float | None) -> float:
        self._attach()
        return time.monotonic() + self._timeout(timeout)

    async def _send(self, msg: p.Message, deadline: float) -> None:
        """Send, waiting for a connection at most connect_timeout and never past the call's deadline."""
        frames = p.encode(msg)
        give_up = min(deadline, time.monotonic() + self.connect_timeout)
        while True:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:  # no live connection yet (IMMEDIATE), or the broker is not reading
                if time.monotonic() > give_up:
                    raise self._unreachable() from None
                await asyncio.sleep(0.005)
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._on_readable)  # a send can swallow the FD's edge for arrivals

    def _safety_poll(self) -> None:
        """The FDs are edge-triggered: read now and then anyway, so that nothing can sit unnoticed."""
        self._on_readable()
        self._on_events()
        self._poll_handle = self._loop.call_later(0.1, self._safety_poll)

    def _on_events(self) -> None:
        """The connection dropped: every call waiting now ends with BrokerUnreachable (the broker lost them)."""
        if not self._dropped():
            return
        self._drops += 1
        for key, w in list(self._waiters.items()):
            if isinstance(w, _Gather):
                w.put(key, self._lost())
            elif isinstance(w, asyncio.Queue):
                if not w.full():
                    w.put_nowait(None)  # wakes the stream, which then sees the drop
            elif not w.done():
                w.set_exception(self._lost())

    def _on_readable(self) -> None:
        while True:
            while self._parked:
                if not self._deliver(self._parked[0]):
                    # A stream consumer fell behind: stop reading until it catches up. Its queue stays
                    # bounded, this holds at most one message's worth, and the socket's high-water mark
                    # pushes back on the broker.
                    return
                self._parked.popleft()
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            self._parked.extend(_received(frames))

    def _deliver(self, msg: p.Message | Result) -> bool:
        """Hand a message or a Result to whoever waits for its id; False: a full stream queue."""
        key = _key(msg)
        w = self._waiters.get(key)
        if isinstance(w, _Gather):
            w.put(key, msg)
        elif isinstance(w, asyncio.Queue):
            if w.full():
                return False
            w.put_nowait(msg)
        elif w is not None and not w.done():
            w.set_result(msg)
        return True

    async def generate(self, prompts: Sequence, *, timeout: float | None = None,
                       request_ids: Sequence[str] | None = None, **sampling) -> list[Result]:
        """As Client.generate."""
        deadline = self._deadline(timeout)
        msgs = self._generate_msgs(prompts, request_ids, False, sampling, self._timeout(timeout))
        rids = [m.rid for m in msgs]
        gather = _Gather(rids, asyncio.get_running_loop().create_future())
        try:
            for m in msgs:
                self._waiters[m.rid] = gather
                await self._send(m, deadline)
            await asyncio.wait([gather.done], timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for rid in rids:
                self._waiters.pop(rid, None)
        done, late = gather.got, [r for r in rids if r not in gather.got]
        results, errors = {}, {}
        for rid, msg in done.items():
            if isinstance(msg, Result):
                results[rid] = msg
            elif isinstance(msg, RolloutdError):
                errors[rid] = msg
            else:
                errors[rid] = _error(msg)
        for rid in late:
            errors[rid] = RequestTimeout(f"request {rid} did not finish in time", request_id=rid)
        if late:
            self._abort_nowait(late)
        return _finish(rids, results, errors)

    def _abort_nowait(self, rids: list[str]) -> None:
        """Nobody waits for these any more: free the engine (best effort, never blocks)."""
        try:
            self.sock.send_multipart(p.encode(p.Abort(cid=self.new_id(), rids=rids)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    async def stream(self, prompt, *, timeout: float | None = None, request_id: str | None = None,
                     **sampling) -> AsyncIterator[Delta | Result]:
        """Yield a Delta per engine step as tokens arrive, then the final Result."""
        deadline = self._deadline(timeout)
        (msg,) = self._generate_msgs([prompt], [request_id] if request_id else None, True, sampling,
                                     self._timeout(timeout))
        q: asyncio.Queue = asyncio.Queue(_STREAM_QUEUE)
        self._waiters[msg.rid] = q
        drops = self._drops
        try:
            await self._send(msg, deadline)
            while True:
                try:
                    m = await asyncio.wait_for(q.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    self._abort_nowait([msg.rid])
                    raise RequestTimeout("stream did not finish in time", request_id=msg.rid) from None
                if self._drops != drops:
                    raise self._lost()
                if self._parked:
                    self._loop.call_soon(self._on_readable)  # room again: take up reading
                if isinstance(m, Result):
                    yield m
                    return
                if m.CMD is p.Cmd.TOKENS:
                    for d in deltas_from_message(m):
                        yield d
                elif m.CMD is p.Cmd.ERROR:
                    raise _error(m)
        finally:
            self._waiters.pop(msg.rid, None)

    async def _call(self, msg, timeout: float | None = None) -> Reply:
        deadline = self._deadline(timeout)
        fut = self._waiters[msg.cid] = asyncio.get_running_loop().create_future()
        try:
            await self._send(msg, deadline)
            await asyncio.wait([fut], timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._waiters.pop(msg.cid, None)
        if not fut.done():
            raise RequestTimeout(f"{type(msg).__name__} got no answer in time")
        return _reply(fut.result())

    async def abort(self, request_ids: Sequence[str], timeout: float | None = None) -> Reply:
        return await self._call(p.Abort(cid=self.new_id(), rids=list(request_ids)), timeout)

    async def abort_all(self, timeout: float | None = None) -> Reply:
        return await self._call(p.AbortAll(cid=self.new_id()), timeout)

    async def status(self, timeout: float | None = CONNECT_TIMEOUT_S) -> dict:
        try:
            return (await self._call(p.Status(cid=self.new_id()), timeout)).data
        except RequestTimeout:
            raise BrokerUnreachable(f"no answer from a broker at {self.address}") from None

    async def ping(self, target: str = "worker", timeout: float | None = CONNECT_TIMEOUT_S) -> dict:
        return (await self._call(p.Ping(cid=self.new_id(), target=target), timeout)).data

    async def pause(self, mode: str = "abort", refuse: bool = False, timeout: float | None = None) -> Reply:
        return await self._call(p.Pause(cid=self.new_id(), mode=mode, refuse=refuse), timeout)

    async def resume(self, timeout: float | None = None) -> Reply:
        return await self._call(p.Resume(cid=self.new_id()), timeout)

    async def sleep(self, level: int = 1, timeout: float | None = None) -> Reply:
        return await self._call(p.Sleep(cid=self.new_id(), level=level), timeout)

    async def wake_up(self, tags: Sequence[str] = (), timeout: float | None = None) -> Reply:
        return await self._call(p.Wake(cid=self.new_id(), tags=list(tags)), timeout)

    async def update_weights(self, named_tensors, version: int, *, bucket_bytes: int = weights.DEFAULT_BUCKET_BYTES,
                             pause: str = "wait", atomic: bool = True, wake: bool = False, workers=None,
                             timeout: float | None = None) -> dict:
        """As Client.update_weights."""
        started = time.perf_counter()
        deadline = self._deadline(timeout)
        flow = self._update_flow(named_tensors, version, await self.status(), deadline, bucket_bytes=bucket_bytes,
                                 pause=pause, atomic=atomic, wake=wake, workers=workers, started=started)
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future] = {}
        answer = None
        try:
            while True:
                try:
                    step = flow.throw(answer) if isinstance(answer, BaseException) else flow.send(answer)
                except StopIteration as stop:
                    return stop.value
                answer = None
                try:
                    if isinstance(step, weights.Send):
                        # waited for from now, so that an answer coming before the Wait is not missed
                        futures[step.msg.cid] = self._waiters[step.msg.cid] = loop.create_future()
                        await self._send(step.msg, deadline)
                    else:
                        fut = futures.pop(step.cid)
                        until = max(deadline, time.monotonic() + 5) if step.quiet else deadline
                        await asyncio.wait([fut], timeout=max(0.0, until - time.monotonic()))
                        self._waiters.pop(step.cid, None)
                        if not fut.done():
                            raise RequestTimeout("a weight update step got no answer in time")
                        answer = fut.result()
                except RolloutdError as e:
                    answer = None if getattr(step, "quiet", False) else e
        finally:
            for cid in futures:
                self._waiters.pop(cid, None)

    async def read_weights(self, names: Sequence[str], count: int = 8, workers=None,
                           timeout: float | None = None) -> dict:
        """As Client.read_weights."""
        msg = p.ReadWeights(cid=self.new_id(), names=list(names), count=count, workers=list(workers or []))
        return {w: r.data["ranks"] for w, r in _read_reply(await self._call(msg, timeout)).items()}

    async def load_weights_from_path(self, path: str, version: int, *, pause: str = "wait", wake: bool = False,
                                     workers=None, timeout: float | None = None) -> Reply:
        """As Client.load_weights_from_path."""
        deadline = self._deadline(timeout)
        msg = self._path_msg(path, version, deadline, pause=pause, wake=wake, workers=workers)
        fut = self._waiters[msg.cid] = asyncio.get_running_loop().create_future()
        try:
            await self._send(msg, deadline)
            await asyncio.wait([fut], timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._waiters.pop(msg.cid, None)
        if not fut.done():
            raise RequestTimeout("load_weights_from_path got no answer in time")
        return _reply(weights.check(fut.result(), "load from path"))
