"""How rolloutd names a device, the same in the trainer, the worker and every engine rank: a GPU by its
UUID, since CUDA_VISIBLE_DEVICES numbers GPUs differently in each process, and CPU memory as HOST (a
shared-memory buffer, which any rank on the host can read)."""
from __future__ import annotations

HOST = "host"
GPU_PREFIX = "GPU-"


def gpu_key(device) -> str:
    import torch

    return GPU_PREFIX + str(torch.cuda.get_device_properties(device).uuid)


def buffer_key(device) -> str:
    """Where a buffer on this torch device lies: its GPU's key, or HOST for CPU memory."""
    return gpu_key(device) if device.type == "cuda" else HOST
