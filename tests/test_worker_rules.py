"""The worker's own rules, isolated: a real Worker in front of a fake engine that the test steps
(tests/fake_engine.py), its socket connected over inproc to a ROUTER that the test reads and writes as the
broker would. Nothing runs on its own, so each test knows what the engine holds at every point, and the
order in which the worker's messages arrive is the order in which it sent them. (The same rules against
real vLLM are test_lifecycle.py's.)"""
import asyncio
import contextlib
import itertools
import time

import zmq
import zmq.asyncio

from rolloutd import protocol as p
from rolloutd.errors import BadRequest, EngineError, Paused, ShuttingDown, Unsupported
from rolloutd.results import deltas_from_message, from_finished
from rolloutd.stopping import SAME_STOP_S
from rolloutd.worker import Worker

from .fake_engine import EngineWithoutPause, FakeEngine, Output, logprob, text

HEARTBEAT_S = 0.05
_addresses = itertools.count()


def from_worker(frames: list) -> p.Message:
    return p.decode(frames, p.WORKER_TO_BROKER)


class BrokerEnd:
    """The broker's end of the worker's socket. `events` holds everything the worker sent but heartbeats,
    in order, as (kind, item): ("ready", msg), ("delta", results.Delta), ("result", results.Result),
    ("reply", msg), ("error", msg), ("disconnect", msg)."""

    def __init__(self, ctx: zmq.Context):
        self.address = f"inproc://worker-rules-{next(_addresses)}"
        self.sock = zmq.asyncio.Context.shadow(ctx.underlying).socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.worker: bytes | None = None
        self.running: asyncio.Task | None = None  # the worker's run()
        self.events: list[tuple] = []
        self.beats: list[p.Heartbeat] = []

    async def send(self, msg: p.Message) -> None:
        await self.sock.send_multipart([self.worker, *p.encode(msg)])

    async def until(self, pred, timeout: float = 10.0) -> None:
        """Read what the worker sends until pred() holds. Fails at once if the worker's run() ends meanwhile."""
        deadline = time.monotonic() + timeout
        while not pred():
            recv = asyncio.ensure_future(self.sock.recv_multipart())
            await asyncio.wait({recv, self.running}, timeout=deadline - time.monotonic(),
                               return_when=asyncio.FIRST_COMPLETED)
            if not recv.done():
                recv.cancel()
                if self.running.done():
                    self.running.result()  # its exception, if it raised one
                    raise AssertionError(f"the worker stopped; it sent {self.events}")
                raise AssertionError(f"not seen within {timeout} s; the worker sent {self.events}")
            ident, *frames = recv.result()
            self._take(ident, from_worker(frames))

    def _take(self, ident: bytes, msg: p.Message) -> None:
        cmd = msg.CMD
        if cmd is p.Cmd.HEARTBEAT:
            self.beats.append(msg)
        elif cmd is p.Cmd.READY:
            self.worker = ident
            self.events.append(("ready", msg))
        elif cmd is p.Cmd.TOKENS:
            self.events.extend(("delta", d) for d in deltas_from_message(msg))
        elif cmd is p.Cmd.FINISHED:
            self.events.extend(("result", r) for r in from_finished(msg))
        else:
            self.events.append((cmd.name.lower(), msg))

    async def read_sent(self) -> None:
        """Read everything the worker has sent so far (over inproc, a message is readable once sent)."""
        while True:
            try:
                ident, *frames = await self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._take(ident, from_worker(frames))

    async def call(self, msg: p.Message) -> p.Message:
        """Send a command and return the worker's answer to it (a Reply or an Error)."""
        await self.send(msg)
        await self.until(lambda: self.answer(msg.cid) is not None)
        return self.answer(msg.cid)

    def answer(self, cid: str) -> p.Message | None:
        return next((m for kind, m in self.events if kind in ("reply", "error") and m.cid == cid), None)

    def at(self, kind: str, key: str | None = None) -> int:
        """Where in `events` the first one of this kind is (for this request or command id, if given)."""
        return next(i for i, (k, m) in enumerate(self.events)
                    if k == kind and (key is None or key in (getattr(m, "request_id", None), getattr(m, "rid", None),
                                                             getattr(m, "cid", None))))

    def results(self) -> dict:
        return {r.request_id: r for kind, r in self.events if kind == "result"}

    def error(self, rid: str) -> p.Error | None:
        return next((m for kind, m in self.events if kind == "error" and m.rid == rid), None)

    def deltas(self, rid: str, index: int = 0) -> list:
        return [d for kind, d in self.events if kind == "delta" and d.request_id == rid and d.index == index]

    async def results_for(self, *rids: str) -> dict:
        await self.until(lambda: set(rids) <= set(self.results()))
        return self.results()


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine | None = None, drain_s: float = 30.0):
    """A Worker running (its run(), as `rolloutd worker` does) in front of `engine`, registered with the
    test's BrokerEnd. Yields (worker, broker end, engine, the run() task)."""
    engine = engine or FakeEngine()
    ctx = zmq.Context()
    broker = BrokerEnd(ctx)
    w = Worker(engine, broker.address, worker_id="w", heartbeat_s=HEARTBEAT_S, drain_s=drain_s, ctx=ctx)
    run = broker.running = asyncio.create_task(w.run())
    try:
        await broker.until(lambda: broker.worker is not None)
        yield w, broker, engine, run
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        broker.sock.close()
        ctx.destroy(linger=0)


