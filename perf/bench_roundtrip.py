"""Round trip latency: client -> broker -> worker -> client, against raw pyzmq and the broker alone.

    python perf/bench_roundtrip.py --model tiny --n 5000

Measures, in one run on one machine:
  raw_pyzmq        a DEALER and an echoing ROUTER in another process, msgpack both ways (the floor)
  broker           Client.ping("broker"): client -> broker -> client
  broker_worker    Client.ping("worker"): client -> broker -> vLLM worker -> broker -> client
Writes perf/results/roundtrip.json and roundtrip.png.
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

from common import Daemon, maybe_plot, percentiles, save

ECHO = """
import sys, msgpack, zmq
s = zmq.Context().socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    if not s.poll(10000): break
    ident, a, b = s.recv_multipart()
    s.send_multipart([ident, a, msgpack.packb(msgpack.unpackb(b))])
"""


def raw_pyzmq(n: int) -> list[float]:
    # ipc://, as the daemon's clients and workers use (rolloutd.testing.Daemon): the floor on the same transport
    folder = tempfile.mkdtemp(prefix="roundtrip-")
    addr = f"ipc://{folder}/echo"
    srv = subprocess.Popen([sys.executable, "-c", ECHO, addr])
    try:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        body = msgpack.packb({"cid": "x" * 20, "target": "worker"})
        out = []
        for _ in range(n + 200):
            t = time.perf_counter()
            s.send_multipart([b"RLD1\x1f", body])
            assert s.poll(5000)
            msgpack.unpackb(s.recv_multipart()[1])
            out.append(time.perf_counter() - t)
        s.close()
        return out[200:]
    finally:
        srv.kill()
        shutil.rmtree(folder, ignore_errors=True)


def through(client, target: str, n: int) -> list[float]:
    out = []
    for _ in range(n + 200):
        t = time.perf_counter()
        client.ping(target)
        out.append(time.perf_counter() - t)
    return out[200:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=5000)
    a = ap.parse_args()
    from rolloutd import Client
    from rolloutd.models import resolve

    samples = {"raw_pyzmq": raw_pyzmq(a.n)}
    with Daemon(resolve(a.model), workers=1) as d, Client(d.front) as c:
        time.sleep(2)  # let the engine settle after start
        samples["broker"] = through(c, "broker", a.n)
        samples["broker_worker"] = through(c, "worker", a.n)
    us = {k: {q: v * 1e6 for q, v in percentiles(xs).items() if q != "n"} for k, xs in samples.items()}
    cdf = {k: [round(x * 1e6, 1) for x in sorted(xs)[:: max(1, len(xs) // 500)]] for k, xs in samples.items()}
    result = save("roundtrip", {"unit": "microseconds", "n": a.n, "transport": "ipc", "latency_us": us,
                                "target_p50_us": 80, "cdf_us": cdf},
                  "python perf/bench_roundtrip.py " + " ".join(sys.argv[1:]))
    maybe_plot(plot, result)


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, s in r["cdf_us"].items():
        ax.plot(s, [i / len(s) for i in range(len(s))], label=f"{k} (p50 {r['latency_us'][k]['p50']:.0f} us)")
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
