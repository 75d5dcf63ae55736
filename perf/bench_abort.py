"""Abort all: time from the call to the last stream closed (with its partial output), through the daemon,
against the same engine's in-process abort, same run, with 64, 256 and 512 requests in flight.

    python perf/bench_abort.py --model tiny --inflight 64 256 512 --repeat 10

Each trial starts k long generations (ignore_eos), lets them run --after seconds, then aborts them all and
waits for every one to come back. In-process: AsyncLLM.abort on all request ids, until every generate()
stream has ended. Daemon: AsyncClient.abort_all(), until the generate() call has every result (their
ids as numpy arrays over the received message); the time to then turn every result's ids into a Python
list is reported beside it (daemon_then_token_lists_ms). Both sides freeze their start-up heap out of the
garbage collector first, as the worker does (common.freeze_heap). BENCH_DAEMON_LOG=FILE keeps the daemon's log.
Writes perf/results/abort.json and abort.png.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from common import Daemon, freeze_heap, maybe_plot, percentiles, save

# Long enough that no request ends by itself before the abort, even the first ones of 512 on a CPU
LONG = {"max_tokens": 30000, "ignore_eos": True, "temperature": 1.0}


def prompts(k: int) -> list[list[int]]:
    return [[5 + (i * 13 + j) % 400 for j in range(8)] for i in range(k)]


def run_inprocess(model: str, sizes, repeat: int, after: float) -> dict:
    from rolloutd import engine as eng

    async def trial(engine, k: int, tag: str) -> tuple[float, int]:
        params = eng.sampling_params(LONG, stream=False)
        outs = {}

        async def one(i, ids):
            st = {}
            async for out in engine.generate(eng.tokens_prompt(ids), params, f"{tag}-{i}"):
                eng.accumulate(st, out, False)
            outs[i] = st

        tasks = [asyncio.create_task(one(i, ids)) for i, ids in enumerate(prompts(k))]
        await asyncio.sleep(after)
        t0 = time.perf_counter()
        await engine.abort([f"{tag}-{i}" for i in range(k)])
        await asyncio.gather(*tasks)
        took = time.perf_counter() - t0
        assert all(st[0].finish_reason == "abort" for st in outs.values())
        return took, sum(1 for st in outs.values() if st[0].ids)

    async def main():
        engine = eng.build_engine(eng.EngineOptions(model=model))
        freeze_heap()  # as the worker does after building its engine
        try:
            res = {}
            for k in sizes:
                res[k] = [await trial(engine, k, f"k{k}r{r}") for r in range(repeat)]
            return res
        finally:
            engine.shutdown()

    return asyncio.run(main())


def run_daemon(model: str, sizes, repeat: int, after: float) -> dict:
    from rolloutd import AsyncClient

    async def main(front):
        res = {}
        async with AsyncClient(front, timeout=600) as c:
            for k in sizes:
                res[k] = []
                for _ in range(repeat):
                    task = asyncio.create_task(c.generate(prompts(k), **LONG))
                    await asyncio.sleep(after)
                    t0 = time.perf_counter()
                    await c.abort_all()
                    results = await task
                    took = time.perf_counter() - t0
                    # Results hold their ids as arrays over the message; the Python lists (what the
                    # in-process side gets from vLLM) are made on first use: timed apart, reported too
                    t1 = time.perf_counter()
                    with_tokens = sum(1 for r in results if r.token_ids)
                    lists = time.perf_counter() - t1
                    assert all(r.finish_reason == "abort" for r in results)
                    res[k].append((took, with_tokens, lists))
        return res

    with Daemon(model, workers=1, log_path=os.environ.get("BENCH_DAEMON_LOG")) as d:
        freeze_heap()
        return asyncio.run(main(d.front))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--inflight", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--after", type=float, default=0.5, help="seconds of generation before the abort")
    a = ap.parse_args()
    from rolloutd.models import resolve

    model = resolve(a.model)
    # The daemon's trials first, before this process imports vLLM: afterwards every full garbage collection
    # of the client would walk vLLM's heap too (ms each), a cost of the in-process engine, not the daemon's.
    daemon = run_daemon(model, a.inflight, a.repeat, a.after)
    inproc = run_inprocess(model, a.inflight, a.repeat, a.after)
    table = {}
    for k in a.inflight:
        table[k] = {
            "inprocess_ms": {q: v * 1e3 for q, v in percentiles([t for t, _ in inproc[k]]).items() if q != "n"},
            "daemon_ms": {q: v * 1e3 for q, v in percentiles([t for t, *_ in daemon[k]]).items() if q != "n"},
            "trials_inprocess_ms": [round(t * 1e3, 3) for t, _ in inproc[k]],  # in the order run
            "trials_daemon_ms": [round(t * 1e3, 3) for t, *_ in daemon[k]],
            "with_tokens_inprocess": [n for _, n in inproc[k]],
            "with_tokens_daemon": [n for _, n, _ in daemon[k]],
            "daemon_then_token_lists_ms": {q: v * 1e3 for q, v in percentiles([l for _, _, l in daemon[k]]).items() if q != "n"},
        }
        table[k]["daemon_over_inprocess_p50"] = table[k]["daemon_ms"]["p50"] / table[k]["inprocess_ms"]["p50"]
    result = save("abort", {"repeat": a.repeat, "after_s": a.after, "inflight": table,
                            "target": "daemon within 2x of in-process; <= 20 ms p99 at 512 on a GPU"},
                  "python perf/bench_abort.py " + " ".join(sys.argv[1:]))
    maybe_plot(plot, result)


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    ks = list(r["inflight"])
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(ks))
    for off, key, label in ((-0.2, "inprocess_ms", "vLLM in-process"), (0.2, "daemon_ms", "through rolloutd")):
        ax.bar([x + off for x in xs], [r["inflight"][k][key]["p50"] for k in ks], width=0.4, label=f"{label} p50")
        ax.scatter([x + off for x in xs], [r["inflight"][k][key]["p99"] for k in ks], color="black", marker="_",
                   s=200, zorder=3)
    ax.set_xticks(list(xs), [f"{k} in flight" for k in ks])
    ax.set_ylabel("abort all -> last stream closed (ms)")
    ax.set_title(f"abort all on {r['machine'].get('gpu', r['machine']['host'])}: bars p50, ticks p99", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
