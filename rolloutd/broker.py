"""The broker: one poll loop between trainers (front ROUTER) and vLLM workers (back ROUTER). No engine work.

It keeps a registry of workers (READY handshake, heartbeats both ways, expiry after LIVENESS silent
intervals), a request table (request id -> client, worker) so that an abort reaches only the owner and a
lost worker's requests end at their clients with WorkerLost, least-loaded placement (a prompt's n samples
stay on one worker, sharing its prefix cache), a bounded pending queue when every worker is full, and
fan-out of broadcast commands with one aggregated reply. Token and result frames are forwarded as they
came: only the small msgpack header is read, for routing.
"""
from __future__ import annotations

import collections
import gc
import logging
import signal
import time
from dataclasses import dataclass, field

import msgpack
import zmq

from . import config
from . import protocol as p
from .errors import Busy, InternalError, ProtocolError, RolloutdError, ShuttingDown, WorkerLost
from .stopping import StopRequests

log = logging.getLogger("rolloutd.broker")

# While stopping, the loop wakes at least this often to move the stop along.
_STOP_POLL_S = 0.05
# After aborting what was left at a stop, how long partial outputs are waited for before the rest fail.
_ABORT_GRACE_S = 5.0
# After a stop has ended the work, how long the broker goes on serving before it closes. Closing right
# after a burst of forwarded messages (a stalled broker catching up) lost the last ones to a client in
# about half of the stops on a 2-core VM, though the sockets reported them sent; with this pause, none in
# 5. The cause (the connection reset at close?) is not pinned down.
_SETTLE_S = 1.0
# At exit, how long messages still queued may take to leave (a gone peer cannot hold the exit longer).
_FLUSH_MS = 10_000

# Commands the broker sends to every worker and answers with one aggregated reply.
_FANOUT = (p.Cmd.ABORT_ALL, p.Cmd.PAUSE, p.Cmd.RESUME, p.Cmd.SLEEP, p.Cmd.WAKE, p.Cmd.LOAD_WEIGHTS)


@dataclass
class WorkerEntry:
    ident: bytes
    ready: p.Ready
    expiry: float
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
    frames: list | None  # kept only while pending, to be sent once a worker frees up
    worker: bytes | None = None


@dataclass
class Control:
    """A command waiting on worker replies (one for ping, every worker for broadcasts)."""
    client: bytes
    cid: str
    waiting: set  # worker idents that still owe a reply
    deadline: float
    data: dict = field(default_factory=dict)  # worker name -> its reply data
    ok: bool = True
    passthrough: bool = False  # forward the single worker's reply frames unchanged (ping)


