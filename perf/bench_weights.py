"""Weight update time, end to end, in one run: rolloutd's update_weights against the same bytes copied once.

GPU (the 8B shape: Llama-3-8B's layers, 16.06 GB of bf16, vLLM load_format dummy):
  copy      one device-to-device pass over the same tensors into one flat buffer: the floor
  rolloutd  update_weights from this process (the trainer) through CUDA IPC to a `rolloutd up` worker on the
            same GPU, direct (atomic=False) and atomic; values read back afterwards through the extension
  vllm      vLLM's own IPC weight transfer (LLM.update_weights, backend "ipc") of the same tensors, per
            tensor handles and packed, in the same run (after the daemon has stopped, one engine at a time)
CPU (--cpu; SmolLM2-135M's shape, or --model): shared memory through the daemon against a memcpy of the
same bytes.

    python perf/bench_weights.py --repeat 5            # on the H100
    python perf/bench_weights.py --cpu --repeat 5      # here

Every trial is kept in the JSON (perf/results/weights-<tag>.json), with a chart beside it.
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

from common import maybe_plot, save  # noqa: E402
from rolloutd.client import Client  # noqa: E402
from rolloutd.models import SHAPE_8B, config_only, prepare  # noqa: E402
from rolloutd.testing import Daemon  # noqa: E402

# Parameters read back after the updates (names vLLM keeps as they are; on CPU, vLLM repacks the linear layers'
# weights out of their parameters, so only the others can be read there).
CHECK_GPU = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.31.mlp.down_proj.weight", "lm_head.weight"]
CHECK_CPU = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"]


def llama_tensors(shape: dict, device, dtype=torch.bfloat16) -> dict:
    """HF-named Llama tensors of this shape, random (made on the device: fast)."""
    h, i, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(L):
        pre = f"model.layers.{n}."
        shapes.update({pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                       pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
                       pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
                       pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
                       pre + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    g = torch.Generator(device=device).manual_seed(0)
    return {k: torch.empty(s, dtype=dtype, device=device).normal_(0, 0.02, generator=g) for k, s in shapes.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_floor(named: dict, device, repeat: int) -> list[float]:
    total = sum(t.numel() * t.element_size() for t in named.values())
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    out = []
    for _ in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        off = 0
        for t in named.values():
            n = t.numel() * t.element_size()
            flat[off:off + n].view(t.dtype).view(t.shape).copy_(t)
            off += n
        sync(device)
        out.append(time.perf_counter() - t0)
    del flat
    return out[1:]  # the first pays for allocation


def rolloutd_runs(folder: str, named: dict, args, device, engine: tuple) -> dict:
    res = {}
    with Daemon(folder, workers=1, log_path=os.path.join(tempfile.gettempdir(), "bench-weights-up.log"),
                extra=engine, ready_timeout_s=600) as d, Client(d.front, timeout=600) as c:
        version = 0
        sizes = [int(x) for x in str(args.bucket_mb).split(",")]
        plan = [(f"rolloutd direct{f' {mb} MiB' if len(sizes) > 1 else ''}", False, args.repeat, mb) for mb in sizes]
        if args.atomic_repeat >= 0:
            plan.append(("rolloutd atomic", True, args.atomic_repeat, sizes[0]))
        for label, atomic, repeat, mb in plan:
            times, parts, mine = [], [], []
            for _ in range(repeat + 1):  # the first opens the buffers in the engine
                version += 1
                t0 = time.perf_counter()
                out = c.update_weights(named, version, atomic=atomic, bucket_bytes=mb << 20)
                times.append(time.perf_counter() - t0)
                parts.append(next(iter(out.values()))["ms"])
                mine.append(next(iter(out.values()))["trainer_ms"])
            res[label] = {"first_s": times[0], "trials_s": times[1:], "worker_ms": parts[1:], "trainer_ms": mine[1:]}
            print(f"{label}: worker's parts (ms) {parts[-1]}; trainer's {mine[-1]}", flush=True)
            print(f"{label}: first {times[0] * 1e3:.1f} ms, then {[round(t * 1e3, 1) for t in times[1:]]} ms", flush=True)
        res["check"] = check_values(c.read_weights(args.check, count=8), named, args.check)
        out = c.generate([[11, 12, 13, 14]], max_tokens=4, temperature=0.0)
        res["generated_after"] = out[0].token_ids
    return res


def check_values(read: dict, named: dict, names: list[str]) -> dict:
    """Compare what the engine holds with what was sent (first values and sums)."""
    ok = {}
    for worker, ranks in read.items():
        for name in names:
            got = ranks[0].get(name)
            want = named[name].float()
            ok[name] = bool(got) and got["head"] == want.flatten()[:8].tolist() and \
                abs(got["sum"] - float(want.sum())) <= 1e-3 * float(want.abs().sum())
    assert all(ok.values()), f"the engine does not hold what was sent: {ok}"
    return ok


def vllm_native_runs(folder: str, named: dict, args, engine_kw: dict) -> dict:
    """vLLM's own IPC weight transfer of the same tensors, through its LLM API."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # its handles are pickled over its own IPC
    from dataclasses import asdict

    from vllm import LLM
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    llm = LLM(model=folder, load_format="dummy", weight_transfer_config={"backend": "ipc"},
              worker_extension_cls="rolloutd.hijack.extension.WorkerExtension", **engine_kw)
    llm.init_weight_transfer_engine({"init_info": {}})
    res = {}
    for label, packed in [("vllm ipc", False), ("vllm ipc packed", True)]:
        times = []
        for _ in range(args.repeat + 1):
            t0 = time.perf_counter()
            llm.start_weight_update()
            IPCWeightTransferEngine.trainer_send_weights(
                iter(named.items()),
                {"send_mode": lambda info, llm=llm: llm.update_weights({"update_info": asdict(info)}), "packed": packed})
            llm.finish_weight_update()
            times.append(time.perf_counter() - t0)
        res[label] = {"first_s": times[0], "trials_s": times[1:]}
        print(f"{label}: first {times[0] * 1e3:.1f} ms, then {[round(t * 1e3, 1) for t in times[1:]]} ms", flush=True)
    res["check"] = check_values({"native": llm.collective_rpc("rolloutd_read_params", args=(args.check, 8))}, named,
                                args.check)
    del llm
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="shared memory on CPU (default: CUDA IPC on the GPU)")
    ap.add_argument("--model", default=None, help="CPU: the model folder (default: SmolLM2-135M)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--atomic-repeat", type=int, default=2, help="-1: skip the atomic runs")
    ap.add_argument("--bucket-mb", default="1024", help="bucket size in MiB; several (1024,4096) compare direct runs")
    ap.add_argument("--no-native", action="store_true", help="skip vLLM's own path")
    args = ap.parse_args()
    result = {"bucket_mb": args.bucket_mb}
    args.check = CHECK_CPU if args.cpu else CHECK_GPU
    if args.cpu:
        device = torch.device("cpu")
        folder = args.model or prepare("smollm2")
        from safetensors.torch import load_file

        named = {k: v.contiguous() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
        engine = ("--max-model-len", "2048", "--drain-s", "2")
    else:
        device = torch.device("cuda", 0)
        folder = config_only(SHAPE_8B)
        named = llama_tensors(SHAPE_8B, device)
        engine = ("--engine-arg", "load_format=dummy", "--gpu-memory-utilization", "0.35", "--enforce-eager",
                  "--max-model-len", "4096", "--drain-s", "2")
    total = sum(t.numel() * t.element_size() for t in named.values())
    result.update(model=folder if args.cpu else "llama-8b shape (dummy)", bytes=total, tensors=len(named))
    print(f"{len(named)} tensors, {total / 1e9:.2f} GB on {device}", flush=True)
    runs = {"copy": {"trials_s": copy_floor(named, device, args.repeat)}}
    print(f"copy: {[round(t * 1e3, 1) for t in runs['copy']['trials_s']]} ms", flush=True)
    runs.update(rolloutd_runs(folder, named, args, device, engine))
    if not args.cpu and not args.no_native:
        runs.update(vllm_native_runs(folder, named, args, dict(gpu_memory_utilization=0.35, enforce_eager=True,
                                                               max_model_len=4096)))
    for r in runs.values():
        if isinstance(r, dict) and "trials_s" in r:
            r["median_s"] = statistics.median(r["trials_s"])
            r["GB_per_s"] = total / r["median_s"] / 1e9
    result["runs"] = runs
    result["median_ms"] = {k: round(r["median_s"] * 1e3, 2) for k, r in runs.items() if isinstance(r, dict) and "median_s" in r}
    maybe_plot(plot, save("weights", result, " ".join(["python", "perf/bench_weights.py", *sys.argv[1:]])))


def plot(r: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    labels = list(r["median_ms"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(labels)), [r["median_ms"][k] for k in labels], color="#8fb3d9", label="median")
    for i, k in enumerate(labels):
        ts = [t * 1e3 for t in r["runs"][k]["trials_s"]]
        ax.plot([i] * len(ts), ts, "k.", ms=4)
        ax.annotate(f"{r['median_ms'][k]:.1f} ms", (i, r["median_ms"][k]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=15)
    ax.set_ylabel("ms, end to end (dots: trials)")
    ax.set_title(f"weight update of {r['bytes'] / 1e9:.2f} GB, {r['tensors']} tensors ({r.get('tag') or 'untagged'}), "
                 f"{r['bucket_mb']} MiB buckets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

if __name__ == "__main__":
    main()
