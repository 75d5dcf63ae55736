"""A worker: one DEALER to the broker in front of one vLLM AsyncLLM (one GPU, or one tensor-parallel group).

Everything runs on one asyncio loop, next to vLLM's own output handler:
  - a reader callback on the socket's file descriptor takes each message as it arrives and handles it
    synchronously (pings, heartbeats) or starts a task (a request, an abort, an engine-state change);
    sends are plain non-blocking sends. This skips pyzmq's per-message futures, which cost more than
    the whole broker hop on the round trip.
  - a heartbeat task, apart from generation, so that a long batch never looks like a dead worker.
  - one task per request.
A broker silent for long is presumed gone: the worker aborts what it holds (nobody waits for it any more)
and reconnects with back-off, READY again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import tempfile
import time

import zmq

from . import auth, config, sockets
from . import engine as eng
from . import protocol as p
from .errors import BadRequest, EngineError, Paused, RolloutdError, ShuttingDown, Unsupported, WeightsIncomplete
from .stopping import Stop, StopRequests
from .weight_updates import WeightUpdates

log = logging.getLogger("rolloutd.worker")

# How often the worker re-sends an abort for requests that were still being added to the engine when it
# came (vLLM cannot abort a request it has not registered yet); it goes on until every one has ended.
_REABORT_EVERY_S = 0.05

# A batch of results leaves once it holds this many (or at the end of the event-loop turn): when 512
# requests end at once, the broker and the client work on the first batches while the worker packs the
# next, instead of all three working one after the other. And at most this many bytes of ids and text,
# a quarter of the protocol's limits on a frame and on a header.
_BATCH_RESULTS = 64
# At a stop, how long the last messages may take to leave before the socket is dropped, and how long
# the broker's goodbye is waited for (a stalled broker reads its backlog late; a gone one never answers).
_FLUSH_MS = 2000
_BYE_WAIT_S = 15.0
# A pause in mode abort or wait answers once the requests it ended have sent their results: at most this long.
_PAUSE_SETTLE_S = 10.0
_MAX_BATCH_BYTES = p.MAX_FRAME_BYTES // 4


class _Job:
    """One request while it runs: its task, what its result is made of, and vLLM's collector of its outputs."""
    __slots__ = ("rid", "n", "want_lp", "stream", "task", "prompt_tokens", "states", "collector", "done")

    def __init__(self, msg: p.Generate):
        self.rid, self.n, self.stream = msg.rid, msg.n, msg.stream
        self.want_lp = bool(msg.sampling.get("logprobs"))
        self.task: asyncio.Task | None = None
        self.prompt_tokens = 0
        self.states: dict[int, eng.SampleState] = {}
        self.collector = None  # set once vLLM has the request
        self.done = False  # its result is queued

    def hold(self, collector) -> None:
        self.collector = collector


