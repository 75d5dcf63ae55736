"""A worker: one DEALER to the broker in front of one vLLM AsyncLLM (one GPU, or one tensor-parallel group).

Everything runs on one asyncio loop: the receive loop (which also sends heartbeats, so a long batch never
looks like a dead worker: generation runs in its own tasks and in vLLM's engine process), one task per
request, and vLLM's own output handler. A broker silent for LIVENESS intervals is presumed gone: the worker
aborts what it holds (nobody waits for it any more) and reconnects with back-off, READY again.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

import zmq
import zmq.asyncio

from . import config
from . import engine as eng
from . import protocol as p
from .errors import BadRequest, EngineError, RolloutdError, ShuttingDown, Unsupported

log = logging.getLogger("rolloutd.worker")

# How long after an abort the worker re-sends it for requests that were still being added to the engine
# when it came (vLLM cannot abort a request it has not registered yet), and how often.
_REABORT_EVERY_S = 0.05
_REABORT_TRIES = 20


class Worker:
    def __init__(self, engine, broker: str = config.BACK, *, worker_id: str | None = None, model: str = "",
                 capacity: int | None = None, weight_version: int = 0, heartbeat_s: float = config.HEARTBEAT_S,
                 liveness: int = config.LIVENESS, drain_s: float = 30.0, ctx: zmq.asyncio.Context | None = None):
        self.engine = engine
        self.broker = broker
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.model = model
        self.capacity = capacity or 4 * eng.max_num_seqs(engine)  # vLLM queues beyond its batch
        self.weight_version = weight_version
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.drain_s = drain_s
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.tasks: dict[str, asyncio.Task] = {}  # rid -> the task serving it
        self.devices: list[str] = ["cpu"]
        self.tokenizer = None
        self.sock: zmq.asyncio.Socket | None = None
        self._stopping = 0  # 0 running, 1 draining (first signal), 2 stop now (second signal)
        self._drain_deadline: float | None = None

    # ---------------------------------------------------------------------------------------- lifecycle

    async def prepare(self) -> None:
        self.tokenizer = await eng.tokenizer(self.engine)
        try:
            uuids = await self.engine.collective_rpc("rolloutd_device_uuid")
            self.devices = sorted(set(uuids))
        except Exception as e:  # the extension could not load: serve anyway, say so
            log.warning("could not ask the engine for its devices (%s); reporting cpu", e)

    def request_stop(self) -> None:
        """First call: finish in-flight work (up to drain_s), take nothing new. Second call: stop now."""
        self._stopping += 1

    async def run(self) -> None:
        await self.prepare()
        backoff = self.heartbeat_s
        while not self._stopping:
            self._connect()
            heard = await self._session()
            self._close_socket()
            if self._stopping:
                break
            await self._abort(list(self.tasks))  # the broker forgot these requests: nobody waits for them
            backoff = self.heartbeat_s if heard else min(backoff * 2, 30.0)
            log.warning("broker at %s silent; reconnecting in %.1f s", self.broker, backoff)
            await asyncio.sleep(backoff)

    def _connect(self) -> None:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, self.id.encode())
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, config.HWM)
        s.setsockopt(zmq.RCVHWM, config.HWM)
        s.connect(self.broker)
        self.sock = s

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    async def _session(self) -> bool:
        """One registration with the broker, until it goes silent or we stop. Returns whether it was heard."""
        await self._send(self._ready())
        heard = False
        last_heard = time.monotonic()
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if self._stopping and await self._drained(now):
                await self._send(p.Disconnect(reason="worker stopping"))
                await asyncio.sleep(0.05)  # let the DEALER flush before the socket closes
                return heard
            if now >= next_beat:
                next_beat = now + self.heartbeat_s
                await self._send(p.Heartbeat(inflight=len(self.tasks)))
            # Twice the broker's patience: the broker expiring a worker is what frees clients; a worker
            # giving up on its broker throws away all it holds, so it waits longer before it does.
            if now - last_heard > 2 * self.heartbeat_s * self.liveness:
                return heard
            wait_s = max(0.0, next_beat - time.monotonic())
            if self._stopping:
                wait_s = min(wait_s, 0.05)
            t_poll = time.monotonic()
            ready = await self.sock.poll(timeout=wait_s * 1000, flags=zmq.POLLIN)
            late = time.monotonic() - t_poll - wait_s
            if late > self.heartbeat_s / 2:
                # This process was not running (a vLLM CPU engine starting a big batch has frozen every
                # process on a 2-core machine for over a second): the broker could not be heard meanwhile.
                log.warning("worker loop stalled %.2f s", late)
                last_heard += late
            if ready:
                while True:
                    try:
                        frames = await self.sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard, heard = time.monotonic(), True
                    if not await self._on_message(frames):
                        return heard

    async def _drained(self, now: float) -> bool:
        """Graceful stop, checked while the session keeps serving (aborts and heartbeats still flow):
        in-flight requests may finish until drain_s has passed, then the rest are aborted and their partial
        outputs go out as results. A second signal skips the wait."""
        if self._drain_deadline is None:
            self._drain_deadline = now + self.drain_s
            if self.tasks:
                log.info("stopping: waiting up to %.0f s for %d request(s)", self.drain_s, len(self.tasks))
        if self.tasks and self._stopping < 2 and now < self._drain_deadline:
            return False
        if self.tasks:
            await self._abort(list(self.tasks))
            await asyncio.wait(list(self.tasks.values()), timeout=5.0)
        return True

    def _ready(self) -> p.Ready:
        return p.Ready(worker=self.id, model=self.model, devices=self.devices, capacity=self.capacity,
                       weight_version=self.weight_version, transports=["path"], pid=os.getpid(),
                       engine={"vllm": eng.vllm_version(),
                               "tensor_parallel_size": self.engine.vllm_config.parallel_config.tensor_parallel_size})

    async def _send(self, msg: p.Message) -> None:
        if self.sock is not None:
            await self.sock.send_multipart(p.encode(msg), copy=False)

    # ----------------------------------------------------------------------------------------- messages

    async def _on_message(self, frames: list) -> bool:
        """Handle one message from the broker; False ends the session (the broker asked us to re-register)."""
        try:
            msg = p.decode(frames)
        except RolloutdError as e:
            log.warning("bad message from the broker: %s", e)
            return True
        cmd = msg.CMD
        if cmd is p.Cmd.GENERATE:
            if self._stopping:
                await self._send(p.Error(code=ShuttingDown.code, rid=msg.rid, message=f"worker {self.id} is stopping"))
            elif msg.rid in self.tasks:
                await self._send(p.Error(code=BadRequest.code, rid=msg.rid, message="duplicate request id"))
            else:
                self.tasks[msg.rid] = asyncio.create_task(self._generate(msg))
        elif cmd is p.Cmd.ABORT:
            known = [r for r in msg.rids if r in self.tasks]
            await self._abort(known)
            unknown = [r for r in msg.rids if r not in known]
            await self._send(p.Reply(cid=msg.cid, data={"aborted": len(known), "unknown": unknown}))
        elif cmd is p.Cmd.ABORT_ALL:
            rids = list(self.tasks)
            await self._abort(rids)
            await self._send(p.Reply(cid=msg.cid, data={"aborted": len(rids)}))
        elif cmd is p.Cmd.PING:
            await self._send(p.Reply(cid=msg.cid, data={"from": self.id}))
        elif cmd is p.Cmd.HEARTBEAT:
            pass
        elif cmd is p.Cmd.DISCONNECT:
            log.warning("broker says: %s", msg.reason)
            return False
        elif cmd in (p.Cmd.SLEEP, p.Cmd.WAKE, p.Cmd.PAUSE, p.Cmd.RESUME, p.Cmd.LOAD_WEIGHTS):
            asyncio.create_task(self._control(msg))
        else:
            await self._send(p.Error(code="protocol", cid=getattr(msg, "cid", None),
                                     message=f"workers do not take {type(msg).__name__}"))
        return True

    async def _control(self, msg) -> None:
        """Engine-state commands run as tasks: they may take seconds and must not stall heartbeats."""
        try:
            data = await self._engine_state(msg)
            await self._send(p.Reply(cid=msg.cid, ok=True, data=data))
        except RolloutdError as e:
            await self._send(p.Error(code=e.code, cid=msg.cid, message=str(e)))
        except Exception as e:  # vLLM raised: report it as this worker's answer, keep serving
            log.exception("%s failed", type(msg).__name__)
            await self._send(p.Error(code=EngineError.code, cid=msg.cid, message=f"{type(e).__name__}: {e}"))

    async def _engine_state(self, msg) -> dict:
        raise Unsupported(f"{type(msg).__name__} is not implemented by this worker yet")

    # ------------------------------------------------------------------------------------------ requests

    async def _generate(self, msg: p.Generate) -> None:
        rid = msg.rid
        want_lp = bool(msg.sampling.get("logprobs"))
        states: dict[int, eng.SampleState] = {}
        ids: list[int] = []
        try:
            ids = self._prompt_ids(msg)
            params = eng.sampling_params(msg.sampling, msg.stream)
            async for out in self.engine.generate(eng.tokens_prompt(ids), params, rid):
                step = eng.accumulate(states, out, want_lp)
                if msg.stream and step:
                    await self._send(p.Tokens(rid=rid, deltas=[[i, t] for i, _, t in step],
                                              frames=[p.pack_ids(new) for _, new, _ in step]))
            await self._send(eng.result_message(rid, self.id, self.weight_version, states, msg.n, len(ids), want_lp))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, BadRequest) or eng.is_client_error(e):
                await self._send(p.Error(code=BadRequest.code, rid=rid, message=str(e)))
                return
            log.exception("request %s failed", rid)
            await self._send(p.Error(code=EngineError.code, rid=rid, message=f"{type(e).__name__}: {e}"))
        finally:
            self.tasks.pop(rid, None)

    def _prompt_ids(self, msg: p.Generate) -> list[int]:
        if msg.prompt is None:
            return p.unpack_ids(msg.frames[0])
        if isinstance(msg.prompt, str):
            return self.tokenizer.encode(msg.prompt)
        ids = self.tokenizer.apply_chat_template(msg.prompt, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    async def _abort(self, rids: list[str]) -> None:
        if not rids:
            return
        await self.engine.abort(rids)
        asyncio.create_task(self._reabort(rids))

    async def _reabort(self, rids: list[str]) -> None:
        for _ in range(_REABORT_TRIES):
            await asyncio.sleep(_REABORT_EVERY_S)
            left = [r for r in rids if r in self.tasks]
            if not left:
                return
            await self.engine.abort(left)


def run_worker(opts: eng.EngineOptions, broker: str, *, worker_id: str | None = None, capacity: int | None = None,
               weight_version: int = 0, heartbeat_s: float = config.HEARTBEAT_S, liveness: int = config.LIVENESS,
               drain_s: float = 30.0) -> int:
    """Build the engine, serve until SIGTERM/SIGINT, shut the engine down. Returns the exit code."""

    async def main() -> None:
        engine = eng.build_engine(opts)
        try:
            w = Worker(engine, broker, worker_id=worker_id, model=opts.model, capacity=capacity,
                       weight_version=weight_version, heartbeat_s=heartbeat_s, liveness=liveness, drain_s=drain_s)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, w.request_stop)
            log.info("worker %s serving %s, broker %s", w.id, opts.model, broker)
            await w.run()
        finally:
            engine.shutdown()

    asyncio.run(main())
    return 0
