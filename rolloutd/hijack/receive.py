"""Taking weights in, inside one vLLM worker process (one engine rank).

A trainer stages its tensors in a few large buffers (rolloutd.weights) and sends their handles; here each
buffer is opened once (CUDA IPC, or a shared-memory file) and kept open across updates, each bucket's
tensors are viewed in place, and the model's own `load_weights` takes them, so that tensor-parallel
slicing and fused layers work as vLLM does them. Where vLLM repacks weights after loading (its CPU
kernels, quantized layers), its layerwise reload is used, which repacks again.

An update is atomic or direct (protocol.LoadWeights): atomic keeps a private copy of every bucket until
the commit and only then loads them, so that a failure before the commit leaves the model untouched;
direct loads each bucket as it comes, and after a failure part-way the model is incomplete.

Expected faults come back as {"error": code, "message": text} (codes from rolloutd.errors), so that the
worker can tell a trainer's mistake from an engine failure; nothing here raises for bad input.
"""
from __future__ import annotations

import collections
import glob
import mmap
import os
import re
import socket

import torch

from .devices import HOST, buffer_key

SHM_DIR = "/dev/shm"
SHM_PREFIX = "rolloutd-"
# Staging buffers kept open at once: two per trainer process is the usual; an evicted one is opened again.
_MAX_OPEN = 8
_SHM_NAME = re.compile(r"rolloutd-[A-Za-z0-9_.-]{1,200}")


