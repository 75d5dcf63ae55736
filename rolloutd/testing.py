"""Parts of rolloutd run as real processes for tests and benchmarks (not used by the daemon itself).

    with BrokerProcess(extra=["--max-pending-bytes", str(64 << 20)]) as b:
        Client(b.front).status()
        b.rss()   # the broker process's resident memory, in bytes

Every address is bound on port 0 of 127.0.0.1 and read back from the broker's log, never guessed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

_ENDPOINTS = re.compile(r"broker: clients on (\S+), workers on (\S+)")


class BrokerProcess:
    """`rolloutd broker` in a subprocess of its own session, its log in a temporary file."""

    def __init__(self, extra: list[str] = (), front: str = "tcp://127.0.0.1:*", back: str = "tcp://127.0.0.1:*",
                 env: dict | None = None, preexec_fn=None, start_timeout_s: float = 60.0):
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="rolloutd-broker-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "rolloutd.cli", "broker", "--front", front, "--back", back, *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        deadline = time.monotonic() + start_timeout_s
        while True:
            m = _ENDPOINTS.search(self.log())
            if m:
                self.front, self.back = m.groups()
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the broker did not start (exit {self.proc.returncode}):\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_file.name, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident memory of the broker process now, in bytes (from /proc, no extra dependency)."""
        return self._status_kib("VmRSS") << 10

    def peak_rss(self) -> int:
        """The most resident memory the broker process has had so far, in bytes."""
        return self._status_kib("VmHWM") << 10

    def _status_kib(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log_file.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