class Broker:
    def __init__(self, front: str = config.FRONT, back: str = config.BACK, *,
                 heartbeat_s: float = config.HEARTBEAT_S, liveness: int = config.LIVENESS,
                 max_pending: int = config.MAX_PENDING, control_timeout_s: float = config.CONTROL_TIMEOUT_S,
                 drain_s: float = 30.0, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_pending = max_pending
        self.control_timeout_s = control_timeout_s
        self.drain_s = drain_s
        self.front = self._bind(front)
        self.back = self._bind(back)
        # A restarted worker reconnects under the same identity; let the new connection take it over.
        self.back.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.front_address = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back_address = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[bytes, WorkerEntry] = {}
        self.requests: dict[str, Request] = {}
        self.pending: collections.deque[str] = collections.deque()
        self.controls: dict[str, Control] = {}
        self.stops = StopRequests()
        self._drain_until: float | None = None  # set when a stop begins
        self._aborted_at: float | None = None  # when what was left got its abort
        self._next_beat = 0.0

    def _bind(self, address: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, config.HWM)
        s.setsockopt(zmq.RCVHWM, config.HWM)
        # A hard stop for frames nobody should send; the protocol's own limits answer with an error first.
        s.setsockopt(zmq.MAXMSGSIZE, 2 * p.MAX_FRAME_BYTES)
        s.bind(address)
        return s

    # ------------------------------------------------------------------------------------------ the loop

    def stop(self) -> None:
        """End the loop now, failing what is in flight with ShuttingDown (safe from any thread: it only
        sets state). Signals go through stops instead: drain first (see _stopped)."""
        self.stops.force(3)

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
        try:
            while not (self.stops.level and self._stopped()):
                timeout_ms = max(0.0, self._next_beat - time.monotonic()) * 1000
                if self.stops.level:
                    timeout_ms = min(timeout_ms, _STOP_POLL_S * 1000)
                self._serve(poller, timeout_ms)
                if time.monotonic() >= self._next_beat:
                    self._tick()
            if self.stops.level < 3:
                self._settle(poller)
        finally:
            self._shutdown()

    def _serve(self, poller: zmq.Poller, timeout_ms: float) -> None:
        for sock, _ in poller.poll(timeout_ms):
            # Take what is queued, bounded so one busy side cannot starve the other; what is left makes the
            # next poll return at once.
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is self.front:
                    self._on_client(frames[0], frames[1:])
                else:
                    self._on_worker(frames[0], frames[1:])

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
        if self.stops.level >= 3:
            return True
        if self._drain_until is None:
            self._drain_until = now + self.drain_s
            log.info("stopping: %d request(s) in flight may finish for up to %.0f s", len(self.requests), self.drain_s)
            self._abort_pending(list(self.pending))
        # Done once nothing is in flight and no stopping worker still owes its goodbye (it waits for our BYE).
        if not self.requests and not any(w.stopping for w in self.workers.values()):
            return True
        if self.requests and self._aborted_at is None and (self.stops.level >= 2 or now >= self._drain_until):
            self._aborted_at = now
            log.info("stopping: aborting %d request(s) still in flight", len(self.requests))
            for w in self.workers.values():  # their replies match no open control: dropped
                if w.rids:
                    self.back.send_multipart([w.ident, *p.encode(p.Abort(cid="broker-stopping", rids=list(w.rids)))])
        return now - (self._aborted_at or self._drain_until) > _ABORT_GRACE_S

    def _tick(self) -> None:
        now = time.monotonic()
        late = now - self._next_beat
        if self._next_beat and late > self.heartbeat_s / 2:
            # This process was not running (on the 2-core CI VMs the host takes a virtual CPU away for
            # seconds under vLLM load): nobody could be heard meanwhile, so the stall does not count
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
                self.back.send_multipart([w.ident, *beat])
        for c in [c for c in self.controls.values() if now > c.deadline]:
            for ident in c.waiting:
                c.data[self._worker_name(ident)] = {"ok": False, "error": "timeout"}
            c.ok, c.waiting = False, set()
            self._finish_control(c)

    def _shutdown(self) -> None:
        for rid in list(self.requests):
            self._fail(rid, ShuttingDown("the broker is stopping"))
        for w in self.workers.values():
            self.back.send_multipart([w.ident, *p.encode(p.Disconnect(reason="broker stopping"))])
        # What was just sent (the last results, these errors) may still sit in the sockets' queues: closing
        # with no linger would drop it, and a client would wait for results that were already here.
        self.front.close(linger=_FLUSH_MS)
        self.back.close(linger=_FLUSH_MS)
        log.info("broker stopped")

    # ------------------------------------------------------------------------------------------ clients

    def _on_client(self, client: bytes, frames: list) -> None:
        try:
            msg = p.decode(frames)
        except RolloutdError as e:
            log.warning("bad message from client %s: %s", client.hex(), e)
            rid, cid = _ids_of(frames)
            self._to_client(client, p.Error(code=e.code, message=str(e), rid=rid, cid=cid))
            return
        cmd = msg.CMD
        if cmd is p.Cmd.GENERATE:
            self._on_generate(client, msg, frames)
        elif cmd is p.Cmd.ABORT:
            self._on_abort(client, msg)
        elif cmd in _FANOUT:
            if cmd is p.Cmd.ABORT_ALL:
                self._abort_pending(list(self.pending))
            self._fan_out(client, msg.cid, frames, list(self.workers))
        elif cmd is p.Cmd.STATUS:
            self._to_client(client, p.Reply(cid=msg.cid, data=self.status()))
        elif cmd is p.Cmd.PING:
            self._on_ping(client, msg, frames)
        else:
            self._to_client(client, p.Error(code=ProtocolError.code, cid=getattr(msg, "cid", None),
                                            message=f"{type(msg).__name__} is not a client command"))

    def _on_generate(self, client: bytes, msg: p.Generate, frames: list) -> None:
        if self.stops.level:
            self._to_client(client, p.Error(code=ShuttingDown.code, rid=msg.rid, message="the broker is stopping"))
            return
        if msg.rid in self.requests:
            self._to_client(client, p.Error(code="bad_request", rid=msg.rid,
                                            message=f"request id {msg.rid!r} is already in flight"))
            return
        w = self._place(msg.n)
        if w is None:
            if len(self.pending) >= self.max_pending:
                self._to_client(client, p.Error(code=Busy.code, rid=msg.rid, message=(
                    f"{len(self.pending)} requests already wait for a free worker "
                    f"({len(self.workers)} registered); retry later")))
                return
            self.requests[msg.rid] = Request(client, msg.n, frames)
            self.pending.append(msg.rid)
            return
        self.requests[msg.rid] = Request(client, msg.n, None)
        self._assign(msg.rid, w, frames)

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
        c.data["broker"] = {"unknown": unknown, "aborted_pending": len(pending)}
        for ident, rids in by_worker.items():
            self.back.send_multipart([ident, *p.encode(p.Abort(cid=msg.cid, rids=rids))])
        self._maybe_finish(c)

    def _on_ping(self, client: bytes, msg: p.Ping, frames: list) -> None:
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
        self.back.send_multipart([w.ident, *frames])

    def _fan_out(self, client: bytes, cid: str, frames: list, idents: list[bytes]) -> None:
        c = self._open_control(client, cid, set(idents))
        for ident in idents:
            self.back.send_multipart([ident, *frames])
        self._maybe_finish(c)

    def _open_control(self, client: bytes, cid: str, idents: set) -> Control:
        c = Control(client, cid, idents, time.monotonic() + self.control_timeout_s)
        self.controls[cid] = c
        return c

    def status(self) -> dict:
        return {
            "workers": [{
                "id": w.name, "model": w.ready.model, "devices": w.ready.devices, "inflight": w.load,
                "capacity": w.ready.capacity, "weight_version": w.ready.weight_version, "pid": w.ready.pid,
                "engine": w.ready.engine,
            } for w in self.workers.values()],
            "pending": len(self.pending),
            "requests": len(self.requests),
        }

    # ------------------------------------------------------------------------------------------ workers

    def _on_worker(self, ident: bytes, frames: list) -> None:
        try:
            msg = p.decode(frames, check_frames=False)
        except RolloutdError as e:
            log.warning("bad message from worker %r: %s", ident, e)
            rid, cid = _ids_of(frames)
            self.back.send_multipart([ident, *p.encode(p.Error(code=e.code, message=str(e), rid=rid, cid=cid))])
            return
        w = self.workers.get(ident)
        cmd = msg.CMD
        if cmd is p.Cmd.READY:
            self._on_ready(ident, msg)
            return
        if w is None:
            # A worker from before a broker restart, or one we expired: make it start over with READY.
            # One that is leaving gets its goodbye all the same (see below).
            reason = p.BYE if cmd is p.Cmd.DISCONNECT else "unknown worker; send READY"
            self.back.send_multipart([ident, *p.encode(p.Disconnect(reason=reason))])
            return
        w.expiry = time.monotonic() + self.heartbeat_s * self.liveness
        if cmd is p.Cmd.RESULT or (cmd is p.Cmd.ERROR and msg.rid):
            req = self._close(msg.rid)
            if req is not None:
                self.front.send_multipart([req.client, *frames])
                self._drain_pending()
        elif cmd is p.Cmd.RESULTS:
            self._on_results(w, msg, frames)
        elif cmd is p.Cmd.TOKENS:
            req = self.requests.get(msg.rid)
            if req is not None:
                self.front.send_multipart([req.client, *frames])
        elif cmd is p.Cmd.REPLY or cmd is p.Cmd.ERROR:
            self._on_control_reply(w, msg, frames)
        elif cmd is p.Cmd.HEARTBEAT:
            if msg.stopping and not w.stopping:
                log.info("worker %s is stopping: nothing new goes there", w.name)
            w.stopping = msg.stopping
        elif cmd is p.Cmd.DISCONNECT:
            self._drop_worker(w, f"worker {w.name} disconnected: {msg.reason}")
            # The goodbye back tells a stopping worker that all it sent before has been read here: only then
            # may it close. Closing earlier lost its last results (see Worker._session).
            self.back.send_multipart([ident, *p.encode(p.Disconnect(reason=p.BYE))])
        else:
            log.warning("worker %s sent %s, which workers do not send", w.name, type(msg).__name__)

    def _close(self, rid: str) -> Request | None:
        """Take a request out of the table and off its worker's load; None if it is gone already."""
        req = self.requests.pop(rid, None)
        if req is not None and req.worker is not None:
            w = self.workers.get(req.worker)
            if w is not None:
                w.load -= req.n
                w.rids.discard(rid)
        return req

    def _on_results(self, w: WorkerEntry, msg: p.Results, frames: list) -> None:
        """A worker's batch of results: to each client its own, still as one message per client. The
        common case (all for one client) is forwarded as it came: the samples frame is not even unpacked."""
        rids = msg.rids  # decode checked it is a list of strings
        reqs = [self.requests.get(rid) for rid in rids]
        client = reqs[0].client if reqs and reqs[0] is not None else None
        if client is not None and all(r is not None and r.client == client for r in reqs):
            for rid in rids:
                self._close(rid)
            # zero-copy: a batch of an abort of 512 carries about 1 MB of ids and text (pyzmq still copies
            # frames under its 64 KB threshold, where that is cheaper)
            self.front.send_multipart([client, *frames], copy=False)
        else:
            try:
                msg.check_frames()
                results = msg.split()
            except RolloutdError as e:
                log.warning("bad results batch from worker %s: %s", w.name, e)
                for rid in rids:
                    self._fail(rid, InternalError(f"worker {w.name} sent a bad result: {e}"))
                return
            by_client: dict[bytes, list[p.Result]] = {}
            for r in results:
                req = self._close(r.rid)
                if req is not None:
                    by_client.setdefault(req.client, []).append(r)
            for client, rs in by_client.items():
                self._to_client(client, p.Results.join(rs))
        self._drain_pending()

    def _on_ready(self, ident: bytes, msg: p.Ready) -> None:
        old = self.workers.get(ident)
        if old is not None:
            self._drop_worker(old, f"worker {old.name} registered again (restarted)")
        self.workers[ident] = WorkerEntry(ident, msg, time.monotonic() + self.heartbeat_s * self.liveness)
        log.info("worker %s ready: model %s on %s, capacity %d, weights v%d", msg.worker, msg.model,
                 ",".join(msg.devices), msg.capacity, msg.weight_version)
        self.back.send_multipart([ident, *p.encode(p.Heartbeat())])
        self._drain_pending()

    def _on_control_reply(self, w: WorkerEntry, msg, frames: list) -> None:
        c = self.controls.get(msg.cid)
        if c is None or w.ident not in c.waiting:
            return  # late answer to a command that already timed out
        c.waiting.discard(w.ident)
        if c.passthrough:
            del self.controls[c.cid]
            self.front.send_multipart([c.client, *frames])
            return
        if msg.CMD is p.Cmd.ERROR:
            c.ok = False
            c.data[w.name] = {"ok": False, "error": msg.code, "message": msg.message}
        else:
            c.ok = c.ok and msg.ok
            c.data[w.name] = {"ok": msg.ok, **msg.data}
            if "weight_version" in msg.data:
                w.ready.weight_version = msg.data["weight_version"]
        self._maybe_finish(c)

    def _maybe_finish(self, c: Control) -> None:
        if not c.waiting:
            self._finish_control(c)

    def _finish_control(self, c: Control) -> None:
        self.controls.pop(c.cid, None)
        if c.passthrough:
            self._to_client(c.client, p.Error(code="timeout", cid=c.cid, message="the worker did not answer"))
        else:
            self._to_client(c.client, p.Reply(cid=c.cid, ok=c.ok, data=c.data))

    def _drop_worker(self, w: WorkerEntry, why: str) -> None:
        log.warning("%s; failing its %d request(s)", why, len(w.rids))
        self.workers.pop(w.ident, None)
        for rid in list(w.rids):
            self._fail(rid, WorkerLost(why))
        for c in list(self.controls.values()):
            if w.ident in c.waiting:
                c.waiting.discard(w.ident)
                c.ok = False
                c.data[w.name] = {"ok": False, "error": WorkerLost.code, "message": why}
                if c.passthrough:
                    del self.controls[c.cid]
                    self._to_client(c.client, p.Error(code=WorkerLost.code, cid=c.cid, message=why))
                else:
                    self._maybe_finish(c)

    def _worker_name(self, ident: bytes) -> str:
        w = self.workers.get(ident)
        return w.name if w else ident.decode(errors="replace")

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
        req.worker, req.frames = w.ident, None
        w.load += req.n
        w.rids.add(rid)
        self.back.send_multipart([w.ident, *frames])

    def _drain_pending(self) -> None:
        while self.pending:
            rid = self.pending[0]
            req = self.requests.get(rid)
            if req is None or req.worker is not None:
                self.pending.popleft()  # aborted or failed while waiting
                continue
            w = self._place(req.n)
            if w is None:
                return
            self.pending.popleft()
            self._assign(rid, w, req.frames)

    def _abort_pending(self, rids: list[str]) -> None:
        """Requests that never reached a worker end at once, as aborted, with no tokens."""
        for rid in rids:
            req = self.requests.get(rid)
            if req is None or req.worker is not None:
                continue
            del self.requests[rid]
            samples = [{"index": i, "text": "", "finish_reason": "abort", "logprobs": False} for i in range(req.n)]
            self._to_client(req.client, p.Result(rid=rid, worker="", weight_version=-1, samples=samples,
                                                 frames=[b""] * req.n))

    def _fail(self, rid: str, err: RolloutdError) -> None:
        req = self._close(rid)
        if req is not None:
            self._to_client(req.client, p.Error(code=err.code, message=str(err), rid=rid))

    def _to_client(self, client: bytes, msg: p.Message) -> None:
        self.front.send_multipart([client, *p.encode(msg)])


def _ids_of(frames: list) -> tuple[str | None, str | None]:
    """Best-effort rid and cid of a message that failed to decode, so the error reply can name them."""
    try:
        hdr = msgpack.unpackb(frames[1], raw=False) if len(frames) > 1 and len(frames[1]) <= p.MAX_HEADER_BYTES else {}
    except Exception:  # garbage: nothing to name
        return None, None
    if not isinstance(hdr, dict):
        return None, None
    rid, cid = hdr.get("rid"), hdr.get("cid")
    return (rid if isinstance(rid, str) else None), (cid if isinstance(cid, str) else None)
