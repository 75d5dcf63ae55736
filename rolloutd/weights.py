"""The trainer's side of a weight update: named tensors packed into a few large buckets, staged in two
buffers used in turn, and the messages that carry only the buffers' handles and where each tensor lies.

    buffers    two per trainer process and device, made on first use and kept: a shared-memory file under
               /dev/shm for tensors in CPU memory, a CUDA allocation for tensors on a GPU. Each is
               exported once; the engine keeps it open across updates (hijack/receive.py).
    buckets    tensors in order, each at an offset aligned to ALIGN, a bucket closing when the next tensor
               would not fit; a tensor bigger than a bucket makes a bucket of its own, and the buffers
               grow to hold it.
    the flow   `steps` yields what to send and what to wait for, and is driven by Client and AsyncClient
               alike: LoadWeights (the manifest: every worker checks it before anything loads), then one
               WeightsBucket per bucket, packing the next bucket while the engine loads the previous one,
               then WeightsEnd to commit. Any failure drops the update everywhere and raises.

Nothing here is pickled: a CUDA IPC handle is the plain fields of torch's own export.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import socket
import time
import uuid
from typing import Iterable

from . import protocol as p
from .errors import BadRequest, RolloutdError, from_code
from .hijack.devices import HOST, buffer_key

ALIGN = 256  # every tensor's offset in a buffer: any dtype's views are aligned, as CUDA kernels like
DEFAULT_BUCKET_BYTES = 1 << 30
SHM_DIR = "/dev/shm"


def _torch():
    import torch

    return torch


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class Bucket:
    entries: list  # (name, tensor, offset)
    nbytes: int

    def layout(self) -> list:
        return [[n, dtype_name(t.dtype), list(t.shape), off] for n, t, off in self.entries]


def plan(named: list, bucket_bytes: int) -> list[Bucket]:
    """Split (name, tensor) pairs, in order, into buckets of at most bucket_bytes (a bigger tensor alone)."""
    buckets, cur, size = [], [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        off = -(-size // ALIGN) * ALIGN
        if cur and off + n > bucket_bytes:
            buckets.append(Bucket(cur, size))
            cur, off = [], 0
        cur.append((name, t, off))
        size = off + n
    if cur:
        buckets.append(Bucket(cur, size))
    return buckets


class ShmBuffer:
    """A file in /dev/shm, mapped here and opened by name in the engine's processes."""
    kind = "shm"

    def __init__(self, size: int):
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.name = f"rolloutd-{self.id}"
        self.path = os.path.join(SHM_DIR, self.name)
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.tensor = _torch().frombuffer(self._mm, dtype=_torch().uint8)
        self._bytes = self.tensor.numpy()

    def handle(self) -> dict:
        return {"kind": "shm", "id": self.id, "name": self.name, "size": self.size, "host": socket.gethostname()}

    def put(self, offset: int, t) -> None:
        """Copy a tensor in at offset. A contiguous one goes as bytes through numpy, on this thread alone:
        torch's copy_ spreads over its intra-op threads, which on a machine whose cores the engine keeps
        busy made packing 7-8x slower (0.40-0.49 s against 0.06 s for 269 MB, perf/results/README.md)."""
        if t.is_contiguous() and t.device.type == "cpu":
            n = t.numel() * t.element_size()
            self._bytes[offset:offset + n] = t.reshape(-1).view(_torch().uint8).numpy()
        else:
            _put(self.tensor, offset, t)

    def ready(self) -> None:
        pass  # CPU copies are done when copy_ returns

    def close(self) -> None:
        self.tensor = self._bytes = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            self._mm.close()
        except BufferError:
            pass  # a view of it is still alive somewhere: the mapping goes when that does