def gen(rid: str, max_tokens: int, n: int = 1, stream: bool = False, logprobs: bool = False) -> p.Generate:
    return p.Generate(rid=rid, sampling={"n": n, "max_tokens": max_tokens, "temperature": 1.0, "logprobs": logprobs},
                      stream=stream, frames=[p.pack_ids([1, 2, 3])])


async def started(b: BrokerEnd, engine: FakeEngine, *msgs: p.Generate) -> None:
    """Send these requests and return once the engine runs every one of them."""
    for m in msgs:
        await b.send(m)
    await engine.until(lambda: {m.rid for m in msgs} <= set(engine.running()))


def assert_as_generated(result, engine: FakeEngine, finish_reason: str, tokens: int) -> None:
    """Every sample of the result is what the engine generated for it, all `tokens` of it, ended so."""
    req = engine.requests[result.request_id]
    assert [s.index for s in result.samples] == list(range(len(req.samples)))
    for s in result.samples:
        ids = req.tokens(s.index)
        assert (s.finish_reason, s.token_ids) == (finish_reason, ids) and len(ids) == tokens, (s, ids)
        assert s.text == "".join(text(t) for t in ids)
        if s.logprobs is not None:
            assert s.logprobs == [logprob(t) for t in ids]


def assert_stream_adds_up(b: BrokerEnd, rid: str) -> None:
    """A stream's deltas came before its result, and add up to it."""
    result = b.results()[rid]
    deltas = b.deltas(rid)
    assert deltas, b.events
    last = max(i for i, (kind, m) in enumerate(b.events) if kind == "delta" and m.request_id == rid)
    assert last < b.at("result", rid), b.events
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert "".join(d.text for d in deltas) == result.text


async def a_and_s_run_to_their_end(b: BrokerEnd, engine: FakeEngine, steps: int, tokens: int) -> None:
    """The engine makes `steps` more steps; requests "a" and "s" (a stream) then end with all `tokens` of theirs."""
    engine.step(steps)
    got = await b.results_for("a", "s")
    assert_as_generated(got["a"], engine, "length", tokens)
    assert_as_generated(got["s"], engine, "length", tokens)
    assert_stream_adds_up(b, "s")


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


# ------------------------------------------------------------------------------------------------ abort

