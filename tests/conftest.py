"""Shared helpers: a real daemon (`rolloutd up` with real vLLM workers on the tiny model) as a fixture."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rolloutd.client import Client
from rolloutd.models import prepare

HEARTBEAT_S = 1.0


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

    def __init__(self, log_path, workers=2, extra=("--drain-s", "2")):
        self.front = f"tcp://127.0.0.1:{free_port()}"
        self.back = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "rolloutd.cli", "up", "--model", prepare("tiny"), "--workers", str(workers),
               "--front", self.front, "--back", self.back, "--heartbeat-s", str(HEARTBEAT_S),
               "--max-model-len", "4096", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        with Client(self.front) as c:
            try:
                self.status = c.wait_for_workers(workers, timeout=300)
            except Exception:
                self.stop()
                raise AssertionError("daemon did not come up:\n" + self.tail())

    def tail(self, n=40) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def worker_pids(self) -> list[int]:
        with Client(self.front) as c:
            return [w["pid"] for w in c.status()["workers"]]

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


def wait_until(pred, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()