class CudaBuffer:
    """A CUDA allocation exported once through CUDA IPC (the fields of torch's own export, unpickled)."""
    kind = "cuda_ipc"

    def __init__(self, size: int, device):
        torch = _torch()
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.size = size
        self.device = device
        self.tensor = _shareable_empty(size, device)
        storage = self.tensor.untyped_storage()
        try:
            (_dev, handle, size_bytes, offset, rc_handle, rc_offset, ev_handle, ev_sync) = storage._share_cuda_()
        except RuntimeError as e:
            raise RolloutdError(f"this process cannot share CUDA memory through IPC ({e}). {_EXPANDABLE_HINT}") from None
        self._ipc = {"handle": handle, "size": size_bytes, "offset": offset, "ref_counter_handle": rc_handle,
                     "ref_counter_offset": rc_offset, "event_handle": ev_handle, "event_sync_required": ev_sync}
        self._stream = torch.cuda.current_stream(device)

    def handle(self) -> dict:
        return {"kind": "cuda_ipc", "id": self.id, "size": self.size, "ipc": self._ipc}

    def put(self, offset: int, t) -> None:
        _put(self.tensor, offset, t)

    def ready(self) -> None:
        self._stream.synchronize()  # the engine reads it from another process: the copies must be done

    def close(self) -> None:
        self.tensor = None


def _put(buf, offset: int, t) -> None:
    n = t.numel() * t.element_size()
    buf[offset:offset + n].view(t.dtype).view(t.shape).copy_(t)


_EXPANDABLE_HINT = ("With PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, allocations are shared through file "
                    "descriptors that unprivileged containers cannot pass; rolloutd allocates its staging buffers "
                    "with expandable segments off, so this comes from elsewhere: check that the trainer and the "
                    "engine see the same GPU and that CUDA IPC is allowed between them (same host, no --ipc=private).")


def _shareable_empty(size: int, device):
    """An allocation that CUDA IPC can export. The caching allocator's expandable segments cannot be
    (they need pidfd_getfd, refused in unprivileged containers), so they are switched off around it."""
    torch = _torch()
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    expandable = "expandable_segments:true" in conf.replace(" ", "").lower()
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        return torch.empty(size, dtype=torch.uint8, device=device)
    finally:
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


class Staging:
    """The two buffers of one device, used in turn, kept for the next update (the engine keeps them open)."""

    def __init__(self, device):
        self.device = device
        self.key = buffer_key(device)
        self.buffers: list = []

    def ensure(self, size: int) -> None:
        if self.buffers and self.buffers[0].size >= size:
            return
        self.close()
        make = (lambda: CudaBuffer(size, self.device)) if self.device.type == "cuda" else (lambda: ShmBuffer(size))
        self.buffers = [make(), make()]

    def close(self) -> None:
        for b in self.buffers:
            b.close()
        self.buffers = []


def named_list(named_tensors) -> list:
    """(name, tensor) pairs from a dict, a list of pairs, or model.named_parameters(); checked for one device."""
    items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
    if not items:
        raise BadRequest("update_weights got no tensors")
    torch = _torch()
    devices = {t.device for _, t in items}
    if len(devices) != 1:
        raise BadRequest(f"the tensors of one update_weights call lie on one device; got {sorted(map(str, devices))}")
    for name, t in items:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise BadRequest("update_weights takes (name, tensor) pairs")
        if dtype_name(t.dtype) not in p.DTYPES:
            raise BadRequest(f"tensor {name!r} has dtype {t.dtype}, which rolloutd does not carry")
    return [(name, t.detach()) for name, t in items]


def targets(status: dict, key: str, wanted: Iterable[str] | None) -> list[str]:
    """The workers an update from a buffer on `key` reaches: those with a rank on that GPU (a worker whose
    ranks use several GPUs takes the other GPUs' tensors from the trainer processes there), or, from host
    memory, those on this host. `wanted` names them explicitly (each must be reachable)."""
    host = socket.gethostname()
    reach = {}
    for w in status["workers"]:
        ok = (w.get("host", "") in ("", host)) if key == HOST else key in w["devices"]
        reach[w["id"]] = ok
    if wanted is not None:
        wanted = list(wanted)
        missing = [n for n in wanted if n not in reach]
        if missing:
            raise BadRequest(f"no registered worker named {missing}")
        far = [n for n in wanted if not reach[n]]
        if far:
            where = "this host" if key == HOST else f"GPU {key}"
            raise BadRequest(f"worker(s) {far} cannot read buffers on {where}")
        return wanted
    out = [n for n, ok in reach.items() if ok]
    if not out:
        where = f"on host {host}" if key == HOST else f"with a rank on GPU {key}"
        raise BadRequest(f"no registered worker {where} ({len(reach)} registered)")
    return out