def test_abort_one_returns_its_partial_samples_at_once_and_the_others_run_on():
    async def main():
        async with serving() as (w, b, engine, _):
            await started(b, engine, gen("a", 10), gen("victim", 10, n=2, logprobs=True), gen("s", 10, stream=True))
            engine.step(3)
            reply = await b.call(p.Abort(cid="ab", rids=["victim", "no-such"]))
            assert reply.CMD is p.Cmd.REPLY and reply.data == {"aborted": 1, "unknown": ["no-such"]}, reply
            assert engine.running() == ["a", "s"]
            # sent straight from vLLM's abort, ahead of the reply
            assert b.at("result", "victim") < b.at("reply", "ab")
            assert_as_generated(b.results()["victim"], engine, "abort", 3)
            await a_and_s_run_to_their_end(b, engine, 7, 10)
    run(main())


def test_abort_all_returns_every_partial_output_and_a_stream_ends_with_its_last_delta():
    async def main():
        async with serving() as (w, b, engine, _):
            await started(b, engine, gen("a", 100), gen("two", 100, n=2), gen("s", 100, stream=True))
            engine.step(2)
            await b.until(lambda: len(b.deltas("s")) == 1)
            engine.step_at_abort(1)  # a third token lands in the collectors, unread, as the abort does
            reply = await b.call(p.AbortAll(cid="all"))
            assert reply.CMD is p.Cmd.REPLY and reply.data == {"aborted": 3}, reply
            got = await b.results_for("a", "two", "s")
            assert engine.running() == []
            for rid in ("a", "two", "s"):
                assert_as_generated(got[rid], engine, "abort", 3)
            assert b.at("result", "a") < b.at("reply", "all") and b.at("result", "two") < b.at("reply", "all")
            assert [len(d.token_ids) for d in b.deltas("s")] == [2, 1]
            assert_stream_adds_up(b, "s")
    run(main())


def test_abort_of_a_request_the_engine_has_not_registered_yet_ends_it_once_registered():
    async def main():
        async with serving() as (w, b, engine, _):
            engine.hold("add_request")  # vLLM is still processing the request when the abort comes
            await b.send(gen("early", 100))
            await engine.until(lambda: "early" in engine.adding)
            reply = await b.call(p.Abort(cid="ab", rids=["early"]))
            assert reply.data == {"aborted": 1, "unknown": []}, reply
            assert "early" not in engine.requests
            engine.release("add_request")
            got = await b.results_for("early")
            assert_as_generated(got["early"], engine, "abort", 0)
            assert engine.running() == []
    run(main())


# ------------------------------------------------------------------------------------------------ pause

def test_pause_abort_puts_every_partial_result_ahead_of_its_reply_and_later_requests_wait_for_resume():
    async def main():
        async with serving() as (w, b, engine, _):
            await started(b, engine, gen("a", 10), gen("s", 10, stream=True))
            engine.step(2)
            reply = await b.call(p.Pause(cid="p", mode="abort"))
            assert reply.CMD is p.Cmd.REPLY, reply
            assert reply.data == {"paused": True, "mode": "abort", "inflight_at_pause": 2, "inflight": 0}
            assert [c[:3] for c in engine.called("pause")] == [("pause", "abort", True)]
            for rid in ("a", "s"):
                assert b.at("result", rid) < b.at("reply", "p")
                assert_as_generated(b.results()[rid], engine, "abort", 2)
            assert_stream_adds_up(b, "s")
            # not refused: handed to the engine, which holds it until resume
            await started(b, engine, gen("later", 3))
            assert b.error("later") is None
            assert (await b.call(p.Resume(cid="r"))).data == {"paused": False}
            assert len(engine.called("resume")) == 1
            engine.step(3)
            assert_as_generated((await b.results_for("later"))["later"], engine, "length", 3)
    run(main())


