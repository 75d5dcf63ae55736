"""The broker: one poll loop between trainers (front ROUTER) and vLLM workers (back ROUTER). No engine work.

It keeps a registry of workers (READY handshake, heartbeats both ways, expiry after LIVENESS silent
intervals, and at once when a worker's connection drops), a request table (request id -> client, worker)
so that an abort reaches only the owner and a lost worker's requests end at their clients with WorkerLost,
least-loaded placement (a prompt's n samples stay on one worker, sharing its prefix cache), a pending
queue bounded in count and bytes when every worker is full, deadlines that end what nobody waits for any
more, and fan-out of broadcast commands with one aggregated reply. Token and result frames are forwarded
as they came: only the small msgpack header is read, for routing.

Nothing a peer sends ends the loop: every message is handled under one guard. A malformed message is
answered with a typed error where there is a sender to answer, counted in status()["faults"] and logged
(rate-limited); a failure of the broker's own code is counted and logged with its traceback, and the
loop goes on.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import gc
import heapq
import itertools
import logging
import resource
import signal
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import auth, config, sockets
from . import protocol as p
from .errors import (BadRequest, Busy, InternalError, RequestTimeout, RolloutdError, ShuttingDown,
                     WorkerLost)
from .stopping import Stop, StopRequests

log = logging.getLogger("rolloutd.broker")

# While stopping, the loop wakes at least this often to move the stop along.
_STOP_POLL_S = 0.05
# After aborting what was left at a stop, how long partial outputs are waited for before the rest fail.
_ABORT_GRACE_S = 5.0
# After a stop has ended the work, how long the broker goes on serving before it closes: messages just
# sent to clients still leave (closing at once lost some; see perf/results/README.md).
_SETTLE_S = 1.0
# At exit, how long messages still queued may take to leave (a gone peer cannot hold the exit longer).
_FLUSH_MS = 10_000
# Messages taken from one socket per poll, so that one busy side cannot starve the other.
_BURST = 256
# Held per request besides its frames (table entries, ids): what the byte budget charges for it.
_REQUEST_OVERHEAD = 256
# Registered workers at most: every one is a row in every fan-out and placement.
_MAX_WORKERS = 1024
# Fault log lines per kind in one window; the rest are counted and summed up when the window ends.
_LOG_WINDOW_S = 10.0
_LOG_PER_WINDOW = 5

# Commands the broker sends to every worker and answers with one aggregated reply.
_FANOUT = (p.Cmd.ABORT_ALL, p.Cmd.PAUSE, p.Cmd.RESUME, p.Cmd.SLEEP, p.Cmd.WAKE, p.Cmd.LOAD_WEIGHTS,
           p.Cmd.WEIGHTS_BUCKET, p.Cmd.WEIGHTS_END, p.Cmd.READ_WEIGHTS)


@dataclass
class WorkerEntry:
    ident: bytes
    ready: p.Ready
    expiry: float
    fd: int | None = None  # its connection's socket, to drop it the moment that connection drops
    key: str | None = None  # its CURVE public key (None without keys): the name stays bound to it
    load: int = 0  # sequences (prompt x n) in flight here
    stopping: bool = False  # draining: gets nothing new, and says goodbye when done
    rids: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.ready.worker


@dataclass
class Request:
    client: bytes
    n: int
    expires: float  # its caller's deadline (monotonic): past it, the broker ends the request
    frames: list | None  # kept only while pending, to be sent once a worker frees up
    nbytes: int = 0  # what the pending request holds here, counted against the byte budgets
    worker: bytes | None = None


@dataclass
class Control:
    """A command waiting on worker replies (one for ping, every worker for broadcasts). Workers see the
    broker's own id for it, so that calls of two clients with the same cid cannot answer each other."""
    client: bytes
    cid: str  # the client's
    waiting: set  # worker idents that still owe a reply
    deadline: float
    data: dict = field(default_factory=dict)  # the broker's own part of the answer
    workers: dict = field(default_factory=dict)  # worker name -> its part (see protocol.Reply)
    ok: bool = True
    passthrough: bool = False  # forward the single worker's reply as it is (ping)
    bcid: str = ""  # the broker's id for it, which the workers see


