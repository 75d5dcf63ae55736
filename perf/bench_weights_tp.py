"""Weight update time of the 8B shape into a tensor-parallel (TP=2) worker over two GPUs, in one run:
rolloutd against vLLM's own IPC path and a device-to-device copy of the same bytes.

Two trainer ranks (processes), one per GPU, each holding the full 8B-shaped tensors on its own GPU (as an
FSDP trainer gathers them), as perf/bench_weights.py makes them:
  copy      each rank copies its tensors once into a flat buffer, both at once: the floor
  rolloutd  both ranks call update_weights with the same version; the TP=2 worker's rank on each GPU reads
            the trainer beside it, and the update commits when both have sent all (timed on rank 0, from a
            barrier to its return: the commit answers both at once)
  vllm ipc  vLLM's IPCWeightTransferEngine.trainer_send_weights on both ranks (they all-gather their
            handles through torch.distributed; rank 0 hands them to LLM(tensor_parallel_size=2) in its
            process), per-tensor handles and packed; after the daemon has stopped

    python perf/bench_weights_tp.py --repeat 5       # on a 2-GPU machine (GPU_BENCH=weights_tp in gpu_run.sh)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

from bench_weights import check_values, llama_tensors, plot  # noqa: E402
from common import maybe_plot, save  # noqa: E402
from rolloutd.client import Client  # noqa: E402
from rolloutd.models import SHAPE_8B, config_only  # noqa: E402
from rolloutd.testing import Daemon  # noqa: E402

WORLD = 2


def timed(rank: int, fn) -> float:
    """fn on every rank from a barrier; the longest rank's time (s), known to every rank."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def copy_floor(named: dict, device, repeat: int) -> list[float]:
    total = sum(t.numel() * t.element_size() for t in named.values())
    flat = torch.empty(total, dtype=torch.uint8, device=device)

    def once():
        off = 0
        for t in named.values():
            n = t.numel() * t.element_size()
            flat[off:off + n].view(t.dtype).view(t.shape).copy_(t)
            off += n
        torch.cuda.synchronize(device)
    return [timed(0, once) for _ in range(repeat + 1)][1:]


def rolloutd_runs(rank: int, folder: str, named: dict, args) -> dict:
    box = [None]
    daemon = None
    if rank == 0:
        daemon = Daemon(folder, workers=1, log_path=os.path.join(tempfile.gettempdir(), "bench-weights-tp-up.log"),
                        extra=("--tensor-parallel-size", "2", "--engine-arg", "load_format=dummy",
                               "--gpu-memory-utilization", "0.35", "--enforce-eager", "--max-model-len", "4096",
                               "--drain-s", "2"), ready_timeout_s=900)
        daemon.__enter__()
        box = [daemon.front]
    dist.broadcast_object_list(box, src=0)
    res = {}
    try:
        with Client(box[0], timeout=600) as c:
            version = 0
            for mb in [int(x) for x in str(args.bucket_mb).split(",")]:
                times, parts = [], []
                for _ in range(args.repeat + 1):  # the first opens the buffers in the engine
                    version += 1
                    out = {}
                    times.append(timed(rank, lambda v=version: out.update(
                        c.update_weights(named, v, atomic=False, bucket_bytes=mb << 20))))
                    w = next(iter(out.values()))
                    parts.append({"worker": w["ms"], "trainer": w["trainer_ms"]})
                label = f"rolloutd direct {mb} MiB"
                res[label] = {"first_s": times[0], "trials_s": times[1:], "parts": parts[1:]}
                if rank == 0:
                    print(f"{label}: {[round(t * 1e3, 1) for t in times]} ms; last {parts[-1]}", flush=True)
            if rank == 0:
                read = c.read_weights(["model.norm.weight"], count=8)
                # each engine rank holds its shard of the sharded tensors: the replicated norm is whole on both
                res["check"] = check_values({w: [r] for w, ranks in read.items() for r in ranks[:1]}, named,
                                            ["model.norm.weight"])
                res["check_ranks"] = {w: len(ranks) for w, ranks in read.items()}
    finally:
        dist.barrier()
        if daemon is not None:
            daemon.__exit__(None, None, None)
    return res


