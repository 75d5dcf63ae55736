"""The three ways `perf/bench.py` drives the same vLLM engines, behind one interface.

    inprocess  vLLM AsyncLLM objects in the harness's own process (the floor: no hop at all)
    rolloutd   `rolloutd up` (broker + workers) in a subprocess, driven through AsyncClient
    ray        the same engines hosted in Ray actors (a local cluster this module starts), driven through
               Ray actor calls, one call per request, as Ray-based rollout workers are driven

Every side builds its engines with rolloutd.engine.build_engine from the same EngineOptions (the rolloutd
side through the equivalent `rolloutd up` flags), takes one call per request, and spreads requests over
its engines round-robin (rolloutd: the broker's least-loaded placement). A request's result is its
samples' token-id lists; a streamed one also records when its first tokens arrived.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import asdict, dataclass

from rolloutd import engine as eng
from rolloutd.launcher import gpu_count

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Done:
    """One request, seen from the caller: token counts, wall time, and time to its first tokens (streamed)."""
    tokens: int
    latency_s: float
    ttft_s: float | None = None
    aborted: bool = False


def engine_flags(opts: eng.EngineOptions) -> list[str]:
    """`rolloutd up` flags that build the same engine as these options do in-process."""
    flags = ["--model", opts.model]
    for flag, value in (("--max-model-len", opts.max_model_len), ("--max-num-seqs", opts.max_num_seqs),
                        ("--gpu-memory-utilization", opts.gpu_memory_utilization),
                        ("--kv-cache-gb", opts.kv_cache_gb)):
        if value is not None:
            flags += [flag, str(value)]
    if opts.enforce_eager:
        flags.append("--enforce-eager")
    for k, v in opts.extra.items():
        flags += ["--engine-arg", f"{k}={v}"]
    return flags


# ------------------------------------------------------------------------------------------ one engine

class EngineHost:
    """One AsyncLLM and the requests it runs: the in-process side holds these directly, each Ray actor
    holds one. Results are what the caller needs to count and check: token ids per sample."""

    def __init__(self, opts: dict):
        self.opts = eng.EngineOptions(**opts)
        self.engine = None
        self.inflight: set[str] = set()

    def start(self) -> None:
        self.engine = eng.build_engine(self.opts)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def generate(self, prompt: list[int], sampling: dict, rid: str) -> list[list[int]]:
        params = eng.sampling_params(sampling, stream=False)
        states: dict = {}
        self.inflight.add(rid)
        try:
            async for out in self.engine.generate(eng.tokens_prompt(prompt), params, rid):
                eng.accumulate(states, out, False)
        finally:
            self.inflight.discard(rid)
        return [states[k].ids for k in sorted(states)]

    async def stream(self, prompt: list[int], sampling: dict, rid: str):
        """Yields each engine step's new token ids (all samples together)."""
        params = eng.sampling_params(sampling, stream=True)
        states: dict = {}
        self.inflight.add(rid)
        try:
            async for out in self.engine.generate(eng.tokens_prompt(prompt), params, rid):
                yield [ids for _, ids, _ in eng.accumulate(states, out, False)]
        finally:
            self.inflight.discard(rid)

    async def abort_all(self) -> int:
        rids = list(self.inflight)
        await self.engine.abort(rids)
        return len(rids)

    async def count_inflight(self) -> int:
        return len(self.inflight)


def _count(samples: list[list[int]]) -> int:
    return sum(len(s) for s in samples)


# ------------------------------------------------------------------------------------------ the sides

class InProcess:
    name = "inprocess"

    def __init__(self, opts: eng.EngineOptions, workers: int):
        self.hosts = [EngineHost(asdict(opts)) for _ in range(workers)]
        self._next = itertools.cycle(self.hosts)

    async def start(self) -> None:
        for h in self.hosts:
            h.start()

    async def stop(self) -> None:
        for h in self.hosts:
            h.stop()

    async def generate(self, prompt, sampling, rid) -> list[list[int]]:
        return await next(self._next).generate(prompt, sampling, rid)

    async def stream(self, prompt, sampling, rid):
        async for step in next(self._next).stream(prompt, sampling, rid):
            yield step

    async def abort_all(self) -> None:
        for h in self.hosts:
            await h.abort_all()

    async def inflight(self) -> int:
        return sum(len(h.inflight) for h in self.hosts)

    def ping(self) -> None:
        raise NotImplementedError("no control plane in-process")