class Worker:
    def __init__(self, engine, broker: str = config.BACK, *, worker_id: str | None = None, model: str = "",
                 capacity: int | None = None, weight_version: int = 0, heartbeat_s: float = config.HEARTBEAT_S,
                 liveness: int = config.LIVENESS, drain_s: float = config.DRAIN_S, keys: str | None = None,
                 ctx: zmq.Context | None = None):
        self.engine = engine
        self.broker = broker
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.model = model
        self.capacity = capacity or 4 * eng.max_num_seqs(engine)  # vLLM queues beyond its batch
        self.weight_version = weight_version
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.drain_s = drain_s
        self.keys = keys  # CURVE keys folder (rolloutd.auth), or None
        # How long a silent broker is waited for. Far longer than the broker's own patience: the broker
        # expiring a worker is what frees clients, while a worker giving up throws away all it holds; and
        # a restarted broker is noticed at once anyway (it answers our next heartbeat with DISCONNECT). A
        # host can stop the broker's virtual CPU for many seconds while this worker runs on.
        self.patience_s = max(60.0, 2 * heartbeat_s * liveness)
        self.ctx = ctx or zmq.Context.instance()
        self.jobs: dict[str, _Job] = {}  # rid -> the request, while it runs
        self.devices: list[str] = ["cpu"]
        self.tokenizer = None
        self.sock: zmq.Socket | None = None
        self.paused: str | None = None  # the pause mode while paused
        self._engine_paused = False  # paused in vLLM's scheduler (else by hand, on a vLLM without pause_generation)
        self.refuse_while_paused = False
        self.sleeping = 0  # sleep level while asleep
        self.stops = StopRequests()  # level 0 running, 1 draining, 2 stop now (see stopping.py)
        self.exit_code = 0
        self._drain_deadline: float | None = None
        self._last_heard = 0.0
        self._heard = False
        self._session_over: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bg: set[asyncio.Task] = set()  # control tasks, kept referenced until done
        self._aborting: set[str] = set()  # requests asked to abort that have not ended yet
        self._reaborts: asyncio.Task | None = None  # re-sends their abort until they have all ended
        self._outbox: list[tuple] = []  # requests finished in this event-loop turn, sent together after it
        self._outbox_bytes = 0
        self._reading = False  # in _on_readable
        self._bye: asyncio.Event | None = None  # set when the broker has read all we sent (see _goodbye)
        self.updates = WeightUpdates(self)

    # ---------------------------------------------------------------------------------------- lifecycle

    async def prepare(self) -> None:
        self.tokenizer = await eng.tokenizer(self.engine)
        try:
            uuids = await self.engine.collective_rpc("rolloutd_device_uuid")
            self.devices = sorted(set(uuids))
        except Exception as e:  # the extension could not load: serve anyway, say so
            log.warning("could not ask the engine for its devices (%s); reporting cpu", e)

    @property
    def _stopping(self) -> int:
        return self.stops.level

    def request_stop(self, *_args) -> None:
        """First signal: finish in-flight work (up to drain_s), take nothing new. Second: stop now."""
        if not self.stops.signal():
            return  # the same stop again (systemd signals the whole unit, `rolloutd up` passes it on too)
        self._send(self._heartbeat())  # the broker places nothing new here from now on
        if self._session_over is not None:
            self._session_over.set()  # the heartbeat task takes the drain from here

    async def run(self) -> None:
        await self.prepare()
        self._loop = asyncio.get_running_loop()
        backoff = self.heartbeat_s
        while not self._stopping:
            await self._session()
            if self._stopping:
                break
            await self._abort(list(self.jobs))  # the broker forgot these requests: nobody waits for them
            backoff = self.heartbeat_s if self._heard else min(backoff * 2, 30.0)
            log.warning("broker at %s silent; reconnecting in %.1f s", self.broker, backoff)
            await asyncio.sleep(backoff)

    async def _session(self) -> None:
        """One registration with the broker: until it goes silent, asks us to re-register, or we stop."""
        # No chosen identity: the broker knows this worker by its connection, and its name (in READY) only
        # while that connection lives, so no other peer can take the name over.
        s = sockets.new(self.ctx, zmq.DEALER)
        if self.keys:
            auth.make_client(s, self.keys, "worker")
        s.connect(self.broker)
        self.sock = s
        self._session_over = asyncio.Event()
        self._last_heard, self._heard = time.monotonic(), False
        fd = s.getsockopt(zmq.FD)
        self._loop.add_reader(fd, self._on_readable)
        beat = asyncio.create_task(self._beat())
        try:
            self._send(self._ready())
            await self._session_over.wait()
            if self._stopping:
                await self._drain()
                self._flush_results()  # the last ones were only scheduled: out now, ahead of the goodbye
                await self._goodbye()
        finally:
            beat.cancel()
            self._loop.remove_reader(fd)
            self.sock = None
            # Stopping, the last results may still be queued: they get _FLUSH_MS to leave (the process
            # waits for that when it ends its zmq context). A session the broker ended has nothing to send.
            s.close(linger=_FLUSH_MS if self._stopping else 0)

    async def _beat(self) -> None:
        """Heartbeats out, and the broker's liveness in: apart from generation, every interval."""
        while True:  # until cancelled with the session: a draining worker still beats
            self._send(self._heartbeat())
            t = time.monotonic()
            await asyncio.sleep(self.heartbeat_s)
            late = time.monotonic() - t - self.heartbeat_s
            if late > self.heartbeat_s / 2:
                # This process was not running (its host stopped its virtual CPU): the broker could not be
                # heard meanwhile, so the stall does not count against it.
                log.warning("worker loop stalled %.2f s", late)
                self._last_heard += late
            self._on_readable()  # an edge-triggered FD can miss a wake-up; never let a message sit
            if time.monotonic() - self._last_heard > self.patience_s:
                self._session_over.set()

    async def _goodbye(self) -> None:
        """Tell the broker we are leaving, and wait (up to _BYE_WAIT_S) for its BYE: it comes once the broker
        has read all we sent. Closing before that can lose the last results while a stalled broker still
        reads a backlog: the connection's reset at close drops what the broker's kernel still holds."""
        self._bye = asyncio.Event()
        self._send(p.Disconnect(reason="worker stopping"))
        try:
            await asyncio.wait_for(self._bye.wait(), _BYE_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("the broker did not answer our goodbye within %.0f s; closing anyway", _BYE_WAIT_S)

    async def _drain(self) -> None:
        """Graceful stop, while the socket still serves (aborts and heartbeats flow): in-flight requests may
        finish until drain_s has passed, then the rest are aborted and their partial outputs go out as
        results. A second signal skips the wait."""
        if self.jobs:
            log.info("stopping: waiting up to %.0f s for %d request(s)", self.drain_s, len(self.jobs))
        deadline = time.monotonic() + self.drain_s
        while self.jobs and self._stopping < Stop.NOW and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.jobs:
            log.info("stopping: aborting %d request(s) still running", len(self.jobs))
            await self._abort(list(self.jobs))
            if self.jobs:  # vLLM's abort can yield, and every request end meanwhile
                await asyncio.wait([j.task for j in self.jobs.values()], timeout=5.0)
            if self.jobs:
                log.warning("stopping: %d aborted request(s) not ended after 5 s", len(self.jobs))

    def _heartbeat(self) -> p.Heartbeat:
        return p.Heartbeat(inflight=len(self.jobs), stopping=bool(self._stopping))

    def _ready(self) -> p.Ready:
        on_gpu = any(d.startswith("GPU-") for d in self.devices)
        return p.Ready(worker=self.id, model=self.model, devices=self.devices, capacity=self.capacity,
                       weight_version=self.weight_version, transports=["path", "shm"] + ["cuda_ipc"] * on_gpu,
                       pid=os.getpid(), host=socket.gethostname(),
                       engine={"vllm": eng.vllm_version(),
                               "tensor_parallel_size": self.engine.vllm_config.parallel_config.tensor_parallel_size})

    def _send(self, msg: p.Message) -> None:
        s = self.sock
        if s is None:
            return
        try:
            sockets.send(s, p.encode(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # Only when the broker has stopped reading for HWM messages: it is gone or wedged, and it fails
            # these requests itself when it expires us.
            log.warning("send queue to the broker is full; dropped %s", type(msg).__name__)
        if not self._reading and sockets.readable(s):
            # A send can consume the FD's edge for messages that arrived meanwhile: read them soon (the reader's
            # own loop checks this anyway after each message).
            self._loop.call_soon(self._on_readable)

    # ----------------------------------------------------------------------------------------- messages

    def _on_readable(self) -> None:
        s = self.sock
        self._reading = True
        try:
            # ZMQ_EVENTS says when the queue is empty: a receive that raises Again costs twice as much, and it
            # is the last thing done for every message that comes alone (perf/results/README.md)
            while s is not None and sockets.readable(s):
                frames = sockets.recv(s, zmq.NOBLOCK)
                self._last_heard, self._heard = time.monotonic(), True
                self._on_message(frames)
        finally:
            self._reading = False

    def _on_message(self, frames: list) -> None:
        try:
            msg = p.decode(frames, p.BROKER_TO_WORKER)
        except RolloutdError as e:
            log.warning("bad message from the broker: %s", str(e)[:300])
            rids, cid = p.ids_of(frames)
            self._send(p.Error(code=e.code, message=str(e)[:1000], rid=rids[0] if rids else None, cid=cid))
            return
        cmd = msg.CMD
        if cmd is p.Cmd.GENERATE:
            refusal = self._refusal()
            if refusal is not None:
                self._send(p.Error(code=refusal.code, rid=msg.rid, message=str(refusal)))
            elif msg.rid in self.jobs:
                self._send(p.Error(code=BadRequest.code, rid=msg.rid, message="duplicate request id"))
            else:
                job = self.jobs[msg.rid] = _Job(msg)
                job.task = asyncio.create_task(self._generate(job, msg))
        elif cmd is p.Cmd.PING:
            self._send(p.Reply(cid=msg.cid, data={"from": self.id}))
        elif cmd is p.Cmd.HEARTBEAT:
            pass
        elif cmd is p.Cmd.DISCONNECT:
            if msg.reason == p.BYE and self._bye is not None:
                self._bye.set()
                return
            log.warning("broker says: %s", msg.reason)
            self._session_over.set()
        else:  # the rest of BROKER_TO_WORKER: commands that may take a while
            self._background(self._control(msg))

    def _refusal(self) -> RolloutdError | None:
        if self._stopping:
            return ShuttingDown(f"worker {self.id} is stopping")
        if self.sleeping:
            return Paused(f"worker {self.id} is asleep (level {self.sleeping}); wake it first")
        if self.paused and self.refuse_while_paused:
            return Paused(f"worker {self.id} is paused and refuses new requests until resume")
        if self.updates.incomplete:
            return WeightsIncomplete(f"worker {self.id}: a weight update failed part-way; it serves again once a "
                                     "complete update lands")
        return None  # while paused without refusing, vLLM holds new requests until resume

    async def _control(self, msg) -> None:
        """Commands that may take a while run as tasks: heartbeats and other messages go on meanwhile."""
        try:
            data = await self._handle_control(msg)
            self._send(p.Reply(cid=msg.cid, ok=True, data=data))
        except RolloutdError as e:
            self._send(p.Error(code=e.code, cid=msg.cid, message=str(e)))
        except Exception as e:  # vLLM raised: this worker's answer says so, and it keeps serving
            log.exception("%s failed", type(msg).__name__)
            self._send(p.Error(code=EngineError.code, cid=msg.cid, message=f"{type(e).__name__}: {e}"))

    async def _handle_control(self, msg) -> dict:
        cmd = msg.CMD
        if cmd is p.Cmd.ABORT:
            known = [r for r in msg.rids if r in self.jobs]
            unknown = [r for r in msg.rids if r not in self.jobs]  # finished meanwhile
            await self._abort(known)
            return {"aborted": len(known), "unknown": unknown}
        if cmd is p.Cmd.ABORT_ALL:
            rids = list(self.jobs)
            await self._abort(rids)
            return {"aborted": len(rids)}
        if cmd is p.Cmd.PAUSE:
            return await self.pause(msg.mode, msg.refuse)
        if cmd is p.Cmd.RESUME:
            return await self.resume()
        if cmd is p.Cmd.LOAD_WEIGHTS:
            return await self.updates.begin(msg)
        if cmd is p.Cmd.WEIGHTS_BUCKET:
            return await self.updates.bucket(msg)
        if cmd is p.Cmd.WEIGHTS_END:
            return await self.updates.end(msg)
        if cmd is p.Cmd.READ_WEIGHTS:
            ranks = await self.engine.collective_rpc("rolloutd_read_params", args=(msg.names, msg.count))
            return {"ranks": ranks, "weight_version": self.weight_version}
        if cmd is p.Cmd.SLEEP:
            return await self._sleep(msg.level)
        if cmd is p.Cmd.WAKE:
            if not self.sleeping:
                return {"sleeping": 0}
            await self.engine.wake_up(msg.tags or None)
            if not msg.tags or set(msg.tags) >= {"weights", "kv_cache"}:
                self.sleeping = 0
            return {"sleeping": self.sleeping, "tags": msg.tags or ["weights", "kv_cache"]}
        raise Unsupported(f"{type(msg).__name__} is not implemented by this worker yet")

    async def resume(self) -> dict:
        if self.paused and self._engine_paused:
            await self.engine.resume_generation()
        self.paused, self.refuse_while_paused, self._engine_paused = None, False, False
        return {"paused": False}

    async def pause(self, mode: str, refuse: bool) -> dict:
        inflight = len(self.jobs)
        if hasattr(self.engine, "pause_generation"):
            # vLLM does the mode's work in its scheduler: abort, drain, or freeze what it holds; requests
            # that arrive while paused wait in it until resume.
            self.paused, self.refuse_while_paused = mode, refuse
            before = [j.task for j in self.jobs.values()]
            await eng.pause_scheduler(self.engine, mode, clear_cache=mode != "keep")
            self._engine_paused = True
            if mode != "keep" and before:
                # vLLM is done with them; their tasks end in a moment. Waiting for that puts every result
                # on the wire ahead of this reply, so the caller has them all once pause returns.
                await asyncio.wait(before, timeout=_PAUSE_SETTLE_S)
        elif mode == "keep":
            raise Unsupported(f"vLLM {eng.vllm_version()} cannot freeze requests (pause mode keep)")
        else:
            # Older vLLM: do abort / wait ourselves; new requests are refused while paused.
            self.paused, self.refuse_while_paused = mode, True
            if mode == "abort":
                await self._abort(list(self.jobs))
            while self.jobs:
                await asyncio.sleep(0.01)
        return {"paused": True, "mode": mode, "inflight_at_pause": inflight, "inflight": len(self.jobs)}

    async def _sleep(self, level: int) -> dict:
        cfg = self.engine.vllm_config.model_config
        if not getattr(cfg, "enable_sleep_mode", False):
            raise Unsupported("sleep mode is off: start the worker with --enable-sleep-mode (GPU only)")
        if eng.on_cpu():
            raise Unsupported("vLLM cannot sleep on CPU")
        aborted = len(self.jobs)
        await self._abort(list(self.jobs))
        await self.engine.sleep(level)
        self.sleeping = level
        return {"sleeping": level, "aborted": aborted}

    # ------------------------------------------------------------------------------------------ requests

    async def _generate(self, job: _Job, msg: p.Generate) -> None:
        rid = msg.rid
        try:
            ids = self._prompt_ids(msg)
            job.prompt_tokens = len(ids)
            params = eng.sampling_params(msg.sampling, msg.stream)  # BadRequest for what vLLM refuses
            if rid in self._aborting:
                # aborted before its task first ran (512 arrive at once, adding each to vLLM takes a while):
                # it ends here, with no tokens, and never reaches the engine
                self._finish(job)
                return
            async for out in eng.generate(self.engine, eng.tokens_prompt(ids), params, rid, job.hold):
                if job.done:
                    continue  # the abort sent its result already (_send_aborted): this is that last output
                step = eng.accumulate(job.states, out, job.want_lp)
                if msg.stream and step:
                    self._send(p.Tokens(rid=rid, deltas=[[i, t] for i, _, t in step],
                                        frames=[p.pack_ids(new) for _, new, _ in step]))
            if not job.done:
                self._finish(job)
        except asyncio.CancelledError:
            raise
        except BadRequest as e:  # the request itself: vLLM refused it, or its prompt cannot be rendered
            self._send(p.Error(code=BadRequest.code, rid=rid, message=str(e)[:2000]))
        except Exception as e:
            log.exception("request %s failed", rid)
            self._send(p.Error(code=EngineError.code, rid=rid, message=f"{type(e).__name__}: {e}"))
            if getattr(self.engine, "errored", False):
                # The engine process is gone: stop at once (what we hold fails as EngineError) so that the
                # launcher or the service manager sees the exit instead of a worker that fails everything.
                log.error("the vLLM engine died; stopping this worker")
                self.exit_code = 1
                self.stops.force(Stop.NOW)
                if self._session_over is not None:
                    self._session_over.set()
        finally:
            self.jobs.pop(rid, None)
            self._aborting.discard(rid)

    def _finish(self, job: "_Job") -> None:
        job.done = True
        self._queue_result((job.rid, job.prompt_tokens, eng.samples_of(job.states, job.n, job.want_lp)))

    def _send_aborted(self, rids: list[str]) -> None:
        """Right after vLLM's abort(): each request's final output waits in its collector, and its task would
        take it from there, one wake-up per request. Their results leave now instead, in one go (the cost of
        those wake-ups is in perf/results/README.md); each task then finds its job done and just ends.
        Streams are left to their tasks, whose last delta must go out as Tokens first."""
        sent = 0
        # No garbage collection until they are out, and the abort's reply too: the burst allocates enough to
        # set off collections amid it, up to the oldest generation. The collector comes back on once the
        # callbacks queued now have run; the reply leaves before (_control sends it as _abort returns).
        if gc.isenabled():
            gc.disable()
            self._loop.call_soon(gc.enable)
        for rid in rids:
            job = self.jobs.get(rid)
            if job is None or job.done or job.stream or job.collector is None:
                continue
            out = eng.final_output(job.collector)
            if out is not None:
                eng.accumulate(job.states, out, job.want_lp)
                self._finish(job)
                sent += 1
        self._flush_results()  # not at the end of this loop turn: 512 task wake-ups are queued ahead of it
        log.info("aborted %d request(s); %d result(s) sent at once", len(rids), sent)

    def _queue_result(self, ended: tuple) -> None:
        """Requests finished in one event-loop turn leave together, as one message (protocol.Finished):
        ended = (rid, prompt tokens, its samples as engine.samples_of gives them)."""
        if not self._outbox:
            self._loop.call_soon(self._flush_results)
        self._outbox.append(ended)
        self._outbox_bytes += sum(5 * len(ids) + len(text) for _, text, _, ids, _ in ended[2])  # ids, logprobs, text
        if len(self._outbox) >= _BATCH_RESULTS or self._outbox_bytes > _MAX_BATCH_BYTES:
            self._flush_results()

    def _flush_results(self) -> None:
        if self._outbox:
            self._send(p.Finished.pack(self.id, self.weight_version, self._outbox))
        self._outbox, self._outbox_bytes = [], 0

    def _prompt_ids(self, msg: p.Generate) -> list[int]:
        if msg.prompt is None:
            return p.unpack_ids(msg.frames[0])
        if isinstance(msg.prompt, str):
            return self.tokenizer.encode(msg.prompt)
        try:
            ids = self.tokenizer.apply_chat_template(msg.prompt, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the model's template refuses these messages (a role it lacks, say)
            raise BadRequest(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    async def _abort(self, rids: list[str]) -> None:
        if not rids:
            return
        self._aborting.update(rids)
        await self.engine.abort(rids)
        self._send_aborted(rids)
        if self._reaborts is None or self._reaborts.done():
            self._reaborts = asyncio.create_task(self._reabort())

    async def fail_all(self, err: RolloutdError) -> None:
        """End every request held here with err (not with a result), and take them out of the engine."""
        rids = list(self.jobs)
        for rid in rids:
            self.jobs[rid].done = True  # its task and the abort below send nothing more for it
            self._send(p.Error(code=err.code, rid=rid, message=str(err)))
        await self._abort(rids)

    def _background(self, coro) -> None:
        """A task nobody awaits, kept referenced until done (asyncio holds tasks only weakly)."""
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _reabort(self) -> None:
        """Abort again, until every one has ended, the requests that vLLM did not know yet when asked."""
        while self._aborting:
            await asyncio.sleep(_REABORT_EVERY_S)
            if self._aborting:
                await self.engine.abort(list(self._aborting))


def run_worker(opts: eng.EngineOptions, broker: str, *, worker_id: str | None = None, capacity: int | None = None,
               weight_version: int = 0, heartbeat_s: float = config.HEARTBEAT_S, liveness: int = config.LIVENESS,
               drain_s: float = config.DRAIN_S, keys: str | None = None, engine_log: str | None = None) -> int:
    """Build the engine, serve until SIGTERM/SIGINT, shut the engine down. Returns the exit code. vLLM's
    engine processes write to engine_log (default: a file in the temporary folder, named in the log);
    an engine that cannot start raises engine.EngineStartError."""

    ctx = zmq.Context()  # its own, so that ending it waits for the last results to leave (see _session)
    engine_log = engine_log or os.path.join(tempfile.gettempdir(), f"rolloutd-engine-{os.getpid()}.log")
    log.info("starting the vLLM engine; its processes log to %s", engine_log)

    async def main() -> int:
        engine = eng.start_engine(dataclasses.replace(opts, drain_s=drain_s), engine_log)
        shielded_core = await eng.shield_signals(engine, True)  # this worker owns the stop (stopping.py)
        # vLLM and torch leave millions of long-lived objects; a full collection walking them would stall the
        # loop at a random moment (say, amid an abort of 512 requests). Freeze them out of the collector.
        gc.collect()
        gc.freeze()
        try:
            w = Worker(engine, broker, worker_id=worker_id, model=opts.model, capacity=capacity,
                       weight_version=weight_version, heartbeat_s=heartbeat_s, liveness=liveness, drain_s=drain_s,
                       keys=keys, ctx=ctx)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, w.request_stop)
            log.info("worker %s serving %s, broker %s", w.id, opts.model, broker)
            await w.run()
            return w.exit_code
        finally:
            # The last results leave before the engine's own shutdown starts: vLLM's teardown can outlast the
            # socket's linger, and what was still queued would be lost.
            ctx.term()
            if shielded_core:
                await eng.shield_signals(engine, False)
            engine.shutdown()

    return asyncio.run(main())