def test_pause_wait_answers_once_the_requests_in_flight_have_finished():
    async def main():
        async with serving() as (w, b, engine, _):
            await started(b, engine, gen("a", 3), gen("s", 3, stream=True))
            engine.step(1)
            await b.send(p.Pause(cid="p", mode="wait"))
            await engine.until(lambda: engine.paused == "wait")
            engine.step(2)
            await b.until(lambda: b.answer("p") is not None)
            reply = b.answer("p")
            assert reply.CMD is p.Cmd.REPLY, reply
            assert reply.data == {"paused": True, "mode": "wait", "inflight_at_pause": 2, "inflight": 0}
            assert [c[:3] for c in engine.called("pause")] == [("pause", "wait", True)]
            for rid in ("a", "s"):
                assert b.at("result", rid) < b.at("reply", "p")
                assert_as_generated(b.results()[rid], engine, "length", 3)
            assert_stream_adds_up(b, "s")
    run(main())


def test_pause_keep_freezes_without_clearing_the_cache_and_resume_finishes_everything():
    async def main():
        async with serving() as (w, b, engine, _):
            await started(b, engine, gen("a", 6), gen("s", 6, stream=True))
            engine.step(2)
            engine.hold("pause_generation")
            await b.send(p.Pause(cid="p", mode="keep"))
            await engine.until(lambda: engine.called("pause"))
            await b.read_sent()
            assert b.answer("p") is None, "pause answered before the engine had paused"
            engine.release("pause_generation")
            await b.until(lambda: b.answer("p") is not None)
            reply = b.answer("p")
            assert reply.data == {"paused": True, "mode": "keep", "inflight_at_pause": 2, "inflight": 2}, reply
            assert [c[:3] for c in engine.called("pause")] == [("pause", "keep", False)]
            assert engine.running() == ["a", "s"] and not b.results()
            assert (await b.call(p.Resume(cid="r"))).data == {"paused": False}
            await a_and_s_run_to_their_end(b, engine, 4, 6)
    run(main())


def test_pause_with_refuse_fails_new_requests_until_resume():
    async def main():
        async with serving() as (w, b, engine, _):
            assert (await b.call(p.Pause(cid="p", mode="abort", refuse=True))).CMD is p.Cmd.REPLY
            await b.send(gen("x", 2))
            await b.until(lambda: b.error("x") is not None)
            assert b.error("x").code == Paused.code and "x" not in engine.requests
            assert (await b.call(p.Resume(cid="r"))).CMD is p.Cmd.REPLY
            await started(b, engine, gen("y", 2))
            engine.step(2)
            assert_as_generated((await b.results_for("y"))["y"], engine, "length", 2)
    run(main())


def test_pause_on_a_vllm_without_pause_generation_aborts_itself_and_refuses_until_resume():
    async def main():
        async with serving(EngineWithoutPause()) as (w, b, engine, _):
            await started(b, engine, gen("a", 10))
            engine.step(1)
            assert (await b.call(p.Pause(cid="k", mode="keep"))).code == Unsupported.code
            reply = await b.call(p.Pause(cid="p", mode="abort"))
            assert reply.data == {"paused": True, "mode": "abort", "inflight_at_pause": 1, "inflight": 0}, reply
            assert b.at("result", "a") < b.at("reply", "p")
            assert_as_generated(b.results()["a"], engine, "abort", 1)
            await b.send(gen("x", 2))
            await b.until(lambda: b.error("x") is not None)
            assert b.error("x").code == Paused.code
            assert (await b.call(p.Resume(cid="r"))).CMD is p.Cmd.REPLY
            await started(b, engine, gen("y", 2))
            engine.step(2)
            assert_as_generated((await b.results_for("y"))["y"], engine, "length", 2)
    run(main())


# ------------------------------------------------------------------------------------------------- stop