def vllm_native_runs(rank: int, folder: str, named: dict, args) -> dict:
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    llm = None
    if rank == 0:
        from vllm import LLM

        llm = LLM(model=folder, load_format="dummy", tensor_parallel_size=2, weight_transfer_config={"backend": "ipc"},
                  worker_extension_cls="rolloutd.hijack.extension.WorkerExtension", gpu_memory_utilization=0.35,
                  enforce_eager=True, max_model_len=4096)
        llm.init_weight_transfer_engine({"init_info": {}})
    res = {}
    for label, packed in [("vllm ipc", False), ("vllm ipc packed", True)]:
        def once(packed=packed):
            if llm is not None:
                llm.start_weight_update()
            send = (lambda info: llm.update_weights({"update_info": asdict(info)})) if llm is not None else (lambda info: None)
            IPCWeightTransferEngine.trainer_send_weights(iter(named.items()), {"send_mode": send, "packed": packed})
            if llm is not None:
                llm.finish_weight_update()
        times = [timed(rank, once) for _ in range(args.repeat + 1)]
        res[label] = {"first_s": times[0], "trials_s": times[1:]}
        if rank == 0:
            print(f"{label}: {[round(t * 1e3, 1) for t in times]} ms", flush=True)
    if llm is not None:
        ranks = llm.collective_rpc("rolloutd_read_params", args=(["model.norm.weight"], 8))
        res["check"] = check_values({"native": ranks[:1]}, named, ["model.norm.weight"])
        del llm
    dist.barrier()
    return res


def run(rank: int, args, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    named = llama_tensors(SHAPE_8B, device)  # the same seed on both ranks: the same values
    total = sum(t.numel() * t.element_size() for t in named.values())
    runs = {"copy (each GPU at once)": {"trials_s": copy_floor(named, device, args.repeat)}}
    torch.cuda.empty_cache()  # the copy's 16 GB go back before the engines start
    if rank == 0:
        print(f"{len(named)} tensors, {total / 1e9:.2f} GB on each of {WORLD} GPUs; copy "
              f"{[round(t * 1e3, 1) for t in runs['copy (each GPU at once)']['trials_s']]} ms", flush=True)
    runs.update(rolloutd_runs(rank, folder, named, args))
    if not args.no_native:
        runs.update(vllm_native_runs(rank, folder, named, args))
    if rank == 0:
        for r in runs.values():
            if isinstance(r, dict) and "trials_s" in r:
                r["median_s"] = statistics.median(r["trials_s"])
                r["GB_per_s"] = total / r["median_s"] / 1e9  # per GPU: each engine rank reads its trainer's copy
        result = {"bucket_mb": args.bucket_mb, "model": "llama-8b shape (dummy), TP=2", "bytes": total,
                  "tensors": len(named), "runs": runs,
                  "median_ms": {k: round(r["median_s"] * 1e3, 2) for k, r in runs.items()
                                if isinstance(r, dict) and "median_s" in r}}
        maybe_plot(plot, save("weights-tp2", result, " ".join(["python", "perf/bench_weights_tp.py", *sys.argv[1:]])))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bucket-mb", default="2048", help="bucket size in MiB; several (1024,2048) compare")
    ap.add_argument("--no-native", action="store_true", help="skip vLLM's own path")
    args = ap.parse_args()
    if torch.cuda.device_count() < WORLD:
        sys.exit(f"needs {WORLD} GPUs, this machine has {torch.cuda.device_count()}")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # vLLM's own path pickles its handles
    folder = config_only(SHAPE_8B)
    port = 29500 + os.getpid() % 1000
    tmp.spawn(run, args=(args, folder, port), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
