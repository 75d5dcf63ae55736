"""What the benchmarks share: a daemon in a subprocess, machine facts, and writing results (JSON + plot)."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import time

from rolloutd import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(ROOT, "perf", "results")  # elsewhere for the tests


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach. A full collection walks them all:
    2-7 ms measured for a bare client process (27k objects, rolloutd + numpy + zmq), more with vLLM loaded,
    at a random moment of a timed trial. vLLM's API server and the rolloutd worker do the same
    after start-up; a trainer's process should too."""
    import gc
    gc.collect()
    gc.freeze()


def machine() -> dict:
    info = {"host": socket.gethostname(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import vllm
        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    try:
        info["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


class Daemon(testing.Daemon):
    """`rolloutd up` for a benchmark (rolloutd.testing.Daemon: ipc:// addresses, log in `log_path` else a
    temporary folder), its own log at WARNING."""

    def __init__(self, model: str, workers: int = 1, extra: tuple = (), log_path: str | None = None):
        # These benchmarks time requests, not failure detection: on the 2-core VM, whose host stops a
        # process for seconds under vLLM load, a healthy worker must not be expired mid-run.
        env = {"ROLLOUTD_LIVENESS": os.environ.get("ROLLOUTD_LIVENESS", "30")}
        super().__init__(model, workers=workers, extra=extra, env=env, log_path=log_path, log_level="WARNING",
                         ready_timeout_s=600, stop_timeout_s=120)


def percentiles(xs: list[float]) -> dict:
    """Nearest-rank percentiles (p99 of 100 trials is the 99th smallest; of 20, the largest)."""
    s = sorted(xs)
    pick = lambda q: s[max(0, math.ceil(q * len(s)) - 1)]
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "min": s[0], "max": s[-1], "n": len(s)}


def tagged(name: str) -> str:
    """Result names carry BENCH_TAG (e.g. "h100") when set, so runs on other machines sit side by side."""
    tag = os.environ.get("BENCH_TAG")
    return f"{name}-{tag}" if tag else name


def commit() -> str:
    """The code measured: $BENCH_COMMIT where the command line sets it (the GPU machine's copy of the tree
    may carry a stale .git), else git's HEAD here, with "+changes" if the tree differs from it."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BENCH_COMMIT", "unknown")


COMMIT = commit()  # at start: the code this process runs, whatever is committed while it runs


def save(name: str, result: dict, command: str, echo: bool = True) -> dict:
    result = {"benchmark": name, "tag": os.environ.get("BENCH_TAG", ""), "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "commit": COMMIT, "machine": machine(), **result}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{tagged(name)}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    if echo:
        print(json.dumps({k: v for k, v in result.items() if k != "cdf_us"}, indent=2))
    result["_path"] = path
    return result


def maybe_plot(plot, result: dict) -> None:
    """Draw the result's PNG beside its JSON; where matplotlib is missing (the GPU machine), say how to
    draw it later from the JSON: python perf/replot.py perf/results/NAME.json"""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no plot; run perf/replot.py on the JSON")
        return
    matplotlib.use("Agg")
    plot(result, result.pop("_path")[:-5] + ".png")