# -------------------------------------------------------------------------------------------- the flow

@dataclasses.dataclass
class Send:
    msg: p.Message


@dataclasses.dataclass
class Wait:
    cid: str  # the driver answers with the reply (a protocol.Reply or Error message)
    quiet: bool = False  # a failure to get it answers None instead of raising


def steps(named: list, version: int, staging: Staging, workers: list[str], new_id, *, bucket_bytes: int,
          pause: str, atomic: bool, wake: bool, timeout_s: float, started: float | None = None):
    """The update as a generator of Send / Wait; the driver sends each Send and answers each Wait with the
    reply message. Returns {worker: its commit reply data, with "trainer_ms"}. Any failed reply drops the
    update on every worker and raises the first failure's typed error. `started`: time.perf_counter() when
    the caller began, for trainer_ms."""
    marks = {"start": time.perf_counter() if started is None else started}
    pack = 0.0
    update = uuid.uuid4().hex[:16]
    common = dict(update=update, workers=workers, timeout_s=timeout_s)
    source = "cuda_ipc" if staging.device.type == "cuda" else "shm"
    begin = p.LoadWeights(cid=new_id(), version=version, source=source, pause=pause, atomic=atomic, wake=wake,
                          trainer_pid=os.getpid(), device=staging.key,
                          manifest=[[n, dtype_name(t.dtype), list(t.shape)] for n, t in named], **common)
    try:
        marks["prepare"] = time.perf_counter()
        yield Send(begin)
        # The first two buckets are packed and sent while the workers pause and check the manifest: a
        # worker holds them until its ranks have begun, and refuses them if the begin failed.
        buckets = plan(named, bucket_bytes)
        staging.ensure(max(b.nbytes for b in buckets))
        sent: list[str] = []
        for i, b in enumerate(buckets):
            if i == 2:
                check((yield Wait(begin.cid)), "begin")
                marks["begin"] = time.perf_counter()
            if i >= 2:  # the buffer this bucket goes to held bucket i-2: it must be loaded first
                check((yield Wait(sent[i - 2])), f"bucket {i - 2}")
            buf = staging.buffers[i % 2]
            t0 = time.perf_counter()
            for _, t, off in b.entries:
                buf.put(off, t)
            buf.ready()
            pack += time.perf_counter() - t0
            msg = p.WeightsBucket(cid=new_id(), index=i, buffer={staging.key: buf.handle()}, tensors=b.layout(),
                                  **common)
            yield Send(msg)
            sent.append(msg.cid)
        if len(buckets) < 3:
            check((yield Wait(begin.cid)), "begin")
            marks["begin"] = time.perf_counter()
        for cid in sent[max(0, len(sent) - 2):]:
            check((yield Wait(cid)), f"bucket {sent.index(cid)}")
        marks["buckets"] = time.perf_counter()
    except Exception:
        # Best effort: the workers that took part drop it and serve on (they would after timeout_s anyway);
        # waiting for that means the caller's next generate sees them serving again.
        drop = p.WeightsEnd(cid=new_id(), commit=False, **common)
        yield Send(drop)
        yield Wait(drop.cid, quiet=True)
        raise
    end = p.WeightsEnd(cid=new_id(), commit=True, **common)
    yield Send(end)
    reply = check((yield Wait(end.cid)), "commit")
    marks["commit"] = time.perf_counter()
    keys = list(marks)
    ms = {k: round((marks[k] - marks[prev]) * 1e3, 2) for prev, k in zip(keys, keys[1:])}
    ms["pack"] = round(pack * 1e3, 2)
    return {name: {**w.get("data", {}), "trainer_ms": ms} for name, w in reply.workers.items()}


def check(msg, what: str):
    """The reply, if every worker it went to succeeded; else the typed error of the first that did not."""
    if msg.CMD is p.Cmd.ERROR:
        raise from_code(msg.code, f"weight update ({what}): {msg.message}")
    bad = {n: w for n, w in msg.workers.items() if not w.get("ok")}
    if not msg.ok or bad:
        name, w = next(iter(bad.items())) if bad else ("?", {})
        err = from_code(w.get("error") or "internal",
                        f"weight update ({what}) failed on worker {name}: {w.get('message', '')}"
                        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        err.workers = msg.workers
        raise err
    return msg
