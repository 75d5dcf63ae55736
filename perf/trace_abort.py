"""Where an abort-all's time goes: a timeline across client, broker and worker, per trial.

    python perf/trace_abort.py --inflight 512 --repeat 30 --detail 3

Starts a broker and one worker of its own, each with a few of its methods wrapped to record when they
ran (time.perf_counter is CLOCK_MONOTONIC, so the three processes share a clock), plus every garbage
collection. Each trial starts k long generations, aborts them all after --after s, and prints, in ms
from the abort call: when the worker got the abort, when vLLM's abort had returned (the start of
"aborted results sent": the worker then sends the results at once), when it had handled the abort, when the
last result was queued and the last batch left the worker, when the broker forwarded it, and when the
client had it all:
one line per trial, then stage by stage for the slowest trials and the median one (where a tail comes from).
A diagnostic, not a benchmark: the wrappers add a little to every step (bench_abort.py has the figures).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

EVENTS: list = []  # (what, start, end, note)


def record(obj, name: str, what: str, note=None) -> None:
    """Wrap obj.name (function or coroutine function) to append (what, start, end, note(*args))."""
    f = getattr(obj, name)
    if asyncio.iscoroutinefunction(f):
        async def wrapped(*a, **k):
            t = time.perf_counter()
            r = await f(*a, **k)
            EVENTS.append((what, t, time.perf_counter(), note(*a) if note else None))
            return r
    else:
        def wrapped(*a, **k):
            t, c = time.perf_counter(), time.thread_time()
            r = f(*a, **k)
            # the note of a plain function is its CPU time (ms): wall minus CPU is time not scheduled
            EVENTS.append((what, t, time.perf_counter(), note(*a) if note else round((time.thread_time() - c) * 1e3, 2)))
            return r
    setattr(obj, name, functools.wraps(f)(wrapped))


def record_gc(who: str) -> None:
    started = [0.0]

    def cb(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            EVENTS.append((f"{who} gc{info['generation']}", started[0], time.perf_counter(), None))
    gc.callbacks.append(cb)


def serve(role: str, out: str, argv: list[str]) -> int:
    """Run `rolloutd broker|worker` with its hot path recorded; the timeline is written at exit."""
    import atexit

    if role == "worker":
        from rolloutd import worker as W
        record(W.Worker, "_on_message", "worker got a message", lambda self, frames: len(frames))
        record(W.Worker, "_handle_control", "worker: abort handled")
        record(W.Worker, "_send_aborted", "worker: aborted results sent")  # starts when vLLM's abort returned
        record(W.Worker, "_queue_result", "worker: a result queued")
        record(W.Worker, "_flush_results", "worker: batch packed and sent")
    else:
        from rolloutd import broker as B
        record(B.Broker, "_on_client", "broker: client message")
        record(B.Broker, "_on_worker", "broker: worker message")
    record_gc(role)
    atexit.register(lambda: json.dump(EVENTS, open(out, "w")))
    from rolloutd.cli import main
    return main(argv)


def summary(events: list, t0: float, t1: float) -> list[str]:
    lines = []
    for what, xs in _by_stage(events, t0, t1).items():
        first, last = (xs[0][0] - t0) * 1e3, (xs[-1][1] - t0) * 1e3
        busy = sum(e - s for s, e, _ in xs) * 1e3
        notes = [n for *_, n in xs if n is not None][:4]
        lines.append(f"  {what:32s} x{len(xs):<4d} from {first:7.2f} to {last:7.2f}  wall {busy:6.2f}"
                     + (f"  notes {notes}" if notes else ""))
    return lines


def _by_stage(events: list, t0: float, t1: float) -> dict:
    seen = {}
    for what, s, e, note in events:
        if t0 - 1e-3 <= s <= t1 + 1e-3:
            seen.setdefault(what, []).append((s, e, note))
    return seen


# One line per trial: when (ms after the abort call) each stage last ended, and the garbage collectors'
# time in all three processes: a slow trial shows at a glance which stage it lost its time in.
ROW = (("worker got a message", "abort in"), ("worker: abort handled", "handled"),
       ("worker: a result queued", "last queued"), ("worker: batch packed and sent", "last batch"),
       ("broker: worker message", "broker last"), ("client: read and split", "client last"))


def row(t0: float, t_reply: float, t_end: float, procs: list) -> str:
    merged = {}
    for events in procs:
        for what, xs in _by_stage(events, t0, t_end).items():
            merged.setdefault(what, []).extend(xs)
    cells = [f"{(t_end - t0) * 1e3:11.2f}", f"{(t_reply - t0) * 1e3:11.2f}"]
    for what, _ in ROW:
        xs = merged.get(what)
        cells.append(f"{(max(e for _, e, _ in xs) - t0) * 1e3:11.2f}" if xs else "-".rjust(11))
    gc_ms = sum(e - s for what, xs in merged.items() if " gc" in what for s, e, _ in xs) * 1e3
    return " ".join(cells) + f" {gc_ms:11.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--inflight", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=6)
    ap.add_argument("--after", type=float, default=0.5)
    ap.add_argument("--detail", type=int, default=3, help="stage by stage: the slowest N trials, and the median one")
    if sys.argv[1:2] == ["--role"]:  # internal: --role broker|worker --out FILE <rolloutd arguments>
        sys.exit(serve(sys.argv[2], sys.argv[4], sys.argv[5:]))
    a = ap.parse_args()

    from common import freeze_heap
    from rolloutd import AsyncClient, Client
    from rolloutd import client as C
    from rolloutd.models import resolve

    tmp = tempfile.mkdtemp(prefix="trace-abort-")
    # Not rolloutd.testing.Daemon: the broker and the worker here are this script, recording (--role). Their
    # addresses as the Daemon's: ipc:// in a folder of this run, unique by construction.
    front, back = f"ipc://{tmp}/front", f"ipc://{tmp}/back"
    me = [sys.executable, os.path.abspath(__file__)]
    log = open(os.path.join(tmp, "daemon.log"), "w")
    procs = [
        subprocess.Popen([*me, "--role", "broker", "--out", f"{tmp}/broker.json", "--log-level", "WARNING",
                          "broker", "--front", front, "--back", back], stdout=log, stderr=log),
        subprocess.Popen([*me, "--role", "worker", "--out", f"{tmp}/worker.json", "--log-level", "WARNING",
                          "worker", "--broker", back, "--model", resolve(a.model)], stdout=log, stderr=log),
    ]
    record(C.AsyncClient, "_on_readable", "client: read and split")
    record(C, "from_finished", "client: Results built")
    record_gc("client")
    from bench_abort import LONG as sampling, prompts as make_prompts  # the benchmark's workload
    prompts = make_prompts(a.inflight)

    async def trials():
        out = []
        async with AsyncClient(front, timeout=600) as c:
            for _ in range(a.repeat):
                task = asyncio.create_task(c.generate(prompts, **sampling))
                await asyncio.sleep(a.after)
                EVENTS.clear()
                t0 = time.perf_counter()
                await c.abort_all()
                t_reply = time.perf_counter()
                await task
                out.append((t0, t_reply, time.perf_counter(), list(EVENTS)))
                await asyncio.sleep(0.2)
        return out

    try:
        with Client(front) as c:
            c.wait_for_workers(1, timeout=600)
        freeze_heap()  # as bench_abort does
        runs = asyncio.run(trials())
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(120)
    worker = json.load(open(f"{tmp}/worker.json"))
    broker = json.load(open(f"{tmp}/broker.json"))
    print(f"{a.inflight} in flight, {a.repeat} trials; ms after the abort call (gc: all processes)")
    print(" ".join(f"{h:>11s}" for h in ["total", "reply", *(h for _, h in ROW), "gc"]))
    for t0, t_reply, t_end, client in runs:
        print(row(t0, t_reply, t_end, [worker, broker, client]))
    by_time = sorted(runs, key=lambda r: r[2] - r[0])
    shown = by_time[len(by_time) - a.detail:] + ([by_time[len(by_time) // 2]] if a.detail else [])
    for t0, t_reply, t_end, client in shown:
        print(f"--- {a.inflight} in flight: last result at {(t_end - t0) * 1e3:.2f} ms, abort reply at "
              f"{(t_reply - t0) * 1e3:.2f} ms (ms from the abort call; notes: CPU ms or frames)")
        for events in (worker, broker, client):
            print("\n".join(summary(events, t0, t_end)))


if __name__ == "__main__":
    main()
