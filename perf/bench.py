"""The three-way harness: each workload run on vLLM in-process, through rolloutd, and through Ray actors hosting
the same engines, in one run, the sides taking turns (in-process, rolloutd, Ray, in-process, ...).

    rolloutd bench                                  # = python perf/bench.py: tiny model, every workload, 10 repeats
    rolloutd bench --workloads roundtrip,abort --repeat 20
    rolloutd bench --model 8b --workloads long,fanout   # GPU: Llama-3-8B's shape, vLLM dummy weights

All three sides' engines are up for the whole run (started once, in that order) and idle while another
side runs a trial. Each request is one call on every side (AsyncClient.generate of one prompt, an actor
method call, AsyncLLM.generate), so each has its own latency; requests go round-robin over a side's
engines (rolloutd: its broker's placement). Engine options, prompts and sampling are the same everywhere.

Workloads (sizes: --size cpu|gpu|8b, default by machine and model; see SIZES):
  short      many requests of a few tokens: the control plane's share of the work
  long       long generations: engine bound
  fanout     n samples per prompt
  stream     streamed requests: time to first token
  roundtrip  control-plane round trip, `ping` (no engine work), against raw pyzmq DEALER<->ROUTER+msgpack
             (an echo process, no engine: labelled as such) and a Ray actor method that returns at once
  abort      abort everything with 64/256/512 requests in flight: call -> every request ended

Writes perf/results/bench[-TAG].json (every trial), .md (the tables) and .png; `python perf/report.py` then
regenerates the comparison section of perf/results/README.md from the JSON files.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

from tqdm import tqdm

from bench_roundtrip import ECHO, Raw
from common import freeze_heap, maybe_plot, percentiles, save
from report import ENGINE_WORKLOADS
from sides import SIDES, run_request

# (prompts, n, max_tokens, stream) per size
SIZES = {
    "cpu": {"short": (256, 1, 4, False), "long": (32, 1, 256, False), "fanout": (16, 8, 64, False),
            "stream": (64, 1, 32, True)},
    "gpu": {"short": (1024, 1, 4, False), "long": (256, 1, 512, False), "fanout": (64, 8, 256, False),
            "stream": (256, 1, 128, True)},
    # the 8B shape: what each engine's share of one GPU holds in KV cache (~5 GB: ~38k tokens) at once
    "8b": {"short": (256, 1, 4, False), "long": (64, 1, 512, False), "fanout": (16, 8, 256, False),
           "stream": (64, 1, 128, True)},
}
ALL = ENGINE_WORKLOADS + ("roundtrip", "abort")
ABORT_SIZES = (64, 256, 512)
LONG = {"max_tokens": 30000, "ignore_eos": True, "temperature": 1.0}  # no request ends before the abort


def prompts(k: int, length: int = 16, salt: int = 0) -> list[list[int]]:
    """k distinct prompts (no shared prefix between them, so no prefix-cache hits across requests)."""
    return [[5 + (i * 13 + j * 7 + salt * 31) % 400 for j in range(length)] for i in range(k)]


# ------------------------------------------------------------------------------------- engine workloads

async def engine_trial(side, spec: tuple, tag: str) -> dict:
    k, n, max_tokens, stream = spec
    sampling = {"n": n, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    t0 = time.perf_counter()
    done = await asyncio.gather(*(run_request(side, p, sampling, f"{tag}-{i}", stream)
                                  for i, p in enumerate(prompts(k))))
    wall = time.perf_counter() - t0
    tokens = sum(d.tokens for d in done)
    expected = k * n * max_tokens
    if tokens != expected:
        raise RuntimeError(f"{side.name}: {tokens} tokens came back, {expected} expected (ignore_eos)")
    lat = percentiles([d.latency_s for d in done])
    out = {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": k / wall,
           "latency_ms": {q: lat[q] * 1e3 for q in ("p50", "p99")}}
    if stream:
        ttft = percentiles([d.ttft_s for d in done])
        out["ttft_ms"] = {q: ttft[q] * 1e3 for q in ("p50", "p99")}
    return out


async def same_engines(sides) -> list[list[int]]:
    """Greedy answers to a few prompts, one at a time (a batch of one decodes bit-exactly), must be equal on
    every side: the sides run the same model with the same options, or the comparison means nothing."""
    greedy = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    answers = {}
    for s in sides:
        answers[s.name] = [await s.generate(p, greedy, f"check-{i}") for i, p in enumerate(prompts(4, salt=7))]
    first = next(iter(answers.values()))
    differ = [name for name, a in answers.items() if a != first]
    if differ:
        raise RuntimeError(f"greedy answers differ between sides ({', '.join(differ)} vs {sides[0].name}): "
                           "not the same engines")
    return [a[0] for a in first]


# ------------------------------------------------------------------------------------------ abort

async def abort_trial(side, k: int, after: float, tag: str) -> dict:
    tasks = [asyncio.create_task(run_request(side, p, LONG, f"{tag}-{i}", False))
             for i, p in enumerate(prompts(k, 8, salt=k))]
    await asyncio.sleep(after)
    # Every request must be in an engine before the clock starts: a Ray call still on its way when the abort
    # runs is not aborted (the actor runs calls concurrently, not in order) and would decode to its end.
    give_up = time.monotonic() + 120
    while await side.inflight() < k:
        if time.monotonic() > give_up:
            raise RuntimeError(f"{side.name}: {await side.inflight()} of {k} requests in flight after 120 s")
        await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    await side.abort_all()
    done = await asyncio.wait_for(asyncio.gather(*tasks), 300)
    took = time.perf_counter() - t0
    if any(d.tokens >= LONG["max_tokens"] for d in done):
        raise RuntimeError(f"{side.name}: a request ran to its end: the abort did not reach it")
    return {"ms": took * 1e3, "with_tokens": sum(1 for d in done if d.tokens)}


# ------------------------------------------------------------------------------------------ round trip

class RawEcho:
    """The floor: bench_roundtrip's DEALER to an echoing ROUTER in another process, msgpack both ways, over
    ipc:// as the daemon's own sockets here. No engine, no broker."""
    name = "raw_pyzmq"

    def __init__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="bench-echo-")
        addr = f"ipc://{self.folder.name}/echo"
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO, addr])
        self.ping = Raw(addr)

    def close(self) -> None:
        self.ping.close()
        self.proc.kill()
        self.folder.cleanup()


