"""A worker's side of weight updates: pause, have every engine rank load (hijack/receive.py through
collective_rpc), then publish the new version and resume, or drop the update and serve on.

One update is open at a time. A worker whose ranks use several GPUs takes it from one trainer process per
GPU, each sending its own LoadWeights / WeightsBucket / WeightsEnd (its "part"; each engine rank reads the
buffers on its own GPU): the first part begins the update, the others join it, and it commits when every
part has ended; any part's failure drops it for all. While it is open, generation is paused in the
caller's mode (unless it was paused already, by the caller's own pause). It ends by the trainer's WeightsEnd, by a failure, or by its deadline:
a trainer that goes silent for `timeout_s` (killed half-way, say) has its update dropped, so no worker
waits for it forever. After a dropped atomic update the old weights serve as before; after a dropped
direct one the worker refuses requests (WeightsIncomplete) until a complete update lands.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from . import protocol as p
from .errors import BadRequest, Busy, EngineError, Paused, WeightsIncomplete, from_code
from .hijack.devices import GPU_PREFIX, HOST

log = logging.getLogger("rolloutd.worker")

# Dropping an update (after a failure or a deadline) asks the engine at most this long.
_DROP_TIMEOUT_S = 60.0


@dataclass
class _Open:
    update: str  # the first part's id: what the engine ranks know the update by
    version: int
    atomic: bool
    paused_here: bool  # this update paused generation, and resumes it at its end
    manifest: list
    expected: set  # the devices a part must come from: "host", or every GPU of this worker's ranks
    parts: dict = field(default_factory=dict)  # part id -> its device
    ended: set = field(default_factory=set)  # part ids that sent WeightsEnd(commit)
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # buckets load one at a time, in order
    timer: asyncio.Task | None = None
    buckets: int = 0
    ms: dict = field(default_factory=lambda: {"pause": 0.0, "begin": 0.0, "buckets": 0.0, "commit": 0.0, "resume": 0.0})


class WeightUpdates:
    def __init__(self, worker):
        self.worker = worker
        self.open: _Open | None = None
        self.incomplete = False  # a direct update failed part-way: serve nothing until a complete one lands

    @property
    def engine(self):
        return self.worker.engine

    # -------------------------------------------------------------------------------------- messages

    async def begin(self, msg: p.LoadWeights) -> dict:
        expected = self._expected(msg.device) if msg.source != "path" else set()
        if self.open is not None:
            return self._join(self.open, msg)
        # Open before the first await, and locked until the ranks have begun: another GPU's trainer may join
        # meanwhile, and its buckets wait for the lock.
        cur = self.open = _Open(msg.update, msg.version, msg.atomic, False, msg.manifest, expected,
                                {msg.update: msg.device})
        async with cur.lock:
            try:
                await self._wake_or_refuse(msg.wake)
                t0 = time.monotonic()
                cur.paused_here = await self._pause(msg.pause)
                cur.ms["pause"] = (time.monotonic() - t0) * 1e3
                if msg.source == "path":
                    data = await self._rpc("rolloutd_weights_from_path", msg.path, timeout=msg.timeout_s)
                    return {**data, **await self._publish(cur)}
                t0 = time.monotonic()
                data = await self._rpc("rolloutd_weights_begin", msg.update, msg.manifest, msg.atomic,
                                       msg.trainer_pid, timeout=msg.timeout_s)
                cur.ms["begin"] = (time.monotonic() - t0) * 1e3
            except BaseException:
                await self._close(cur)  # the ranks did not begin: nothing to undo, and no part waits at its end
                raise
            self._arm(cur, msg.timeout_s)
            return data

    def _expected(self, device: str) -> set:
        """The devices an update from `device` needs a part from: shared memory reaches every rank."""
        if device in ("", HOST):
            return {HOST}
        gpus = {d for d in self.worker.devices if d.startswith(GPU_PREFIX)}
        if device not in gpus:
            raise BadRequest(f"worker {self.worker.id} has no engine rank on {device} (its ranks: "
                             f"{sorted(self.worker.devices)})")
        return gpus

    def _join(self, cur: _Open, msg: p.LoadWeights) -> dict:
        """Another trainer's part of the open update, or Busy."""
        if (msg.source == "path" or msg.version != cur.version or msg.device not in cur.expected
                or msg.device in cur.parts.values() or msg.atomic != cur.atomic):
            raise Busy(f"weight update {cur.update} (v{cur.version}) is still open on worker {self.worker.id}")
        if msg.manifest != cur.manifest:
            raise BadRequest(f"the trainer on {msg.device} sends other tensors for v{cur.version} than the one on "
                             f"{next(iter(cur.parts.values()))}: every part of an update sends the same names, "
                             "dtypes and shapes")
        cur.parts[msg.update] = msg.device
        self._arm(cur, msg.timeout_s)
        return {"tensors": len(msg.manifest), "joined": cur.update}

    async def bucket(self, msg: p.WeightsBucket) -> dict:
        cur = self._current(msg.update)
        self._arm(cur, msg.timeout_s)
        async with cur.lock:
            if self.open is not cur:
                raise BadRequest(f"weight update {msg.update} was dropped on worker {self.worker.id}")
            t0 = time.monotonic()
            try:
                data = await self._rpc("rolloutd_weights_load", cur.update, msg.buffer, msg.tensors,
                                       timeout=msg.timeout_s)
            except BaseException as e:
                await self._drop(cur, f"bucket {msg.index} failed: {e}")
                raise
            cur.ms["buckets"] += (time.monotonic() - t0) * 1e3
            cur.buckets += 1
        return data

    async def end(self, msg: p.WeightsEnd) -> dict:
        if not msg.commit and (self.open is None or msg.update not in self.open.parts):
            return {"dropped": False}  # gone already (failed, or its deadline passed)
        cur = self._current(msg.update)
        async with cur.lock:
            if self.open is not cur:
                raise BadRequest(f"weight update {msg.update} was dropped on worker {self.worker.id}")
            if not msg.commit:
                return await self._drop(cur, f"the trainer on {cur.parts[msg.update]} dropped it")
            cur.ended.add(msg.update)
            waiting = cur.expected - {cur.parts[u] for u in cur.ended}
            if waiting:
                self._arm(cur, msg.timeout_s)
                log.info("weight update v%d: waiting for the part(s) from %s", cur.version, sorted(waiting))
            else:
                t0 = time.monotonic()
                try:
                    data = await self._rpc("rolloutd_weights_end", cur.update, True, timeout=msg.timeout_s)
                except BaseException as e:
                    await self._drop(cur, f"commit failed: {e}")
                    raise
                cur.ms["commit"] = (time.monotonic() - t0) * 1e3
                cur.outcome.set_result({**data, **await self._publish(cur)})
        return await asyncio.shield(cur.outcome)  # the last part to end commits for all

    # ------------------------------------------------------------------------------------------ steps

    async def _publish(self, cur: _Open) -> dict:
        """Every rank has the new weights: serve them as the new version, from an empty prefix cache."""
        self.worker.weight_version = cur.version
        self.incomplete = False
        t0 = time.monotonic()
        flushed = await self.engine.reset_prefix_cache()
        await self._close(cur)
        cur.ms["resume"] = (time.monotonic() - t0) * 1e3
        took = time.monotonic() - cur.started
        log.info("weights v%d loaded in %.3f s (%d bucket(s)); ms: %s", cur.version, took, cur.buckets,
                 {k: round(v, 1) for k, v in cur.ms.items()})
        # Where the time went, on this worker (the rest of the caller's wait is the trainer's packing and the
        # messages): pause, manifest check, loading every bucket, commit, cache flush and resume.
        return {"weight_version": cur.version, "prefix_cache_reset": bool(flushed), "seconds": took,
                "buckets": cur.buckets, "ms": {k: round(v, 2) for k, v in cur.ms.items()}}

    async def _drop(self, cur: _Open, why: str) -> dict:
        if self.open is not cur:
            return {"dropped": False}
        log.warning("weight update %s dropped: %s", cur.update, why)
        incomplete = not cur.atomic and cur.buckets > 0
        try:
            results = await asyncio.wait_for(self.engine.collective_rpc("rolloutd_weights_end", args=(cur.update, False)),
                                             _DROP_TIMEOUT_S)
            incomplete = incomplete or any(isinstance(r, dict) and r.get("incomplete") for r in results)
        except Exception as e:  # the engine could not even drop it: what it holds is unknown
            log.error("the engine failed to drop weight update %s: %s", cur.update, e)
            incomplete = True
        if incomplete:
            self.incomplete = True
            log.error("worker %s holds an incomplete set of weights and refuses requests until a complete "
                      "update lands", self.worker.id)
            # Requests taken while the update ran (waiting for resume, or frozen in mode keep) must not run on
            # these weights either.
            await self.worker.fail_all(WeightsIncomplete(f"worker {self.worker.id}: a weight update failed "
                                                         "part-way; it serves again once a complete update lands"))
        await self._close(cur)
        if not cur.outcome.done():  # parts that ended already and wait for the others hear it once it is over
            cur.outcome.set_exception(BadRequest(f"weight update v{cur.version} was dropped on worker "
                                                 f"{self.worker.id}: {why}"))
            cur.outcome.exception()  # retrieved here: no part may be waiting
        return {"dropped": True, "incomplete": incomplete, "weight_version": self.worker.weight_version}

    async def _close(self, cur: _Open) -> None:
        if cur.timer is not None and cur.timer is not asyncio.current_task():
            cur.timer.cancel()
        if self.open is cur:
            self.open = None
            if cur.paused_here:
                await self.worker.resume()

    def _arm(self, cur: _Open, timeout_s: float) -> None:
        """(Re)start the update's deadline: timeout_s from now without word from the trainer drops it."""
        if cur.timer is not None:
            cur.timer.cancel()

        async def expire():
            await asyncio.sleep(timeout_s)
            async with cur.lock:
                missing = cur.expected - set(cur.parts.values())
                await self._drop(cur, f"no word from the trainer for {timeout_s:g} s" if not missing else
                                 f"no trainer on {sorted(missing)} joined it in {timeout_s:g} s: a worker whose "
                                 "ranks use several GPUs takes each update from one trainer process per GPU, each "
                                 "calling update_weights with the same version")

        cur.timer = asyncio.create_task(expire())

    def _current(self, update: str) -> _Open:
        if self.open is None or update not in self.open.parts:
            raise BadRequest(f"no weight update {update} is open on worker {self.worker.id} "
                             "(it failed, was dropped, or its deadline passed)")
        return self.open

    async def _wake_or_refuse(self, wake: bool) -> None:
        if not self.worker.sleeping:
            return
        if not wake:
            raise Paused(f"worker {self.worker.id} is asleep (level {self.worker.sleeping}): wake it first, or "
                         "pass wake=True to update_weights")
        await self.engine.wake_up(None)
        self.worker.sleeping = 0

    async def _pause(self, mode: str) -> bool:
        if self.worker.paused:
            return False  # the caller paused it: it stays paused until the caller resumes
        await self.worker.pause(mode, False)
        return True

    async def _rpc(self, method: str, *args, timeout: float) -> dict:
        """Run a receive step on every engine rank; a rank's refusal raises its typed error."""
        try:
            results = await asyncio.wait_for(self.engine.collective_rpc(method, args=args), timeout)
        except asyncio.TimeoutError:
            raise EngineError(f"the engine did not finish {method} within {timeout:.0f} s") from None
        merged: dict = {}
        for rank, r in enumerate(results):
            if isinstance(r, dict) and "error" in r:
                raise from_code(r["error"], f"engine rank {rank}: {r.get('message', '')}")
            if isinstance(r, dict):
                merged.update(r)
        return merged

