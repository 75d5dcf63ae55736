"""What sharing a trainer's tensors in place would cost, against staging them: CUDA IPC per storage.

This process holds the 8B shape's tensors (perf/bench_weights.py) on the GPU, each in its own allocation,
as a trainer holds its parameters. For each trial it exports every storage (torch's `_share_cuda_`), and a
second process on the same GPU opens each one (rebuild_cuda_tensor), copies it into a tensor of its own
(what load_weights does), and lets go of it (closing the mapping). Timed apart:

  share   the trainer's exports of every storage, per trial
  open    the engine's opens, while none is open (first trial: the driver's first import too)
  copy    the engine's copies out of the opened storages (the floor of any update)
  close   the engine letting go of all of them
  reopen  opens again while the previous trial's storages are still held (what a cache across updates saves)

    python perf/bench_ipc_open.py --repeat 5        # on the H100

Only the export's plain fields cross between the processes, as msgpack.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack  # noqa: E402
import torch  # noqa: E402

from bench_weights import llama_tensors  # noqa: E402
from rolloutd.models import SHAPE_8B  # noqa: E402
from common import maybe_plot, save  # noqa: E402


def _engine(conn) -> None:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    own = None
    held = []
    while True:
        raw = conn.recv_bytes()
        if raw == b"stop":
            return
        shared = msgpack.unpackb(raw)
        if own is None:
            own = [torch.empty(s["size"], dtype=torch.uint8, device=dev) for s in shared]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        views = [rebuild_cuda_tensor(torch.Tensor, (s["size"],), (1,), 0, torch.UntypedStorage, torch.uint8, 0,
                                     s["handle"], s["size"], s["offset"], False, s["rc_handle"], s["rc_offset"],
                                     s["ev_handle"], s["ev_sync"]) for s in shared]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for o, v in zip(own, views):
            o.copy_(v)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        keep = shared[0].get("keep")
        if keep:  # hold them to the next trial: its opens find the mappings still open
            held[:] = views
        del views
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if not keep:
            held.clear()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        conn.send_bytes(msgpack.packb({"open": t1 - t0, "copy": t2 - t1, "close": (t4 - t3) + (t3 - t2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    named = llama_tensors(SHAPE_8B, dev)
    total = sum(t.numel() * t.element_size() for t in named.values())
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_engine, args=(there,), daemon=True)
    proc.start()
    result = {"tensors": len(named), "bytes": total, "trials": []}
    for mode in ("close", "keep"):
        for trial in range(args.repeat + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            shared = []
            for t in named.values():
                (_d, h, size, off, rch, rco, evh, evs) = t.untyped_storage()._share_cuda_()
                shared.append(dict(handle=h, size=size, offset=off, rc_handle=rch, rc_offset=rco, ev_handle=evh,
                                   ev_sync=evs, keep=mode == "keep"))
            share = time.perf_counter() - t0
            here.send_bytes(msgpack.packb(shared))
            got = msgpack.unpackb(here.recv_bytes())
            row = {"mode": mode, "trial": trial, "share": share, **got}
            result["trials"].append(row)
            print({k: (round(v * 1e3, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    here.send_bytes(b"stop")
    proc.join(60)
    summary = {}
    for mode in ("close", "keep"):
        rows = [r for r in result["trials"] if r["mode"] == mode and r["trial"] > 0]
        summary[mode] = {k: round(statistics.median(r[k] for r in rows) * 1e3, 2) for k in ("share", "open", "copy", "close")}
    result["median_ms"] = summary
    print(summary, flush=True)
    maybe_plot(plot, save("ipc-open", result, " ".join(["python", "perf/bench_ipc_open.py", *sys.argv[1:]])))


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    parts = ["share", "open", "copy", "close"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mode in enumerate(r["median_ms"]):
        vals = [r["median_ms"][mode][k] for k in parts]
        ax.bar([x + 0.4 * i for x in range(len(parts))], vals, width=0.4,
               label="let go after each trial" if mode == "close" else "held to the next trial")
        for x, v in enumerate(vals):
            ax.annotate(f"{v:.1f}", (x + 0.4 * i, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([x + 0.2 for x in range(len(parts))], parts)
    ax.set_ylabel("ms per update (median)")
    ax.set_title(f"CUDA IPC of {r['tensors']} storages, {r['bytes'] / 1e9:.2f} GB ({r.get('tag') or 'untagged'})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
