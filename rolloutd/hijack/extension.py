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

    def rolloutd_shield_signals(self, on: bool, owner_pid: int) -> str:
        """Ignore SIGTERM and SIGINT in this engine process while the worker that owns it serves (on=True),
        or restore vLLM's handlers before the worker shuts the engine down (on=False). Returns this
        process's name if anything changed here, else "".

        systemd and slurm signal every process of the unit or job step at once. vLLM's processes end on
        that at once: the engine reports itself dead and the requests fail instead of draining. The worker
        owns the stop (stopping.py): it drains, aborts, delivers, then shuts the engine down itself."""
        import multiprocessing
        import os
        import signal
        import threading

        if os.getpid() == owner_pid or threading.current_thread() is not threading.main_thread():
            return ""  # the worker's own process (an engine without processes): its handlers stay
        global _saved_handlers
        if on and _saved_handlers is None:
            _saved_handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
            return multiprocessing.current_process().name
        if not on and _saved_handlers is not None:
            for s, h in _saved_handlers.items():
                signal.signal(s, h)
            _saved_handlers = None
            return multiprocessing.current_process().name
        return ""


_saved_handlers: dict | None = None  # this process's handlers from before rolloutd_shield_signals(True)
