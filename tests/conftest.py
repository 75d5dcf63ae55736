"""Shared helpers: a real daemon (`rolloutd up` with real vLLM workers on the tiny model) as a fixture."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rolloutd.client import Client
from rolloutd.models import prepare

HEARTBEAT_S = 0.5
# Missed heartbeats before a worker is declared lost: 12 s here, against the product's 5 s. On
# the 2-core CI VMs a process is at times not scheduled for seconds while a vLLM CPU engine decodes (seen:
# a healthy worker silent for 10 s while the broker ran), and it would be expired.
LIVENESS = 24
# Long enough that a generation is still running when a test aborts it, on a loaded 2-core machine
# (~1k tokens/s a request) or an idle one (~6k).
LONG = 30000
# Every daemon and in-process engine of the tests takes prompts plus outputs this long: LONG fits.
MODEL_LEN = LONG + 100
# status() against a real daemon: the product's 5 s default is no bound a frozen CI broker meets (it was
# unscheduled for 5 s and more here), and how fast status answers is not what these tests are about.
STATUS_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Daemon:
    """`rolloutd up` in a subprocess, with its log in a file."""

    def __init__(self, log_path, workers=2, extra=("--drain-s", "2"), max_model_len=MODEL_LEN):
        self.front = f"tcp://127.0.0.1:{free_port()}"
        self.back = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "rolloutd.cli", "up", "--model", prepare("tiny"), "--workers", str(workers),
               "--front", self.front, "--back", self.back, "--heartbeat-s", str(HEARTBEAT_S),
               "--max-model-len", str(max_model_len), *extra]
        env = {**os.environ, "ROLLOUTD_LIVENESS": str(LIVENESS)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        with Client(self.front) as c:
            try:
                self.status = c.wait_for_workers(workers, timeout=300)
            except Exception:
                self.stop()
                raise AssertionError("daemon did not come up:\n" + self.tail())

    def tail(self, n=40) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def log_mark(self) -> int:
        self.log.flush()
        return os.path.getsize(self.log_path)

    def log_since(self, since: int) -> str:
        """The daemon's log after log_mark() `since`."""
        with open(self.log_path, errors="replace") as f:
            f.seek(since)
            return f.read()

    def stalls(self, since: int, who: str = "broker|worker") -> list[float]:
        """Seconds of each loop stall that `who` (a regex: broker, worker) logged after log_mark() `since`:
        a process of the daemon not running (the host took its virtual CPU away). The broker extends
        worker liveness by its own, so a worker's expiry comes that much later."""
        return [float(m) for m in re.findall(rf"(?:{who}) loop stalled ([0-9.]+) s", self.log_since(since))]

    def worker_expiries(self, since: int) -> list[str]:
        """The broker's log lines, after log_mark() `since`, of workers it expired for silence: a healthy
        worker frozen by the host for longer than the liveness is one, and comes back with READY."""
        return [line.strip() for line in self.log_since(since).splitlines() if "heartbeats; failing" in line]

    def worker_pids(self) -> list[int]:
        with Client(self.front) as c:
            return [w["pid"] for w in c.status(timeout=STATUS_S)["workers"]]

    def stop(self, timeout=90) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """Two workers."""
    d = Daemon(tmp_path_factory.mktemp("daemon") / "up.log")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def daemon1(tmp_path_factory):
    """One worker."""
    d = Daemon(tmp_path_factory.mktemp("daemon1") / "up.log", workers=1)
    yield d
    d.stop()


class FreezeWatch:
    """Measures how long this process was frozen (its virtual CPU taken away by the host: seen here for up
    to 14 s while a vLLM CPU engine decodes on a 2-core VM) during a timed block, so timing assertions can
    tell a slow rolloutd from a frozen machine. `frozen_s` is the longest oversleep of a 10 ms sleep,
    `total_s` the sum of the oversleeps over 50 ms (several freezes in one block)."""

    def __enter__(self):
        self.frozen_s, self.total_s, self._stop = 0.0, 0.0, threading.Event()

        def watch():
            while not self._stop.is_set():
                t = time.perf_counter()
                time.sleep(0.01)
                late = time.perf_counter() - t - 0.01
                self.frozen_s = max(self.frozen_s, late)
                if late > 0.05:
                    self.total_s += late

        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def race_attempts(attempt, daemon: "Daemon | None" = None, tries: int = 3, freeze_s: float = 0.5):
    """Run attempt() until it returns None (it won its race). What it returns otherwise says how it lost:
    a test that acts while requests run (abort one, pause) loses when the requests end first, and that
    happens when the host freezes the process that acts or carries the message while vLLM's engine
    process runs on (CI: an abort delayed past 30000 tokens). A lost attempt is retried only if a freeze
    of freeze_s or more was seen: this process's (FreezeWatch) or, given the daemon, the loop stalls its
    broker and workers logged. With none seen, the loss is a failure. Every attempt lost to a freeze: skip."""
    lost = []
    for _ in range(tries):
        mark = daemon.log_mark() if daemon else 0
        with FreezeWatch() as fw:
            why = attempt()
        if why is None:
            return
        frozen = max([fw.total_s, sum(daemon.stalls(mark)) if daemon else 0.0])
        if frozen < freeze_s:
            log = f"\ndaemon log meanwhile:\n{daemon.log_since(mark)[-4000:]}" if daemon else ""
            raise AssertionError(f"{why}, with no machine freeze seen{log}")
        lost.append((why, round(frozen, 2)))
    pytest.skip(f"the machine froze during every attempt (how it lost, frozen s) = {lost}: not measurable")


def timed_attempts(attempt, bound_s: float, tries: int = 3, daemon: "Daemon | None" = None):
    """race_attempts for timing: attempt() -> seconds, lost when not under bound_s; a freeze of half the
    bound spoils an attempt."""
    def timed():
        took = attempt()
        return None if took < bound_s else f"took {took:.3f} s (bound {bound_s} s)"
    race_attempts(timed, daemon, tries, freeze_s=bound_s / 2)


def inprocess_greedy(tmp_path, prompts, sampling, *engine_flags) -> list[list[int]]:
    """Sample 0's token ids for each prompt from the same engine without the daemon, one prompt at a time
    (a batch of one decodes bit-exactly the same way on both sides)."""
    import json

    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(prompts))
    out = subprocess.run([sys.executable, "-m", "rolloutd.inprocess", "--model", prepare("tiny"), "--prompts", str(f),
                          "--sampling", json.dumps(sampling), "--max-model-len", str(MODEL_LEN), "--sequential",
                          *engine_flags], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [samples[0] for samples in json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]]


def wait_until(pred, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()
