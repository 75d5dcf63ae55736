"""`rolloutd up`: the broker and N local workers as child processes, in the foreground.

Each child runs in its own process session, so that its whole tree (vLLM's engine processes included)
can be signalled as one group: nothing is left behind when a worker dies or the daemon stops. Stopping
(SIGTERM, or Ctrl-C) goes workers first, so that they drain and their last results still reach clients
through the broker, then the broker. A second signal stops them at once (workers still send what they
hold as partial outputs), a third kills. Readiness is announced on stdout and to systemd (sd_notify
READY=1) once every worker has registered.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from .client import Client
from .errors import RolloutdError
from .stopping import Stop, StopRequests

log = logging.getLogger("rolloutd.up")

_POLL_S = 0.2
# In a log (not a terminal), how often start-up says what it waits for.
_PROGRESS_EVERY_S = 10.0
# After a second signal, how long children get to stop at once before they are killed: a worker aborts its
# requests and sends their partial outputs first, well within this.
_AT_ONCE_S = 5.0


class _Progress:
    """One line of progress: rewritten in place on a terminal, printed now and then into a log."""

    def __init__(self, stream):
        self.stream = stream
        self.live = stream.isatty()
        self._last = 0.0
        self._shown = False

    def show(self, text: str) -> None:
        if self.live:
            self.stream.write("\r" + text + "\033[K")
            self.stream.flush()
            self._shown = True
        elif time.monotonic() - self._last >= _PROGRESS_EVERY_S:
            self._last = time.monotonic()
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        if self.live and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.warning("sd_notify failed: %s", e)


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is there, without importing torch (seconds): its driver's device files."""
    return os.path.exists("/dev/nvidiactl")


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # no torch / no driver: a CPU machine
        return 0


class Launcher:
    def __init__(self, broker_cmd: list[str], worker_cmds: list[tuple[list[str], dict]], front: str,
                 ready_timeout_s: float = 900.0, stop_timeout_s: float = 60.0, keys: str | None = None):
        self.broker_cmd = broker_cmd
        self.keys = keys
        self.worker_cmds = worker_cmds
        self.front = front
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.broker: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.stops = StopRequests()  # the signal handler only counts; the loops act on it

    def _spawn(self, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stops.signal)
        signal.signal(signal.SIGINT, self.stops.signal)
        self.broker = self._spawn(self.broker_cmd)
        self.workers = [self._spawn(cmd, env) for cmd, env in self.worker_cmds]
        try:
            if not self._wait_ready():
                return 0 if self.stops.level else 1  # asked to stop while starting: a normal stop
            rc = self._watch()
        finally:
            self._stop()
        return rc

    def _wait_ready(self) -> bool:
        """Until every worker has registered (False if one exits first, or at the ready timeout), saying what
        it waits for: a live line on a terminal, a plain line every _PROGRESS_EVERY_S in a log."""
        want = len(self.workers)
        t0 = time.monotonic()
        progress = _Progress(sys.stderr)
        with Client(self.front, timeout=2.0, keys=self.keys) as c:
            while not self.stops.level:
                ready = 0
                try:
                    ready = len(c.status(timeout=1.0)["workers"])
                except RolloutdError:
                    pass
                if ready >= want:
                    progress.done()
                    print(f"rolloutd: ready: {want} worker(s) behind {self.front}", flush=True)
                    sd_notify("READY=1")
                    return True
                gone = [w for w in self.workers if w.poll() is not None]
                if self.broker.poll() is not None or gone:
                    progress.done()
                    what = (f"the broker exited (code {self.broker.returncode})" if self.broker.poll() is not None
                            else f"worker pid {gone[0].pid} exited (code {gone[0].returncode})")
                    print(f"rolloutd up: {what} before every worker was ready; stopping (its reason is above)",
                          file=sys.stderr, flush=True)
                    return False
                waited = time.monotonic() - t0
                progress.show(f"rolloutd: {want} worker(s): {ready} ready, {want - ready} loading the model, "
                              f"{waited:.0f} s")
                sd_notify(f"STATUS={ready} of {want} workers ready")
                if waited > self.ready_timeout_s:
                    progress.done()
                    log.error("only %d of %d workers registered within %.0f s; stopping", ready, want,
                              self.ready_timeout_s)
                    return False
                time.sleep(_POLL_S)
        progress.done()
        return False

    def _dead(self) -> bool:
        if self.broker.poll() is not None:
            log.error("the broker exited (code %s); stopping", self.broker.returncode)
            return True
        for w in self.workers:
            if w.poll() is not None and not getattr(w, "_reported", False):
                w._reported = True
                # Its engine processes may outlive it: end the whole group.
                _killpg(w, signal.SIGKILL)
                log.error("worker pid %d exited (code %s); its requests fail over to the others",
                          w.pid, w.returncode)
        return all(w.poll() is not None for w in self.workers)

    def _watch(self) -> int:
        while not self.stops.level:
            if self._dead():
                return 1
            time.sleep(_POLL_S)
        return 0

    def _stop(self) -> None:
        sd_notify("STOPPING=1")
        print("rolloutd: stopping (again to stop at once)", flush=True)
        # The signal goes to each child's main process only: a worker owns its engine's stop (stopping.py).
        for w in self.workers:
            _kill(w, signal.SIGTERM)
        self._wait(self.workers)
        _kill(self.broker, signal.SIGTERM)
        self._wait([self.broker])
        for p in [*self.workers, self.broker]:
            _killpg(p, signal.SIGKILL)  # anything left in the groups (engine processes) goes too
        print("rolloutd: stopped", flush=True)

    def _wait(self, procs: list[subprocess.Popen]) -> None:
        """Until procs exit. A second signal passes on to them (a worker then aborts what it holds at once and
        still delivers the partial outputs) with _AT_ONCE_S to go; a third, or the stop timeout, kills."""
        deadline = time.monotonic() + self.stop_timeout_s
        seen = max(self.stops.level, Stop.DRAIN)
        while any(p.poll() is None for p in procs):
            if self.stops.level > seen:
                seen = self.stops.level
                if seen == Stop.NOW:
                    for p in procs:
                        _kill(p, signal.SIGTERM)
                    deadline = min(deadline, time.monotonic() + _AT_ONCE_S)
                else:
                    deadline = 0.0
            if time.monotonic() > deadline:
                for p in procs:
                    _killpg(p, signal.SIGKILL)
                return
            time.sleep(0.05)


def _kill(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is not None and proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _killpg(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def child_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rolloutd.cli", *args]
