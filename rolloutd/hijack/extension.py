"""The worker extension vLLM mixes into each of its worker processes (`worker_extension_cls`).

Methods here are called through `AsyncLLM.collective_rpc(name)` and run once per engine rank, next to
the model's tensors. Their names carry a `rolloutd_` prefix so they cannot shadow a vLLM worker method.
The weight methods answer {"error": code, "message": text} for input they refuse (receive.Refused), so
that the worker can tell a trainer's mistake from an engine failure.
"""
from __future__ import annotations


def _answer(fn, *args) -> dict:
    from .receive import Refused

    try:
        return fn(*args)
    except Refused as e:
        return {"error": e.code, "message": str(e)}


class WorkerExtension:
    def rolloutd_device_uuid(self) -> str:
        """The GPU UUID this rank runs on ("cpu" on a CPU engine): trainers match weights to workers by
        it, since CUDA_VISIBLE_DEVICES renumbers devices differently in every process."""
        from .devices import gpu_key

        device = getattr(self, "device", None)
        if device is None or device.type != "cuda":
            return "cpu"
        return gpu_key(device)

    def _rolloutd_receiver(self):
        rx = getattr(self, "_rolloutd_rx", None)
        if rx is None:
            from .receive import Receiver

            rx = self._rolloutd_rx = Receiver(self)
        return rx

    def rolloutd_weights_begin(self, update: str, manifest: list, atomic: bool, trainer_pid: int = 0) -> dict:
        """Check an update's manifest against the model; nothing is written yet."""
        rx = self._rolloutd_receiver()
        return _answer(rx.begin, update, manifest, atomic, trainer_pid)

    def rolloutd_weights_load(self, update: str, buffers: dict, tensors: list) -> dict:
        """Take one bucket from this rank's staging buffer; returns once nothing reads the buffer."""
        rx = self._rolloutd_receiver()
        return _answer(rx.load, update, buffers, tensors)

    def rolloutd_weights_end(self, update: str, commit: bool) -> dict:
        rx = self._rolloutd_receiver()
        return _answer(rx.end, update, commit)

    def rolloutd_weights_from_path(self, path: str) -> dict:
        rx = self._rolloutd_receiver()
        return _answer(rx.load_path, path)

    def rolloutd_read_params(self, names: list, count: int = 8) -> dict:
        """The first values and sum of each named parameter (vLLM's names): to check that an update landed."""
        return self._rolloutd_receiver().read(names, count)

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