class Faults:
    """Counts what peers got wrong and what failed here, and logs it without letting a flood fill the log:
    at most _LOG_PER_WINDOW lines per kind every _LOG_WINDOW_S, texts cut short."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._window = collections.Counter()
        self._window_end = 0.0

    def add(self, kind: str, text: str, *, exc_info: bool = False) -> None:
        self.counts[kind] += 1
        now = time.monotonic()
        if now >= self._window_end:
            for k, n in self._window.items():
                if n > _LOG_PER_WINDOW:
                    log.warning("%d more %s fault(s) in the last %.0f s not logged", n - _LOG_PER_WINDOW, k,
                                _LOG_WINDOW_S)
            self._window.clear()
            self._window_end = now + _LOG_WINDOW_S
        self._window[kind] += 1
        if self._window[kind] <= _LOG_PER_WINDOW:
            log.warning("%s: %s", kind, text[:300], exc_info=exc_info)


class Broker:
    def __init__(self, front: str = config.FRONT, back: str = config.BACK, *,
                 heartbeat_s: float = config.HEARTBEAT_S, liveness: int = config.LIVENESS,
                 max_pending: int = config.MAX_PENDING, max_pending_bytes: int = config.MAX_PENDING_BYTES,
                 max_client_bytes: int = config.MAX_CLIENT_BYTES, control_timeout_s: float = config.CONTROL_TIMEOUT_S,
                 drain_s: float = config.DRAIN_S, keys: str | None = None, insecure: bool = False,
                 ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.max_client_bytes = max_client_bytes
        self.control_timeout_s = control_timeout_s
        self.drain_s = drain_s
        for address in (front, back):
            auth.check_bind(address, keys, insecure)
        _raise_fd_limit()
        self.authenticator = auth.start_authenticator(self.ctx, keys) if keys else None
        try:
            self.front = self._bind(front, keys, auth.FRONT_DOMAIN, p.MAX_CLIENT_FRAME_BYTES)
            self.back = self._bind(back, keys, auth.BACK_DOMAIN, p.MAX_FRAME_BYTES)
        except Exception:
            if self.authenticator is not None:
                self.authenticator.stop()
            raise
        # A dropped worker connection shows here at once (a killed process, a closed socket); its requests
        # then fail without waiting out the heartbeat liveness, which is left for networks that go silent.
        self.back_events = sockets.monitor(self.back)
        self.front_address = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back_address = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[bytes, WorkerEntry] = {}
        self.requests: dict[str, Request] = {}
        self.pending: dict[str, Request] = {}  # in arrival order: placed first come, first served
        self.held_bytes = 0  # bytes of pending requests
        self.client_bytes: collections.Counter = collections.Counter()  # the same, per client
        self.deadlines: list[tuple[float, str]] = []  # heap of (expires, rid); entries of ended requests linger
        self.controls: dict[str, Control] = {}  # by the broker's own cid
        self._cids = itertools.count()
        self.faults = Faults()
        self.stops = StopRequests()
        self._drain_until: float | None = None  # set when a stop begins
        self._aborted_at: float | None = None  # when what was left got its abort
        self._next_beat = 0.0
        self._taken_bytes = 0  # prompt bytes taken in since the heap was last trimmed

    def _bind(self, address: str, keys: str | None, domain: str, max_frame: int) -> zmq.Socket:
        s = sockets.new(self.ctx, zmq.ROUTER)
        # libzmq drops a connection that sends a bigger frame before any of it reaches this loop
        s.setsockopt(zmq.MAXMSGSIZE, max_frame + 1024)
        if keys:
            auth.make_server(s, keys, domain)
        try:
            s.bind(address)
        except zmq.ZMQError as e:
            s.close(0)
            raise OSError(f"cannot bind {address}: {e}") from None
        return s

    # ------------------------------------------------------------------------------------------ the loop

    def stop(self) -> None:
        """End the loop now, failing what is in flight with ShuttingDown (safe from any thread: it only
        sets state). Signals go through stops instead: drain first (see _stopped)."""
        self.stops.force(Stop.EXIT)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stops.signal)
        signal.signal(signal.SIGINT, self.stops.signal)

    def run(self) -> None:
        log.info("broker: clients on %s, workers on %s", self.front_address, self.back_address)
        # Out of the collector's reach, what start-up left (as the worker does): a full collection walking
        # it would land amid forwarding a burst of results
        gc.collect()
        gc.freeze()
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self.back_events, zmq.POLLIN)
        try:
            while not (self.stops.level and self._guarded(self._stopped)):
                timeout_ms = max(0.0, self._next_beat - time.monotonic()) * 1000
                if self.stops.level:
                    timeout_ms = min(timeout_ms, _STOP_POLL_S * 1000)
                self._serve(poller, timeout_ms)
                if time.monotonic() >= self._next_beat:
                    self._guarded(self._tick)
            if self.stops.level < Stop.EXIT:
                self._settle(poller)
        finally:
            self._shutdown()

    def _serve(self, poller: zmq.Poller, timeout_ms: float) -> None:
        for sock, _ in poller.poll(timeout_ms):
            if sock is self.back_events:
                self._guarded(self._on_connection_events)
                continue
            for i in range(_BURST):
                # ZMQ_EVENTS says when the queue is empty: a receive that raises Again costs twice as much, and
                # it is the last thing done for every message that comes alone (perf/results/README.md)
                if i and not sockets.readable(sock):
                    break
                try:
                    # The back socket's frames stay zmq frames: they carry the connection (for its drop) and
                    # its key, and results are forwarded without a copy.
                    frames = sockets.recv(sock, zmq.NOBLOCK, copy=sock is self.front)
                except zmq.Again:
                    break
                if sock is self.front:
                    self._guarded(self._on_client, frames[0], frames[1:])
                else:
                    self._guarded(self._on_worker, frames[0].bytes, frames[1:])

    def _guarded(self, handler, *args):
        """Run a handler; a failure of this broker's own code is counted, logged with its traceback, and
        answered where a client waits for it. The loop goes on either way."""
        try:
            return handler(*args)
        except Exception as e:  # noqa: BLE001 - nothing may end the loop
            self.faults.add("internal", f"{getattr(handler, '__name__', handler)} failed: {type(e).__name__}: {e}",
                            exc_info=True)
            if handler == self._on_client and args:
                client, frames = args
                rids, cid = p.ids_of(frames)
                for rid in rids:
                    self._fail(rid, InternalError(f"broker error: {type(e).__name__}"), client=client)
                if cid:
                    self._to_client(client, p.Error(code=InternalError.code, cid=cid,
                                                    message=f"broker error: {type(e).__name__}"))
            return None

    def _settle(self, poller: zmq.Poller) -> None:
        """Before closing: go on serving (answers only: nothing is in flight) for _SETTLE_S."""
        until = time.monotonic() + _SETTLE_S
        while time.monotonic() < until:
            self._serve(poller, max(0.0, until - time.monotonic()) * 1000)

    def _stopped(self) -> bool:
        """One step of a stop; True once the loop may end. Like a worker's: take nothing new, let what is in
        flight finish until drain_s, then abort it at its workers and forward the partial outputs that
        come back (for up to _ABORT_GRACE_S). A second signal skips to the abort, a third ends at once.
        Under systemd or slurm the workers got the same signal and drain alongside."""
        now = time.monotonic()
        if self.stops.level >= Stop.EXIT:
            return True
        if self._drain_until is None:
            self._drain_until = now + self.drain_s
            log.info("stopping: %d request(s) in flight may finish for up to %.0f s", len(self.requests), self.drain_s)
            self._abort_pending(list(self.pending))
        # Done once nothing is in flight and no stopping worker still owes its goodbye (it waits for our BYE).
        if not self.requests and not any(w.stopping for w in self.workers.values()):
            return True
        if self.requests and self._aborted_at is None and (self.stops.level >= Stop.NOW or now >= self._drain_until):
            self._aborted_at = now
            log.info("stopping: aborting %d request(s) still in flight", len(self.requests))
            for w in self.workers.values():  # their replies match no open control: dropped
                if w.rids:
                    self._to_worker(w.ident, p.Abort(cid="broker-stopping", rids=list(w.rids)))
        return now - (self._aborted_at or self._drain_until) > _ABORT_GRACE_S

    def _tick(self) -> None:
        now = time.monotonic()
        late = now - self._next_beat
        if self._next_beat and late > self.heartbeat_s / 2:
            # This process was not running: nobody could be heard meanwhile, so the stall does not count
            # against the workers' liveness.
            log.warning("broker loop stalled %.2f s; extending worker liveness by as much", late)
            for w in self.workers.values():
                w.expiry += late
        self._next_beat = now + self.heartbeat_s
        beat = p.encode(p.Heartbeat())
        for w in list(self.workers.values()):
            if now > w.expiry:
                self._drop_worker(w, f"worker {w.name} missed {self.liveness} heartbeats")
            else:
                sockets.send(self.back, [w.ident, *beat])
        for c in [c for c in self.controls.values() if now > c.deadline]:
            for ident in c.waiting:
                c.workers[self._worker_name(ident)] = {
                    "ok": False, "error": RequestTimeout.code,
                    "message": "no answer in time"}
            c.ok, c.waiting = False, set()
            self._finish_control(c)
        self._expire_requests(now)
        if self._taken_bytes > _TRIM_AFTER_BYTES:
            self._taken_bytes = 0
            t = time.monotonic()
            _trim_heap()
            if time.monotonic() - t > 0.05:
                log.warning("trimming the heap took %.3f s", time.monotonic() - t)

    def _shutdown(self) -> None:
        for rid in list(self.requests):
            self._fail(rid, ShuttingDown("the broker is stopping"))
        for w in self.workers.values():
            self._to_worker(w.ident, p.Disconnect(reason="broker stopping"))
        # What was just sent (the last results, these errors) may still sit in the sockets' queues: closing
        # with no linger would drop it, and a client would wait for results that were already here.
        self.back.disable_monitor()
        self.back_events.close(0)
        self.front.close(linger=_FLUSH_MS)
        self.back.close(linger=_FLUSH_MS)
        if self.authenticator is not None:
            self.authenticator.stop()
        log.info("broker stopped")

    # ------------------------------------------------------------------------------------------ clients

    def _on_client(self, client: bytes, frames: list) -> None:
        try:
            msg = p.decode(frames, p.CLIENT_TO_BROKER)
        except RolloutdError as e:
            self.faults.add("bad_message", f"from client {client.hex()}: {e}")
            rids, cid = p.ids_of(frames)
            self._to_client(client, p.Error(code=e.code, message=str(e), rid=rids[0] if rids else None, cid=cid))
            return
        cmd = msg.CMD
        if cmd is p.Cmd.GENERATE:
            self._on_generate(client, msg, frames)
        elif cmd is p.Cmd.ABORT:
            self._on_abort(client, msg)
        elif cmd in _FANOUT:
            if cmd is p.Cmd.ABORT_ALL:
                self._abort_pending(list(self.pending))
            self._fan_out(client, msg)
        elif cmd is p.Cmd.STATUS:
            self._to_client(client, p.Reply(cid=msg.cid, data=self.status()))
        elif cmd is p.Cmd.PING:
            self._on_ping(client, msg)

    def _on_generate(self, client: bytes, msg: p.Generate, frames: list) -> None:
        if self.stops.level:
            self._to_client(client, p.Error(code=ShuttingDown.code, rid=msg.rid, message="the broker is stopping"))
            return
        if msg.rid in self.requests:
            self._to_client(client, p.Error(code=BadRequest.code, rid=msg.rid,
                                            message=f"request id {msg.rid!r} is already in flight"))
            return
        req = Request(client, msg.n, time.monotonic() + msg.timeout_s, None)
        self._taken_bytes += sum(len(f) for f in frames)
        w = self._place(msg.n)
        if w is None:
            req.frames = frames
            req.nbytes = _REQUEST_OVERHEAD + sum(len(f) for f in frames)
            refusal = self._over_budget(client, req.nbytes)
            if refusal:
                self._to_client(client, p.Error(code=Busy.code, rid=msg.rid, message=f"{refusal}; retry later"))
                return
            self.pending[msg.rid] = req
            self.held_bytes += req.nbytes
            self.client_bytes[client] += req.nbytes
        self.requests[msg.rid] = req
        heapq.heappush(self.deadlines, (req.expires, msg.rid))
        if w is not None:
            self._assign(msg.rid, w, frames)

    def _over_budget(self, client: bytes, nbytes: int) -> str | None:
        """Why a request that must wait for a worker cannot be held, or None if it can."""
        if len(self.pending) >= self.max_pending:
            return f"{len(self.pending)} requests already wait for a free worker ({len(self.workers)} registered)"
        if self.held_bytes + nbytes > self.max_pending_bytes:
            return (f"waiting requests hold {self.held_bytes} bytes; this one ({nbytes}) would pass the broker's "
                    f"budget of {self.max_pending_bytes}")
        if self.client_bytes[client] + nbytes > self.max_client_bytes:
            return (f"this client's waiting requests hold {self.client_bytes[client]} bytes; this one ({nbytes}) "
                    f"would pass the per-client budget of {self.max_client_bytes}")
        return None

    def _on_abort(self, client: bytes, msg: p.Abort) -> None:
        by_worker: dict[bytes, list[str]] = {}
        unknown, pending = [], []
        for rid in msg.rids:
            req = self.requests.get(rid)
            if req is None or req.client != client:
                unknown.append(rid)
            elif req.worker is None:
                pending.append(rid)
            else:
                by_worker.setdefault(req.worker, []).append(rid)
        self._abort_pending(pending)
        c = self._open_control(client, msg.cid, set(by_worker))
        c.data.update(unknown=unknown, aborted_pending=len(pending))
        for ident, rids in by_worker.items():
            self._to_worker(ident, p.Abort(cid=c.bcid, rids=rids))
        self._maybe_finish(c)

    def _on_ping(self, client: bytes, msg: p.Ping) -> None:
        if msg.target == "broker":
            self._to_client(client, p.Reply(cid=msg.cid, data={"from": "broker"}))
            return
        targets = [w for w in self.workers.values() if msg.target in ("worker", w.name)]
        if not targets:
            self._to_client(client, p.Error(code=Busy.code, cid=msg.cid,
                                            message=f"no registered worker matches {msg.target!r}"))
            return
        w = min(targets, key=lambda w: w.load)
        c = self._open_control(client, msg.cid, {w.ident})
        c.passthrough = True
        msg.cid = c.bcid
        self._to_worker(w.ident, msg)

    def _fan_out(self, client: bytes, msg: p.Message) -> None:
        """To every worker, or to those the message names (weight updates); a named worker that is not
        registered fails in the reply. The message is forwarded as it is, but for the broker's own cid:
        its bulk data (a weight bucket's tensors) never passes here, only handles."""
        named = getattr(msg, "workers", None)
        if named:
            by_name = {w.name: w.ident for w in self.workers.values()}
            idents = [by_name[n] for n in named if n in by_name]
        else:
            idents = list(self.workers)
        c = self._open_control(client, msg.cid, set(idents), getattr(msg, "timeout_s", None))
        for n in named or ():
            if n not in by_name:
                c.ok = False
                c.workers[n] = {"ok": False, "error": WorkerLost.code, "message": f"no registered worker named {n}"}
        frames = p.encode(dataclasses.replace(msg, cid=c.bcid))
        for ident in idents:
            sockets.send(self.back, [ident, *frames])
        self._maybe_finish(c)

    def _open_control(self, client: bytes, cid: str, idents: set, timeout_s: float | None = None) -> Control:
        """timeout_s: how long workers may take to answer, when the caller said (weight updates), else the
        broker's control timeout."""
        wait = self.control_timeout_s if timeout_s is None else timeout_s + 1.0
        c = Control(client, cid, idents, time.monotonic() + wait, bcid=f"b{next(self._cids)}")
        self.controls[c.bcid] = c
        return c

    def status(self) -> dict:
        return {
            "workers": [{
                "id": w.name, "model": w.ready.model, "devices": w.ready.devices, "inflight": w.load,
                "capacity": w.ready.capacity, "weight_version": w.ready.weight_version, "pid": w.ready.pid,
                "engine": w.ready.engine, "host": w.ready.host, "transports": w.ready.transports,
            } for w in self.workers.values()],
            "pending": len(self.pending),
            "requests": len(self.requests),
            "held_bytes": self.held_bytes,
            "faults": dict(self.faults.counts),
        }

    # ------------------------------------------------------------------------------------------ workers

    def _on_worker(self, ident: bytes, frames: list) -> None:
        try:
            msg = p.decode(frames, p.WORKER_TO_BROKER, check_frames=False)
        except RolloutdError as e:
            self.faults.add("bad_message", f"from worker {self._worker_name(ident)}: {e}")
            w = self.workers.get(ident)
            rids, cid = p.ids_of(frames)
            if w is not None:  # what it meant to deliver will not come: its clients hear so now
                for rid in rids:
                    req = self.requests.get(rid)
                    if req is not None and req.worker == ident:
                        self._fail(rid, InternalError(f"worker {w.name} sent a bad message: {e}"))
            self._to_worker(ident, p.Error(code=e.code, message=str(e)[:1000], rid=rids[0] if rids else None, cid=cid))
            return
        cmd = msg.CMD
        if cmd is p.Cmd.READY:
            self._on_ready(ident, msg, frames[0])
            return
        w = self.workers.get(ident)
        if w is None:
            # A worker from before a broker restart, one we expired, or a peer that never registered: make it
            # start over with READY. One that is leaving gets its goodbye all the same (see below).
            if cmd is not p.Cmd.DISCONNECT:
                self.faults.add("unregistered", f"{type(msg).__name__} from an unregistered peer {ident.hex()}")
            reason = p.BYE if cmd is p.Cmd.DISCONNECT else "unknown worker; send READY"
            self._to_worker(ident, p.Disconnect(reason=reason))
            return
        w.expiry = time.monotonic() + self.heartbeat_s * self.liveness
        if cmd is p.Cmd.FINISHED:
            self._on_finished(w, msg, frames)
        elif cmd is p.Cmd.ERROR and msg.rid:
            if self._owned(w, msg.rid, "Error"):
                sockets.send(self.front, [self._close(msg.rid).client, *frames], copy=False)
                self._drain_pending()
        elif cmd is p.Cmd.TOKENS:
            if self._owned(w, msg.rid, "Tokens"):
                sockets.send(self.front, [self.requests[msg.rid].client, *frames], copy=False)
        elif cmd is p.Cmd.REPLY or cmd is p.Cmd.ERROR:
            self._on_control_reply(w, msg)
        elif cmd is p.Cmd.HEARTBEAT:
            if msg.stopping and not w.stopping:
                log.info("worker %s is stopping: nothing new goes there", w.name)
            w.stopping = msg.stopping
        elif cmd is p.Cmd.DISCONNECT:
            self._drop_worker(w, f"worker {w.name} disconnected: {msg.reason}")
            # The goodbye back tells a stopping worker that all it sent before has been read here: only then
            # may it close. Closing earlier lost its last results (see Worker._goodbye).
            self._to_worker(ident, p.Disconnect(reason=p.BYE))

    def _owned(self, w: WorkerEntry, rid: str, what: str) -> bool:
        """Whether rid is in flight on w. Anything else is dropped: a late answer for a request that ended
        (aborted, timed out: normal), or an answer for another worker's request (a fault, counted)."""
        req = self.requests.get(rid)
        if req is None:
            return False
        if req.worker != w.ident:
            self.faults.add("not_owner", f"worker {w.name} sent {what} for {rid!r}, which is not on it")
            return False
        return True

    def _close(self, rid: str) -> Request | None:
        """Take a request out of the table, off its worker's load or the pending queue; None if it is gone."""
        req = self.requests.pop(rid, None)
        if req is None:
            return None
        if req.worker is not None:
            w = self.workers.get(req.worker)
            if w is not None:
                w.load -= req.n
                w.rids.discard(rid)
        elif self.pending.pop(rid, None) is not None:
            self._release(req)
        return req

    def _release(self, req: Request) -> None:
        """A pending request's bytes no longer count against the budgets."""
        self.held_bytes -= req.nbytes
        self.client_bytes[req.client] -= req.nbytes
        if self.client_bytes[req.client] <= 0:
            del self.client_bytes[req.client]
        req.frames, req.nbytes = None, 0

    def _on_finished(self, w: WorkerEntry, msg: p.Finished, frames: list) -> None:
        """Requests a worker ended: to each client its own, still one message per client. The common case
        (all for one client, all on this worker) is forwarded as it came, its samples frame not even unpacked
        (the client checks it, and fails the requests it names if it does not add up)."""
        reqs = [self.requests.get(rid) for rid in msg.rids]
        client = reqs[0].client if reqs[0] is not None else None
        if client is not None and all(r is not None and r.client == client and r.worker == w.ident for r in reqs):
            for rid in msg.rids:
                self._close(rid)
            sockets.send(self.front, [client, *frames], copy=False)
        else:
            try:
                msg.check_frames()
            except RolloutdError as e:
                self.faults.add("bad_message", f"Finished from worker {w.name}: {e}")
                for rid, req in zip(msg.rids, reqs):
                    if req is not None and req.worker == w.ident:
                        self._fail(rid, InternalError(f"worker {w.name} sent a bad result: {e}"))
                return
            by_client: dict[bytes, set] = {}
            for rid in msg.rids:
                if self._owned(w, rid, "Finished"):
                    by_client.setdefault(self._close(rid).client, set()).add(rid)
            for client, rids in by_client.items():
                self._to_client(client, msg.select(rids))
        self._drain_pending()

    def _on_ready(self, ident: bytes, msg: p.Ready, first: zmq.Frame) -> None:
        # Connection drops seen so far are handled first: the fd this READY came on may be one that a
        # dropped worker held a moment ago (its drop was reported before this connection could exist).
        self._on_connection_events()
        key = auth.peer_key(first)
        same_name = next((w for w in self.workers.values() if w.name == msg.worker and w.ident != ident), None)
        if same_name is not None:
            # A live worker has this name; nobody takes its place by claiming it. A restarted worker finds
            # its old entry gone once the old connection dropped, and retries until then.
            self.faults.add("name_taken", f"READY for {msg.worker!r}, held by a live worker, from {ident.hex()}")
            self._to_worker(ident, p.Disconnect(reason=f"worker name {msg.worker!r} is taken"))
            return
        old = self.workers.get(ident)
        if old is not None:
            self._drop_worker(old, f"worker {old.name} registered again (restarted)")
        elif len(self.workers) >= _MAX_WORKERS:
            self.faults.add("too_many_workers", f"READY from {ident.hex()} with {_MAX_WORKERS} registered")
            self._to_worker(ident, p.Disconnect(reason=f"the broker takes at most {_MAX_WORKERS} workers"))
            return
        self.workers[ident] = WorkerEntry(ident, msg, time.monotonic() + self.heartbeat_s * self.liveness,
                                          fd=first.get(zmq.SRCFD), key=key)
        log.info("worker %s ready: model %s on %s, capacity %d, weights v%d%s", msg.worker, msg.model,
                 ",".join(msg.devices), msg.capacity, msg.weight_version, f", key {key[:8]}..." if key else "")
        self._to_worker(ident, p.Heartbeat())
        self._drain_pending()

    def _on_connection_events(self) -> None:
        """Drop the workers whose connection dropped (the back socket's monitor reports each by its fd)."""
        while True:
            try:
                event = parse_monitor_message(self.back_events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.faults.add("refused_key", f"a worker connection's key was refused ({event['endpoint']!r})")
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            for w in [w for w in self.workers.values() if w.fd == event["value"]]:
                self._drop_worker(w, f"worker {w.name}'s connection dropped")

    def _on_control_reply(self, w: WorkerEntry, msg) -> None:
        c = self.controls.get(msg.cid)
        if c is None or w.ident not in c.waiting:
            return  # late answer to a command that already timed out, or one that was never asked
        c.waiting.discard(w.ident)
        if c.passthrough:
            del self.controls[msg.cid]
            msg.cid = c.cid  # the decoded message is ours alone: no copy to rename it (as in _on_ping)
            self._to_client(c.client, msg)
            return
        if msg.CMD is p.Cmd.ERROR:
            c.ok = False
            c.workers[w.name] = {"ok": False, "error": msg.code, "message": msg.message}
        else:
            c.ok = c.ok and msg.ok
            c.workers[w.name] = {"ok": msg.ok, "data": msg.data}
            version = msg.data.get("weight_version")
            if type(version) is int and version >= 0:
                w.ready.weight_version = version
        self._maybe_finish(c)

    def _maybe_finish(self, c: Control) -> None:
        if not c.waiting:
            self._finish_control(c)

    def _finish_control(self, c: Control) -> None:
        self.controls.pop(c.bcid, None)
        if c.passthrough:
            self._to_client(c.client, p.Error(code=RequestTimeout.code, cid=c.cid, message="the worker did not answer"))
        else:
            self._to_client(c.client, p.Reply(cid=c.cid, ok=c.ok, data=c.data, workers=c.workers))

    def _drop_worker(self, w: WorkerEntry, why: str) -> None:
        if self.workers.get(w.ident) is not w:
            return
        log.warning("%s; failing its %d request(s)", why, len(w.rids))
        del self.workers[w.ident]
        for rid in list(w.rids):
            self._fail(rid, WorkerLost(why))
        for c in list(self.controls.values()):
            if w.ident in c.waiting:
                c.waiting.discard(w.ident)
                c.ok = False
                c.workers[w.name] = {"ok": False, "error": WorkerLost.code, "message": why}
                if c.passthrough:
                    del self.controls[c.bcid]
                    self._to_client(c.client, p.Error(code=WorkerLost.code, cid=c.cid, message=why))
                else:
                    self._maybe_finish(c)

    def _worker_name(self, ident: bytes) -> str:
        w = self.workers.get(ident)
        return w.name if w else ident.hex()

    # -------------------------------------------------------------------------------------- placement

    def _place(self, n: int) -> WorkerEntry | None:
        """The least-loaded worker with room for n more sequences (an idle worker takes any n)."""
        best, best_frac = None, None
        for w in self.workers.values():
            if w.stopping or (w.load and w.load + n > w.ready.capacity):
                continue
            frac = w.load / w.ready.capacity
            if best is None or frac < best_frac:
                best, best_frac = w, frac
        return best

    def _assign(self, rid: str, w: WorkerEntry, frames: list) -> None:
        req = self.requests[rid]
        req.worker = w.ident
        w.load += req.n
        w.rids.add(rid)
        sockets.send(self.back, [w.ident, *frames])

    def _drain_pending(self) -> None:
        while self.pending:
            rid = next(iter(self.pending))
            req = self.pending[rid]
            w = self._place(req.n)
            if w is None:
                return
            frames = req.frames
            del self.pending[rid]
            self._release(req)
            self._assign(rid, w, frames)

    def _abort_pending(self, rids: list[str]) -> None:
        """Requests that never reached a worker end at once, as aborted, with no tokens."""
        for rid in rids:
            req = self.pending.get(rid)
            if req is None:
                continue
            self._close(rid)
            samples = [(i, "", "abort", b"", None) for i in range(req.n)]
            self._to_client(req.client, p.Finished.pack("", -1, [(rid, 0, samples)]))

    def _expire_requests(self, now: float) -> None:
        """End the requests whose caller's deadline has passed: nobody waits for them any more (a client
        that went away frees what it held). Those on a worker are aborted there too."""
        by_worker: dict[bytes, list[str]] = {}
        while self.deadlines and self.deadlines[0][0] <= now:
            expires, rid = heapq.heappop(self.deadlines)
            req = self.requests.get(rid)
            if req is None or req.expires != expires:
                continue  # ended already
            if req.worker is not None:
                by_worker.setdefault(req.worker, []).append(rid)
            self._fail(rid, RequestTimeout(f"request {rid} passed its deadline at the broker"))
        for ident, rids in by_worker.items():
            self._to_worker(ident, p.Abort(cid="broker-deadline", rids=rids))
        if len(self.deadlines) > 2 * len(self.requests) + 1024:  # drop the entries of ended requests
            self.deadlines = [(r.expires, rid) for rid, r in self.requests.items()]
            heapq.heapify(self.deadlines)

    def _fail(self, rid: str, err: RolloutdError, client: bytes | None = None) -> None:
        """End a request with an error to its client (or to `client`, for a request never admitted)."""
        req = self._close(rid)
        if req is not None:
            client = req.client
        if client is not None:
            self._to_client(client, p.Error(code=err.code, message=str(err), rid=rid))

    def _to_client(self, client: bytes, msg: p.Message) -> None:
        sockets.send(self.front, [client, *p.encode(msg)])

    def _to_worker(self, ident: bytes, msg: p.Message) -> None:
        sockets.send(self.back, [ident, *p.encode(msg)])


def return_large_frees_to_os() -> None:
    """Have glibc serve allocations of 256 KiB and more (prompt frames, batches of results) by mmap, so that
    each goes back to the OS when freed: after a flood of big prompts, the process shrinks back to what it
    holds instead of keeping its peak. Called once by the broker process; a no-op off glibc."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 256 << 10)


def _trim_heap() -> None:
    """Give the OS back the free pages of the heap (smaller allocations, freed after a burst)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both or neither
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Prompt bytes taken in since the heap was last trimmed, past which the next tick trims it.
_TRIM_AFTER_BYTES = 64 << 20


def _raise_fd_limit() -> None:
    """Every connection holds a file descriptor: take the hard limit, so that idle connections cannot
    exhaust a soft limit of 1024 (under systemd, set LimitNOFILE= for a higher hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, e)