class Refused(Exception):
    """Input this rank cannot take; `code` is a rolloutd.errors code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise Refused("bad_request", f"unknown dtype {name!r}")
    return dt


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


class Receiver:
    """One engine rank's side of weight updates. Lives on vLLM's worker object (see extension.py)."""

    def __init__(self, worker):
        self.worker = worker
        # buffer id -> (flat uint8 view, its mapping or None, its shared-memory file or None)
        self.buffers: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.update: str | None = None
        self.atomic = True
        self.manifest: dict[str, tuple[str, tuple]] = {}
        self.staged: list[tuple[str, torch.Tensor]] = []
        self.started = False  # direct mode: the model is being written
        self.loaded_bytes = 0
        self.got: set[str] = set()  # the manifest's names this rank has taken so far
        self.trainers: set[int] = set()  # pids of the trainers that began updates here (same host)
        self._checkpoint: dict[str, tuple[str, tuple]] | None = None

    # ------------------------------------------------------------------------------------ what we are

    @property
    def model(self) -> torch.nn.Module:
        return self.worker.model_runner.get_model()

    @property
    def device(self) -> torch.device:
        return getattr(self.worker, "device", None) or torch.device("cpu")

    def device_key(self) -> str:
        """The key of this rank's buffer in WeightsBucket.buffer: its GPU UUID, else "host"."""
        return buffer_key(self.device)

    def _model_dtype(self) -> torch.dtype:
        return self.worker.vllm_config.model_config.dtype

    def _layerwise(self) -> bool:
        """Whether loading must go through vLLM's layerwise reload: where weights are repacked after
        loading (CPU kernels, quantized layers), a plain load_weights would write tensors nobody reads."""
        cfg = self.worker.vllm_config.model_config
        return self.device.type == "cpu" or cfg.quantization is not None

    def checkpoint_manifest(self) -> dict[str, tuple[str, tuple]]:
        """{name: (dtype, shape)} of the checkpoint the engine was started from (its safetensors headers),
        or {} when it has none here (load_format dummy, a hub name)."""
        if self._checkpoint is None:
            self._checkpoint = {}
            folder = self.worker.vllm_config.model_config.model
            files = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) if os.path.isdir(folder) else []
            from safetensors import safe_open

            for f in files:
                with safe_open(f, framework="pt") as st:
                    for k in st.keys():
                        sl = st.get_slice(k)
                        self._checkpoint[k] = (_ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
        return self._checkpoint

    # ----------------------------------------------------------------------------------------- update

    def begin(self, update: str, manifest: list, atomic: bool, trainer_pid: int = 0) -> dict:
        if self.update is not None:
            self._drop()  # a leftover the worker gave up on (its deadline passed)
        if trainer_pid:
            self.trainers.add(trainer_pid)
        self.manifest = self._checked(manifest, same_dtype=True)
        self.update, self.atomic, self.staged, self.started, self.loaded_bytes = update, atomic, [], False, 0
        self.got = set()
        return {"tensors": len(self.manifest), "checked_against_checkpoint": bool(self.checkpoint_manifest())}

    def _checked(self, manifest: list, same_dtype: bool) -> dict[str, tuple[str, tuple]]:
        """The manifest as {name: (dtype, shape)}, once every entry fits the model: a name the checkpoint
        has, its shape, and (same_dtype) the engine's dtype for floating tensors, since a silent cast
        would hide a trainer sending what it did not mean to."""
        out: dict[str, tuple[str, tuple]] = {}
        want = self._model_dtype()
        known = self.checkpoint_manifest()
        for name, dtype, shape in manifest:
            if name in out:
                raise Refused("bad_request", f"tensor {name!r} appears twice in the update")
            dt = _dtype(dtype)
            if same_dtype and dt.is_floating_point and dt != want:
                raise Refused("bad_request", f"tensor {name!r} is {dtype}, the engine holds "
                                             f"{str(want).removeprefix('torch.')}: cast it before sending")
            if known:
                if name not in known:
                    near = [k for k in known if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
                    raise Refused("bad_request", f"the model has no tensor {name!r}"
                                                 + (f" (names look like {near})" if near else ""))
                if tuple(shape) != known[name][1]:
                    raise Refused("bad_request", f"tensor {name!r} has shape {list(shape)}, the model's is "
                                                 f"{list(known[name][1])}")
                if same_dtype and not dt.is_floating_point and dtype != known[name][0]:
                    raise Refused("bad_request", f"tensor {name!r} is {dtype}, the model's is {known[name][0]}")
            out[name] = (dtype, tuple(shape))
        return out

    def load(self, update: str, buffers: dict, tensors: list) -> dict:
        if update != self.update:
            raise Refused("bad_request", f"no weight update {update!r} is open on this rank")
        handle = buffers.get(self.device_key()) or buffers.get(HOST)  # any rank can read this host's memory
        if handle is None:
            return {"tensors": 0}  # another GPU's trainer feeds this rank (the commit checks that one did)
        buf = self._open(handle)
        views = []
        for name, dtype, shape, offset in tensors:
            if self.manifest.get(name) != (dtype, tuple(shape)):
                raise Refused("bad_request", f"tensor {name!r} ({dtype} {list(shape)}) is not in the update's "
                                             "manifest as such")
            dt = _dtype(dtype)
            n = _nbytes(dt, shape)
            if offset % dt.itemsize or offset + n > buf.numel():
                raise Refused("bad_request", f"tensor {name!r} at byte {offset} (+{n}) does not fit the "
                                             f"{buf.numel()}-byte buffer")
            views.append((name, buf[offset:offset + n].view(dt).view(shape)))
        try:
            if self.atomic:
                self.staged.extend((name, self._keep(v)) for name, v in views)
            else:
                if not self.started:
                    self._start()
                self.model.load_weights(iter(views))
            if buf.device.type == "cuda":
                torch.cuda.synchronize(buf.device)  # nothing reads the buffer once we answer
        finally:
            del views
        self.loaded_bytes += sum(_nbytes(_dtype(d), s) for _, d, s, _ in tensors)
        self.got.update(name for name, *_ in tensors)
        return {"tensors": len(tensors)}

    def end(self, update: str, commit: bool) -> dict:
        if update != self.update:
            raise Refused("bad_request", f"no weight update {update!r} is open on this rank")
        if not commit:
            return self._drop()
        missing = [n for n in self.manifest if n not in self.got]
        if missing:
            self._drop()
            raise Refused("bad_request", f"the rank on {self.device_key()} got {len(self.got)} of the update's "
                                         f"{len(self.manifest)} tensors (not {missing[:3]}...): a worker whose ranks "
                                         "use several GPUs needs the tensors from a trainer on each")
        try:
            if self.atomic:
                self._start()
                self.model.load_weights(iter(self.staged))
            self._finish()
        finally:
            self.update, self.staged, self.started = None, [], False
        return {"bytes": self.loaded_bytes, "complete": True}

    def load_path(self, path: str) -> dict:
        """A whole checkpoint from a HF safetensors folder on this machine, in one step."""
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
        if not files:
            raise Refused("bad_request", f"{path!r} is not a folder with *.safetensors files on {socket.gethostname()}")
        from safetensors.torch import load_file

        tensors = []
        for f in files:
            tensors.extend(load_file(f).items())
        # A checkpoint may hold another float dtype than the engine serves: load_weights casts, as at start.
        manifest = self._checked([[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors],
                                 same_dtype=False)
        if self.update is not None:
            self._drop()
        self.update, self.atomic, self.staged, self.started, self.loaded_bytes = "path", True, tensors, False, 0
        self.manifest, self.got = manifest, set(manifest)
        self.loaded_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
        return self.end("path", True)

    def _keep(self, view: torch.Tensor) -> torch.Tensor:
        """A private copy of a tensor in host memory, until the commit."""
        out = torch.empty(view.shape, dtype=view.dtype, pin_memory=view.device.type == "cuda")
        out.copy_(view)
        return out

    def _start(self) -> None:
        if self._layerwise():
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)
        self.started = True

    def _finish(self) -> None:
        if self.started and self._layerwise():
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.worker.vllm_config.model_config)

    def _drop(self) -> dict:
        """Give the update up. Atomic: nothing was written. Direct: the model holds whatever came."""
        self.forget_dead_trainers()
        incomplete = self.started
        try:
            if incomplete:
                self._finish()  # layers left half-way are put back together (with what they have)
        finally:
            self.update, self.staged, self.started = None, [], False
        return {"complete": False, "incomplete": incomplete}

    # ------------------------------------------------------------------------------------------ buffers

    def _open(self, handle: dict) -> torch.Tensor:
        """The staging buffer a handle names, as a flat uint8 tensor; opened once and kept."""
        bid = handle.get("id")
        if not isinstance(bid, str) or not 0 < len(bid) <= 256:
            raise Refused("bad_request", "a buffer handle needs an id")
        if bid in self.buffers:
            self.buffers.move_to_end(bid)
            return self.buffers[bid][0]
        kind = handle.get("kind")
        if kind == "shm":
            opened = self._open_shm(handle)
        elif kind == "cuda_ipc":
            opened = self._open_cuda(handle)
        else:
            raise Refused("bad_request", f"unknown buffer kind {kind!r}")
        self.buffers[bid] = opened
        while len(self.buffers) > _MAX_OPEN:
            self.buffers.popitem(last=False)
        return opened[0]

    def close_buffers(self, pids: list[int] | None = None) -> int:
        """Let go of the buffers of these trainer processes (all if None): their memory can then be freed."""
        gone = [b for b in self.buffers if pids is None or _pid_of(b) in pids]
        for b in gone:
            del self.buffers[b]
        return len(gone)

    def forget_dead_trainers(self) -> None:
        """Close the buffers of trainer processes that are gone, and remove their shared-memory files (the
        ones opened here, and those that never got sent: a trainer killed right after handing its first
        bucket to ZeroMQ may die before it leaves): a trainer killed outright cannot remove its own, and
        each holds a whole bucket of memory."""
        known = {pid for pid in map(_pid_of, self.buffers) if pid is not None} | self.trainers
        dead = {pid for pid in known if not _alive(pid)}
        self.trainers -= dead
        self.close_buffers(list(dead))
        for pid in dead:
            for path in glob.glob(os.path.join(SHM_DIR, f"{SHM_PREFIX}{pid}-*")):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _open_shm(self, handle: dict) -> tuple:
        name, size = handle.get("name"), handle.get("size")
        if not isinstance(name, str) or not _SHM_NAME.fullmatch(name):
            raise Refused("bad_request", f"shared-memory buffer names match {_SHM_NAME.pattern}; got {name!r}")
        if handle.get("host") not in ("", socket.gethostname()):
            raise Refused("bad_request", f"the trainer's shared memory is on host {handle.get('host')!r}, this "
                                         f"engine on {socket.gethostname()!r}: send from the same host, or load "
                                         "from a path")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise Refused("bad_request", f"cannot open the trainer's buffer {path}: {e.strerror}") from None
        try:
            if not isinstance(size, int) or os.fstat(fd).st_size != size or size <= 0:
                raise Refused("bad_request", f"buffer {path} is {os.fstat(fd).st_size} bytes, the handle says {size}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return torch.frombuffer(mm, dtype=torch.uint8), mm, path

    def _open_cuda(self, handle: dict) -> tuple:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        if self.device.type != "cuda":
            raise Refused("bad_request", "a CUDA IPC buffer came to an engine without a GPU")
        ipc = handle.get("ipc")
        need = ("handle", "size", "offset", "ref_counter_handle", "ref_counter_offset", "event_handle",
                "event_sync_required")
        if not isinstance(ipc, dict) or any(k not in ipc for k in need):
            raise Refused("bad_request", f"a CUDA IPC handle has the fields {need}")
        size = ipc["size"]
        try:
            t = rebuild_cuda_tensor(torch.Tensor, (size,), (1,), 0, torch.UntypedStorage, torch.uint8,
                                    self.device.index, ipc["handle"], size, ipc["offset"], False,
                                    ipc["ref_counter_handle"], ipc["ref_counter_offset"], ipc["event_handle"],
                                    ipc["event_sync_required"])
        except Exception as e:
            raise Refused("bad_request", f"cannot open the trainer's CUDA IPC buffer: {type(e).__name__}: {e}") from None
        return t, None, None

    # ---------------------------------------------------------------------------------------- checks

    def read(self, names: list[str], count: int) -> dict:
        """The first `count` values and the sum of each named parameter (vLLM's names), as floats: what
        tests read back to see that an update landed."""
        params = dict(self.model.named_parameters())
        out = {}
        for n in names:
            p = params.get(n)
            if p is not None:
                flat = p.detach().flatten().float()
                out[n] = {"head": flat[:count].cpu().tolist(), "sum": float(flat.sum()), "numel": flat.numel()}
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(buffer_id: str) -> int | None:
    """Buffer ids start with the trainer's pid (rolloutd.weights names them so)."""
    head = buffer_id.split("-", 1)[0]
    return int(head) if head.isdigit() else None


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
              "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2"}