class Rolloutd:
    name = "rolloutd"

    def __init__(self, opts: eng.EngineOptions, workers: int):
        self.opts, self.workers = opts, workers
        self.daemon = self.client = self.sync = None

    async def start(self) -> None:
        from common import Daemon
        from rolloutd import AsyncClient, Client

        flags = engine_flags(self.opts)
        self.daemon = Daemon(flags[1], workers=self.workers, extra=tuple(flags[2:]))
        self.daemon.__enter__()
        self.client = AsyncClient(self.daemon.front, timeout=1800)
        await self.client.__aenter__()
        self.sync = Client(self.daemon.front, timeout=60)  # the control-plane round trip: blocking, as the raw floor

    async def stop(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.client is not None:
            await self.client.close()
        if self.daemon is not None:
            self.daemon.__exit__(None, None, None)

    async def generate(self, prompt, sampling, rid) -> list[list[int]]:
        (res,) = await self.client.generate([prompt], request_ids=[rid], **sampling)
        return [s.token_ids for s in res.samples]

    async def stream(self, prompt, sampling, rid):
        from rolloutd.results import Delta

        async for m in self.client.stream(prompt, request_id=rid, **sampling):
            if isinstance(m, Delta):
                yield [m.token_ids]

    async def abort_all(self) -> None:
        await self.client.abort_all()

    async def inflight(self) -> int:
        return sum(w["inflight"] for w in (await self.client.status(timeout=60))["workers"])

    def ping(self) -> None:
        self.sync.ping("worker")


class Ray:
    name = "ray"

    def __init__(self, opts: eng.EngineOptions, workers: int):
        self.opts, self.workers = opts, workers
        self.actors: list = []
        self._next = None

    async def start(self) -> None:
        import ray

        path = os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        gpus = 1 if not eng.on_cpu() else 0
        # A GPU each when there are GPUs (Ray then sets CUDA_VISIBLE_DEVICES, as for any Ray rollout worker);
        # fractions let several share one, as the other sides' engines share it.
        share = gpus / self.workers if gpus and gpu_count() < self.workers else gpus
        Actor = ray.remote(num_cpus=0, num_gpus=share, max_concurrency=100_000)(RayEngine)
        self.actors = [Actor.remote(asdict(self.opts)) for _ in range(self.workers)]
        await asyncio.gather(*(a.start.remote() for a in self.actors))
        self._next = itertools.cycle(self.actors)

    async def stop(self) -> None:
        import ray

        for a in self.actors:
            try:
                await a.stop.remote()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        ray.shutdown()

    async def generate(self, prompt, sampling, rid) -> list[list[int]]:
        return await next(self._next).generate.remote(prompt, sampling, rid)

    async def stream(self, prompt, sampling, rid):
        gen = next(self._next).stream.options(num_returns="streaming").remote(prompt, sampling, rid)
        async for ref in gen:
            yield await ref

    async def abort_all(self) -> None:
        await asyncio.gather(*(a.abort_all.remote() for a in self.actors))

    async def inflight(self) -> int:
        return sum(await asyncio.gather(*(a.count_inflight.remote() for a in self.actors)))

    def ping(self) -> None:
        import ray
        ray.get(self.actors[0].ping.remote())


class RayEngine(EngineHost):
    """The Ray actor: an EngineHost whose methods are Ray calls (async actor: one event loop, as vLLM needs)."""

    async def start(self) -> None:
        super().start()

    async def stop(self) -> None:
        super().stop()

    async def stream(self, prompt, sampling, rid):
        async for step in super().stream(prompt, sampling, rid):
            yield step

    async def ping(self) -> None:
        return None


SIDES = {"inprocess": InProcess, "rolloutd": Rolloutd, "ray": Ray}


async def run_request(side, prompt, sampling, rid, stream: bool) -> Done:
    t0 = time.perf_counter()
    if not stream:
        return Done(_count(await side.generate(prompt, sampling, rid)), time.perf_counter() - t0)
    tokens, first = 0, None
    async for step in side.stream(prompt, sampling, rid):
        got = sum(len(ids) for ids in step)
        if got and first is None:
            first = time.perf_counter() - t0
        tokens += got
    return Done(tokens, time.perf_counter() - t0, first)
