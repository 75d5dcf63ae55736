"""Round trip latency: client -> broker -> worker -> client, against raw pyzmq, in one run on one machine.

    python perf/bench_roundtrip.py --model tiny --n 5000

Measures, while the daemon is up, in blocks of --block round trips taken in turn (all four see the same
moments of a noisy machine: its background load, the engine's idle threads, the host's stalls):
  raw_pyzmq        a DEALER and an echoing ROUTER in another process, msgpack both ways (the floor)
  raw_via_proxy    the same through a third process that only forwards (ROUTER front, ROUTER back, a poll
                   loop) to an echoing DEALER: the floor of any path with a broker in the middle. It has the
                   hops and process wake-ups of broker_worker (twice raw_pyzmq's) and none of its logic.
  broker           Client.ping("broker"): client -> broker -> client
  broker_worker    Client.ping("worker"): client -> broker -> vLLM worker -> broker -> client
Writes perf/results/roundtrip.json (percentiles, and each p50 as a multiple of raw_pyzmq's) and roundtrip.png.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time

import msgpack
import zmq

from common import Daemon, freeze_heap, maybe_plot, percentiles, save

# Serves until its parent is gone, however long the parent idles between trials (perf/bench.py too).
ECHO = """
import os, sys, msgpack, zmq
s = zmq.Context().socket(zmq.ROUTER); s.bind(sys.argv[1])
parent = os.getppid()
while os.getppid() == parent:
    if s.poll(5000):
        ident, a, b = s.recv_multipart()
        s.send_multipart([ident, a, msgpack.packb(msgpack.unpackb(b))])
"""

# The middle of raw_via_proxy: forwards client -> echo and back, as the broker does, with no logic at all.
PROXY = """
import sys, zmq
ctx = zmq.Context()
front = ctx.socket(zmq.ROUTER); front.bind(sys.argv[1])
back = ctx.socket(zmq.ROUTER); back.bind(sys.argv[2])
echo, _ = back.recv_multipart()
poller = zmq.Poller(); poller.register(front, zmq.POLLIN); poller.register(back, zmq.POLLIN)
client = None
while True:
    ready = dict(poller.poll(10000))
    if not ready: break
    if front in ready:
        frames = front.recv_multipart(); client = frames[0]; back.send_multipart([echo, *frames[1:]])
    if back in ready:
        frames = back.recv_multipart(); front.send_multipart([client, *frames[1:]])
"""

DEALER_ECHO = """
import sys, msgpack, zmq
s = zmq.Context().socket(zmq.DEALER); s.connect(sys.argv[1]); s.send(b"hello")
while True:
    if not s.poll(10000): break
    a, b = s.recv_multipart()
    s.send_multipart([a, msgpack.packb(msgpack.unpackb(b))])
"""

BODY = msgpack.packb({"cid": "x" * 20, "target": "worker"})


class Raw:
    """Raw pyzmq round trips to an echo at `address` (directly, or through the proxy)."""

    def __init__(self, address: str):
        self.s = zmq.Context.instance().socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(address)

    def __call__(self) -> None:
        self.s.send_multipart([b"RLD1\x1f", BODY])
        assert self.s.poll(5000)
        msgpack.unpackb(self.s.recv_multipart()[1])

    def close(self) -> None:
        self.s.close()


def timed(fn, n: int, out: list) -> None:
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=5000, help="round trips of each kind")
    ap.add_argument("--block", type=int, default=100, help="round trips of one kind before the next kind's turn")
    a = ap.parse_args()
    from rolloutd import Client
    from rolloutd.models import resolve

    folder = tempfile.mkdtemp(prefix="roundtrip-")
    procs = []
    try:
        with Daemon(resolve(a.model), workers=1) as d, Client(d.front) as c:
            # ipc://, as the daemon's clients and workers use (rolloutd.testing.Daemon): the floors on the same transport
            echo, front, back = (f"ipc://{folder}/{name}" for name in ("echo", "front", "back"))
            procs = [subprocess.Popen([sys.executable, "-c", ECHO, echo]),
                     subprocess.Popen([sys.executable, "-c", PROXY, front, back]),
                     subprocess.Popen([sys.executable, "-c", DEALER_ECHO, back])]
            raw, via_proxy = Raw(echo), Raw(front)
            kinds = {"raw_pyzmq": raw, "raw_via_proxy": via_proxy, "broker": lambda: c.ping("broker"),
                     "broker_worker": lambda: c.ping("worker")}
            time.sleep(2)  # let the engine settle after start
            for fn in kinds.values():
                timed(fn, 200, [])  # warm-up
            freeze_heap()
            samples = {k: [] for k in kinds}
            for turn in range(-(-a.n // a.block)):
                order = list(kinds) if turn % 2 == 0 else list(kinds)[::-1]
                for k in order:
                    timed(kinds[k], min(a.block, a.n - len(samples[k])), samples[k])
            raw.close()
            via_proxy.close()
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(folder, ignore_errors=True)
    us = {k: {q: v * 1e6 for q, v in percentiles(xs).items() if q != "n"} for k, xs in samples.items()}
    x_raw = {k: round(v["p50"] / us["raw_pyzmq"]["p50"], 2) for k, v in us.items()}
    cdf = {k: [round(x * 1e6, 1) for x in sorted(xs)[:: max(1, len(xs) // 500)]] for k, xs in samples.items()}
    result = save("roundtrip", {"unit": "microseconds", "n": a.n, "block": a.block, "transport": "ipc",
                                "latency_us": us, "p50_x_raw": x_raw, "target_p50_x_raw": 1.5, "cdf_us": cdf},
                  "python perf/bench_roundtrip.py " + " ".join(sys.argv[1:]))
    maybe_plot(plot, result)


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, s in r["cdf_us"].items():
        ax.plot(s, [i / len(s) for i in range(len(s))], label=f"{k} (p50 {r['latency_us'][k]['p50']:.0f} us)")
    if "target_p50_x_raw" in r:
        target = r["target_p50_x_raw"] * r["latency_us"]["raw_pyzmq"]["p50"]
        ax.axvline(target, color="grey", ls="--", label=f"target p50 {r['target_p50_x_raw']}x raw ({target:.0f} us)")
    else:  # results from before the target was relative to raw pyzmq
        ax.axvline(80, color="grey", ls="--", label="target p50 80 us")
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us)")
    ax.set_ylabel("fraction")
    ax.set_title(f"rolloutd round trip on {r['machine'].get('gpu', r['machine']['host'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
