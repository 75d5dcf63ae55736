"""A stand-in for vLLM's AsyncLLM that a test drives step by step, for tests of the worker's own rules.

It offers what rolloutd/engine.py and rolloutd/worker.py use of AsyncLLM, with vLLM's semantics where the
worker depends on them:
  - add_request() returns a collector like vLLM's RequestOutputCollector: put() merges DELTA outputs
    (token ids, text and logprobs appended) or replaces a FINAL_ONLY one; get() waits; get_nowait() and
    `.output` show what is pending.
  - a streamed (DELTA) request gets one output per step with each sample's new tokens; a FINAL_ONLY one
    gets one output when every sample has finished, holding all their tokens.
  - abort() puts each aborted request's final output (finish_reason "abort", partial tokens) into its
    collector before it returns, and ignores ids it does not know (yet, or any more). It returns with no
    task switch, as vLLM's does when its socket to the engine process takes the message at once; with
    abort_yields=True other tasks run before it returns, as when that send has to wait.
  - pause_generation(): "abort" ends what runs as abort does; "wait" returns once what ran at the pause
    has finished; "keep" freezes it. Requests added while paused wait until resume_generation().
Nothing advances by itself: step(k) gives every running request k tokens per sample, so a test knows at
each point exactly what the engine holds and has produced. A test can also hold add_request() or
pause_generation() until it releases them (vLLM still processing the input, or waiting for its engine
process), and have an abort land right after an engine step whose outputs nobody has read (step_at_abort).
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from vllm.sampling_params import RequestOutputKind


class Completion:
    """Like vllm.outputs.CompletionOutput: one sample's share of an output."""

    def __init__(self, index: int, token_ids: list[int], text: str, logprobs, finish_reason: str | None):
        self.index, self.token_ids, self.text = index, token_ids, text
        self.logprobs, self.finish_reason = logprobs, finish_reason


class Output:
    """Like vllm.outputs.RequestOutput."""

    def __init__(self, request_id: str, outputs: list[Completion], finished: bool):
        self.request_id, self.outputs, self.finished = request_id, outputs, finished

    def add(self, nxt: "Output", aggregate: bool) -> None:
        """RequestOutput.add: merge a later output into this one (what the collector does when the reader
        is behind)."""
        self.finished |= nxt.finished
        for c in nxt.outputs:
            for i, mine in enumerate(self.outputs):
                if mine.index == c.index:
                    if aggregate:
                        mine.token_ids = list(mine.token_ids) + list(c.token_ids)
                        mine.text += c.text
                        if c.logprobs:
                            mine.logprobs = (mine.logprobs or []) + c.logprobs
                        mine.finish_reason = c.finish_reason
                    else:
                        self.outputs[i] = c
                    break
            else:
                self.outputs.append(c)


class Collector:
    """Like vllm.v1.engine.output_processor.RequestOutputCollector."""

    def __init__(self, request_id: str, aggregate: bool):
        self.request_id, self.aggregate = request_id, aggregate
        self.output: Output | None = None
        self.ready = asyncio.Event()
        self.closed = False

    def put(self, out: Output) -> None:
        if self.output is None:
            self.output = out
            self.ready.set()
        else:
            self.output.add(out, aggregate=self.aggregate)

    async def get(self) -> Output:
        while (out := self.output) is None:
            await self.ready.wait()
        self.output = None
        self.ready.clear()
        return out

    def get_nowait(self) -> Output | None:
        out = self.output
        if out is not None:
            self.output = None
            self.ready.clear()
        return out

    def close(self) -> None:
        self.closed = True


class Sample:
    def __init__(self, index: int):
        self.index = index
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None