def roundtrip_trial(target, count: int) -> dict:
    for _ in range(50):
        target.ping()
    xs = []
    for _ in range(count):
        t = time.perf_counter()
        target.ping()
        xs.append(time.perf_counter() - t)
    q = percentiles(xs)
    return {"us": {k: q[k] * 1e6 for k in ("p50", "p90", "p99")}, "samples_us": [round(x * 1e6, 1) for x in xs]}


# ------------------------------------------------------------------------------------------ the run

async def run(a, opts) -> dict:
    sides = [SIDES[name](opts, a.workers) for name in a.sides]
    trials: dict = {w: {} for w in a.workloads}
    echo = RawEcho() if "roundtrip" in a.workloads else None
    started = {}
    bar = tqdm(total=a.repeat * len(a.workloads) * len(sides), desc="trials", unit="trial", mininterval=5)
    try:
        for s in sides:
            t = time.perf_counter()
            print(f"starting {s.name} ...", flush=True)
            await s.start()
            started[s.name] = time.perf_counter() - t
        freeze_heap()  # what start-up left, out of the collector's reach (as the worker does)
        greedy = await same_engines(sides)
        for s in sides:  # one untimed round of each workload, so no side's first trial pays a warm-up
            for w in a.workloads:
                if w in ENGINE_WORKLOADS:
                    await engine_trial(s, a.spec[w], f"warm-{w}")
        for r in range(a.repeat):
            for w in a.workloads:
                for s in sides:
                    tag = f"{w}-{r}"
                    if w in ENGINE_WORKLOADS:
                        res = await engine_trial(s, a.spec[w], tag)
                    elif w == "abort":
                        res = {str(k): await abort_trial(s, k, a.after, f"{tag}-{k}") for k in a.abort_sizes}
                    elif w == "roundtrip":
                        if s.name == "inprocess":  # no control plane to time
                            bar.update()
                            continue
                        res = roundtrip_trial(s, a.pings)
                    trials[w].setdefault(s.name, []).append(res)
                    bar.update()
                if w == "roundtrip" and echo is not None:
                    trials[w].setdefault(echo.name, []).append(roundtrip_trial(echo, a.pings))
    finally:
        bar.close()
        for s in reversed(sides):
            await s.stop()
        if echo is not None:
            echo.close()
    return {"start_s": started, "greedy_equal": greedy, "trials": trials}