def test_stop_lets_requests_finish_within_the_drain_then_aborts_the_rest_with_partial_output():
    drain_s = 0.5

    async def main():
        async with serving(drain_s=drain_s) as (w, b, engine, running):
            await started(b, engine, gen("short", 3), gen("long", 1000), gen("s", 1000, stream=True))
            engine.step(1)
            stopped = time.monotonic()
            w.request_stop()
            engine.step(2)  # "short" ends within the drain; the others would need hundreds more steps
            await b.until(lambda: any(beat.stopping for beat in b.beats))  # the broker places nothing new here
            await b.send(gen("late", 3))
            await b.until(lambda: b.error("late") is not None)
            assert b.error("late").code == ShuttingDown.code and "late" not in engine.requests
            await b.until(lambda: any(kind == "disconnect" for kind, _ in b.events))
            await b.send(p.Disconnect(reason=p.BYE))
            await asyncio.wait_for(running, 10)  # run() returns once the broker has said goodbye
            got = b.results()
            assert_as_generated(got["short"], engine, "length", 3)
            assert_as_generated(got["long"], engine, "abort", 3)
            assert_as_generated(got["s"], engine, "abort", 3)
            assert_stream_adds_up(b, "s")
            (abort,) = engine.called("abort")
            assert sorted(abort[1]) == ["long", "s"] and abort[3] - stopped >= drain_s, abort
            assert b.at("result", "short") < b.at("result", "long") < b.at("disconnect")
    run(main())


def test_a_second_stop_a_second_later_aborts_at_once():
    async def main():
        async with serving(drain_s=600) as (w, b, engine, running):
            await started(b, engine, gen("long", 1000))
            engine.step(1)
            w.request_stop()
            await asyncio.sleep(SAME_STOP_S + 0.1)  # closer together, two stops are one
            w.request_stop()
            got = await b.results_for("long")
            assert_as_generated(got["long"], engine, "abort", 1)
    run(main())


def test_a_drain_whose_abort_lets_every_request_end_meanwhile_still_says_goodbye():
    async def main():
        async with serving(FakeEngine(abort_yields=True), drain_s=0.0) as (w, b, engine, running):
            await started(b, engine, gen("long", 1000), gen("s", 1000, stream=True))
            engine.step(1)
            w.request_stop()
            await b.until(lambda: any(kind == "disconnect" for kind, _ in b.events))
            await b.send(p.Disconnect(reason=p.BYE))
            await asyncio.wait_for(running, 10)
            got = b.results()
            assert_as_generated(got["long"], engine, "abort", 1)
            assert_as_generated(got["s"], engine, "abort", 1)
    run(main())


# ------------------------------------------------------------------------------------ whose fault an error is

class RefusingEngine(FakeEngine):
    """vLLM refusing a request's input in add_request (a prompt too long, say); or, for rid "broken", an
    output the worker cannot read: a fault on the serving side, after the request was taken."""

    async def add_request(self, request_id: str, prompt, params):
        if request_id == "too-long":
            raise ValueError("the prompt (5000 tokens) is longer than the model's 4096")
        q = await super().add_request(request_id, prompt, params)
        if request_id == "broken":
            q.put(Output(request_id, None, True))  # no completions list: reading it raises TypeError
        return q


def test_only_what_vllm_refuses_at_add_request_is_a_bad_request_the_rest_is_an_engine_error():
    async def main():
        async with serving(RefusingEngine()) as (w, b, engine, _):
            await b.send(gen("too-long", 4))
            await b.send(gen("broken", 4))
            await b.until(lambda: len([e for e in b.events if e[0] == "error"]) == 2)
            errors = {m.rid: m for kind, m in b.events if kind == "error"}
            assert errors["too-long"].code == BadRequest.code and "longer than" in errors["too-long"].message
            # a TypeError inside the worker is not the caller's fault: it was BadRequest before
            assert errors["broken"].code == EngineError.code and "TypeError" in errors["broken"].message
            await started(b, engine, gen("fine", 2))  # and the worker serves on
            engine.step(2)
            assert_as_generated((await b.results_for("fine"))["fine"], engine, "length", 2)
    run(main())