class Request:
    """One request as the engine holds it: what each sample has produced so far."""

    def __init__(self, rid: str, params, collector: Collector):
        self.rid, self.collector = rid, collector
        self.max_tokens = params.max_tokens
        self.delta = params.output_kind == RequestOutputKind.DELTA
        self.want_logprobs = params.logprobs is not None
        self.samples = [Sample(i) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def tokens(self, index: int = 0) -> list[int]:
        return list(self.samples[index].token_ids)


def token(index: int, pos: int) -> int:
    """The token id the fake engine samples at position pos of sample index."""
    return 1000 * (index + 1) + pos


def text(tok: int) -> str:
    return f"<{tok}>"


def logprob(tok: int) -> float:
    return -(tok % 1000 + 1) / 8  # exact in float32, different per position


class FakeEngine:
    """A vLLM AsyncLLM stand-in (see the module's doc). `calls` records every abort / pause / resume /
    collective_rpc in order, as (name, args..., time.monotonic())."""

    def __init__(self, abort_yields: bool = False):
        self.vllm_config = SimpleNamespace(
            parallel_config=SimpleNamespace(tensor_parallel_size=1),
            scheduler_config=SimpleNamespace(max_num_seqs=16),
            model_config=SimpleNamespace(enable_sleep_mode=False))
        self.errored = False
        self.abort_yields = abort_yields
        self.requests: dict[str, Request] = {}  # every request ever added, by id
        self.adding: set[str] = set()  # ids whose add_request() is held (see hold)
        self.paused: str | None = None  # the pause mode while paused
        self._draining: set[str] = set()  # what a pause in mode "wait" lets finish
        self.calls: list[tuple] = []
        self._steps_at_abort = 0
        self._open = {"add_request": asyncio.Event(), "pause_generation": asyncio.Event()}
        for gate in self._open.values():
            gate.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------------------------ driven by tests

    def hold(self, call: str) -> None:
        """From now on `call` ("add_request" or "pause_generation") waits until release(call) before it takes
        effect, as vLLM's do while it processes the input, or while its engine process answers."""
        self._open[call].clear()

    def release(self, call: str) -> None:
        self._open[call].set()

    def step_at_abort(self, k: int) -> None:
        """The next abort() first makes k steps whose outputs its own final outputs then merge into, unread:
        vLLM's output handler can deliver an engine step to the collectors just before an abort lands."""
        self._steps_at_abort = k

    def running(self) -> list[str]:
        """Ids of the requests the engine holds that have not finished."""
        return [rid for rid, r in self.requests.items() if not r.finished]

    def step(self, k: int = 1) -> None:
        """k engine steps: every running request gains one token per sample each step (up to its max_tokens),
        and its collector gets what the request's output kind says. While paused nothing advances, but what
        a pause in mode "wait" is waiting for."""
        for r in [self.requests[rid] for rid in self.running() if not self.paused or rid in self._draining]:
            new: dict[int, list[int]] = {}
            for s in r.samples:
                while s.finish_reason is None and len(new.setdefault(s.index, [])) < k:
                    s.token_ids.append(token(s.index, len(s.token_ids)))
                    new[s.index].append(s.token_ids[-1])
                    if len(s.token_ids) >= r.max_tokens:
                        s.finish_reason = "length"
            self._emit(r, new)
        self._notify()

    async def until(self, pred, timeout: float = 10.0) -> None:
        """Wait until pred() holds, re-checked on every change of the engine's state."""
        async def wait():
            while not pred():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)

    def called(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    # ---------------------------------------------------------------------------- AsyncLLM's surface

    async def add_request(self, request_id: str, prompt, params) -> Collector:
        if request_id in self.requests and not self.requests[request_id].finished:
            raise ValueError(f"request {request_id} already exists")
        self.adding.add(request_id)
        self._notify()
        try:
            await self._open["add_request"].wait()
        finally:
            self.adding.discard(request_id)
        q = Collector(request_id, aggregate=params.output_kind == RequestOutputKind.DELTA)
        self.requests[request_id] = Request(request_id, params, q)
        self._notify()
        return q

    async def abort(self, request_id, internal: bool = False) -> None:
        rids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.calls.append(("abort", rids, internal, time.monotonic()))
        if self._steps_at_abort:
            self.step(self._steps_at_abort)
            self._steps_at_abort = 0
        self._end([rid for rid in rids if rid in self.running()])
        if self.abort_yields:
            await asyncio.sleep(0)

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        self.calls.append(("pause", mode, clear_cache, time.monotonic()))
        self._notify()
        await self._open["pause_generation"].wait()
        self.paused = mode
        if mode == "abort":
            self._end(self.running())
        elif mode == "wait":
            self._draining = set(self.running())  # these run on; the pause returns once they have finished
            self._notify()
            await self.until(lambda: not self._draining & set(self.running()), timeout=60)
            self._draining = set()
        self._notify()

    async def resume_generation(self) -> None:
        self.calls.append(("resume", time.monotonic()))
        self.paused = None
        self._notify()

    async def collective_rpc(self, method: str, timeout=None, args=(), kwargs=None):
        self.calls.append(("collective_rpc", method, args, time.monotonic()))
        if method == "rolloutd_device_uuid":
            return ["fake-device-0"]
        raise NotImplementedError(method)

    def get_tokenizer(self):
        return SimpleNamespace(encode=lambda s: [ord(ch) for ch in s])

    # ------------------------------------------------------------------------------------------ inside

    def _end(self, rids: list[str]) -> None:
        """End these running requests as aborted, each with its final output in its collector."""
        for rid in rids:
            r = self.requests[rid]
            ended = [s for s in r.samples if s.finish_reason is None]
            for s in ended:
                s.finish_reason = "abort"
            self._emit(r, {s.index: [] for s in ended})
        self._notify()

    def _emit(self, r: Request, new: dict[int, list[int]]) -> None:
        if r.delta:
            outs = [self._completion(r, s, new[s.index]) for s in r.samples if s.index in new]
        elif r.finished:
            outs = [self._completion(r, s, s.token_ids) for s in r.samples]
        else:
            return  # FINAL_ONLY: nothing until every sample has finished
        r.collector.put(Output(r.rid, outs, r.finished))

    @staticmethod
    def _completion(r: Request, s: Sample, ids: list[int]) -> Completion:
        lps = [{t: SimpleNamespace(logprob=logprob(t))} for t in ids] if r.want_logprobs else None
        return Completion(s.index, list(ids), "".join(text(t) for t in ids), lps, s.finish_reason)

    def _notify(self) -> None:
        self._changed.set()


class EngineWithoutPause(FakeEngine):
    """An engine from before vLLM had pause_generation (the worker then pauses by itself)."""

    def __getattribute__(self, name):
        if name in ("pause_generation", "resume_generation"):
            raise AttributeError(name)
        return super().__getattribute__(name)
