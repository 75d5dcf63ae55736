"""Rollout throughput through the daemon against the same vLLM engine in-process, same run, same machine.

    python perf/bench_throughput.py --model tiny --prompts 64 --n 4 --max-tokens 256 --repeat 3

In-process first (engine built, one warm-up batch, then --repeat timed batches, engine shut down), then
`rolloutd up --workers 1` with the same engine options and the same batches through Client.generate.
Generated tokens per second of wall time; the target is daemon >= 98% of in-process.
Writes perf/results/throughput.json and throughput.png.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from common import Daemon, maybe_plot, save


def workload(k: int, length: int = 16) -> list[list[int]]:
    return [[5 + (i * 13 + j * 7) % 400 for j in range(length)] for i in range(k)]


def count(batch) -> int:
    return sum(len(s) for samples in batch for s in samples)


def run_inprocess(model: str, prompts, sampling: dict, repeat: int) -> list[float]:
    from rolloutd import engine as eng
    from rolloutd.inprocess import generate

    async def main():
        engine = eng.build_engine(eng.EngineOptions(model=model))
        try:
            await generate(engine, prompts, sampling, prefix="warm")
            rates = []
            for r in range(repeat):
                t = time.perf_counter()
                out = await generate(engine, prompts, sampling, prefix=f"run{r}")
                rates.append(count(out) / (time.perf_counter() - t))
            return rates
        finally:
            engine.shutdown()

    return asyncio.run(main())


def run_daemon(model: str, prompts, sampling: dict, repeat: int) -> list[float]:
    from rolloutd import Client

    with Daemon(model, workers=1) as d, Client(d.front, timeout=1200) as c:
        c.generate(prompts, **sampling)  # warm-up, as in-process
        rates = []
        for _ in range(repeat):
            t = time.perf_counter()
            res = c.generate(prompts, **sampling)
            rates.append(sum(len(s.token_ids) for r in res for s in r.samples) / (time.perf_counter() - t))
        return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from rolloutd.models import resolve

    model = resolve(a.model)
    prompts = workload(a.prompts)
    sampling = {"n": a.n, "temperature": 1.0, "max_tokens": a.max_tokens, "ignore_eos": True, "seed": 0}
    inproc = run_inprocess(model, prompts, sampling, a.repeat)
    daemon = run_daemon(model, prompts, sampling, a.repeat)
    med_i, med_d = statistics.median(inproc), statistics.median(daemon)
    result = save("throughput", {
        "workload": {"model": a.model, "prompts": a.prompts, "n": a.n, "max_tokens": a.max_tokens,
                     "tokens_per_batch": a.prompts * a.n * a.max_tokens},
        "tokens_per_s": {"inprocess": inproc, "daemon": daemon},
        "median_tokens_per_s": {"inprocess": med_i, "daemon": med_d},
        "daemon_over_inprocess": med_d / med_i, "target": 0.98,
    }, "python perf/bench_throughput.py " + " ".join(sys.argv[1:]))
    maybe_plot(plot, result)


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    w, runs, med = r["workload"], r["tokens_per_s"], r["median_tokens_per_s"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(["vLLM in-process", "through rolloutd"], [med["inprocess"], med["daemon"]], color=["grey", "tab:blue"])
    for i, key in enumerate(("inprocess", "daemon")):
        ax.scatter([i] * len(runs[key]), runs[key], color="black", s=12, zorder=3)
        ax.text(i, med[key], f"{med[key]:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{w['prompts']} prompts x n={w['n']} x {w['max_tokens']} tokens: "
                 f"daemon {r['daemon_over_inprocess']:.1%} of in-process", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
