"""Watch each CPU for freezes: one sleeper pinned per CPU, printing every 10 ms sleep that wakes late.

    python perf/watch_vcpus.py --seconds 300 --late 0.3 &   # then run a benchmark beside it

A process pinned to a CPU that oversleeps by seconds means the whole CPU did not run: on the project's
2-core VM the host takes a virtual CPU away under load, and every process on it stalls at once (what the
broker's "loop stalled" warnings see; the tests' HostFreezeWatch, tests/host_freeze.py, watches the same
way). Not a rolloutd tool: a diagnostic for telling those stalls from rolloutd's own.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def watch(cpu: int, seconds: float, late_s: float) -> None:
    os.sched_setaffinity(0, {cpu})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        time.sleep(0.01)
        late = time.monotonic() - t - 0.01
        if late > late_s:
            print(f"{time.strftime('%H:%M:%S')} cpu{cpu} overslept {late:.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--late", type=float, default=0.3, help="report oversleeps longer than this (s)")
    a = ap.parse_args()
    procs = [mp.Process(target=watch, args=(cpu, a.seconds, a.late)) for cpu in sorted(os.sched_getaffinity(0))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
