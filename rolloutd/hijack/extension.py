"""The worker extension vLLM mixes into each of its worker processes (`worker_extension_cls`).

Methods here are called through `AsyncLLM.collective_rpc(name)` and run once per engine rank, next to
the model's tensors. Their names carry a `rolloutd_` prefix so they cannot shadow a vLLM worker method.
"""
from __future__ import annotations


class WorkerExtension:
    def rolloutd_device_uuid(self) -> str:
        """The GPU UUID this rank runs on ("cpu" on a CPU engine): trainers match weights to workers by
        it, since CUDA_VISIBLE_DEVICES renumbers devices differently in every process."""
        import torch

        device = getattr(self, "device", None)
        if device is None or device.type != "cuda":
            return "cpu"
        return "GPU-" + str(torch.cuda.get_device_properties(device).uuid)