def summarize(trials: dict) -> dict:
    """Medians over trials of each figure, and the ratios the targets are stated in."""
    med = statistics.median
    out: dict = {}
    for w, by_side in trials.items():
        if w in ENGINE_WORKLOADS:
            s = {side: {"tokens_per_s": med(t["tokens_per_s"] for t in ts),
                        "tokens_per_s_range": [min(t["tokens_per_s"] for t in ts), max(t["tokens_per_s"] for t in ts)],
                        "latency_p50_ms": med(t["latency_ms"]["p50"] for t in ts),
                        "latency_p99_ms": med(t["latency_ms"]["p99"] for t in ts),
                        **({"ttft_p50_ms": med(t["ttft_ms"]["p50"] for t in ts),
                            "ttft_p99_ms": med(t["ttft_ms"]["p99"] for t in ts)} if "ttft_ms" in ts[0] else {})}
                 for side, ts in by_side.items()}
            out[w] = {"sides": s, "ratios": _ratios(s, "tokens_per_s")}
        elif w == "roundtrip":
            s = {side: {"p50_us": med(t["us"]["p50"] for t in ts), "p99_us": med(t["us"]["p99"] for t in ts)}
                 for side, ts in by_side.items()}
            ratios = {}
            if "raw_pyzmq" in s and "rolloutd" in s:
                ratios["rolloutd_over_raw_pyzmq"] = s["rolloutd"]["p50_us"] / s["raw_pyzmq"]["p50_us"]
            if "ray" in s and "rolloutd" in s:
                ratios["ray_over_rolloutd"] = s["ray"]["p50_us"] / s["rolloutd"]["p50_us"]
            out[w] = {"sides": s, "ratios": ratios}
        elif w == "abort":
            s = {side: {k: percentiles([t[k]["ms"] for t in ts]) for k in ts[0]} for side, ts in by_side.items()}
            out[w] = {"sides": s}
    return out


def _ratios(s: dict, key: str) -> dict:
    r = {}
    if "inprocess" in s:
        for side in ("rolloutd", "ray"):
            if side in s:
                r[f"{side}_over_inprocess"] = s[side][key] / s["inprocess"][key]
    if "rolloutd" in s and "ray" in s:
        r["rolloutd_over_ray"] = s["rolloutd"][key] / s["ray"][key]
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="rolloutd bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="HF folder, a built-in name, or 8b (Llama-3-8B's shape, dummy weights)")
    ap.add_argument("--workloads", default=",".join(ALL), help=f"comma-separated, of: {', '.join(ALL)}")
    ap.add_argument("--sides", default="inprocess,rolloutd,ray", help="comma-separated, of: " + ", ".join(SIDES))
    ap.add_argument("--repeat", type=int, default=10, help="trials per workload and side (alternating)")
    ap.add_argument("--workers", type=int, default=1, help="engines per side")
    ap.add_argument("--size", choices=SIZES, default=None, help="workload sizes (default: gpu on a GPU, else cpu)")
    ap.add_argument("--pings", type=int, default=2000, help="round trips per roundtrip trial")
    ap.add_argument("--abort-sizes", default=",".join(map(str, ABORT_SIZES)))
    ap.add_argument("--after", type=float, default=0.5, help="seconds of generation before an abort")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="per engine (GPU; every side's engines share the GPU)")
    ap.add_argument("--enforce-eager", action="store_true")
    a = ap.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.sides = [s for s in a.sides.split(",") if s]
    a.abort_sizes = [int(k) for k in a.abort_sizes.split(",")]
    bad = [w for w in a.workloads if w not in ALL] + [s for s in a.sides if s not in SIDES]
    if bad:
        ap.error(f"unknown workload or side: {', '.join(bad)}")

    from rolloutd import engine as eng
    from rolloutd.models import SHAPE_8B, config_only, resolve

    gpu = not eng.on_cpu()
    a.size = a.size or ("cpu" if not gpu else "8b" if a.model == "8b" else "gpu")
    a.spec = SIZES[a.size]
    extra = {}
    if a.model == "8b":
        model, extra = config_only(SHAPE_8B), {"load_format": "dummy"}
    else:
        model = resolve(a.model)
    engines = len(a.sides) * a.workers
    util = a.gpu_memory_utilization or (round(0.85 / engines, 3) if gpu else None)
    opts = replace(eng.EngineOptions(model=model), gpu_memory_utilization=util, enforce_eager=a.enforce_eager,
                   extra=extra)

    # This process touches CUDA (device queries) before its in-process engines start their processes: those
    # must be spawned, not forked, or CUDA refuses to start in them.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    got = asyncio.run(run(a, opts))
    result = save("bench", {
        "model": a.model, "size": a.size, "workers": a.workers, "repeat": a.repeat, "order": a.sides,
        "engine": {k: v for k, v in asdict(opts).items() if k != "model"},
        "workloads": {w: dict(zip(("prompts", "n", "max_tokens", "stream"), a.spec[w])) for w in a.workloads
                      if w in ENGINE_WORKLOADS},
        "pings": a.pings, "abort_sizes": a.abort_sizes, "after_s": a.after,
        "start_s": got["start_s"], "greedy_equal_on_every_side": got["greedy_equal"], "summary": summarize(got["trials"]), "trials": got["trials"],
    }, "rolloutd bench " + " ".join(sys.argv[1:] if argv is None else argv), echo=False)
    from report import table
    with open(result["_path"][:-5] + ".md", "w") as f:
        f.write(table(result) + "\n")
    print(table(result))
    from report import plot
    maybe_plot(plot, result)


if __name__ == "__main__":
    main()
