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

# The folder holding this rolloutd package. The broker starts there (`python -m` puts its working folder
# first on the path): it runs the same rolloutd as the process that started it, even where PYTHONPATH or an
# installed copy would give a bare `python -m rolloutd.cli` another.
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENDPOINTS = re.compile(r"broker: clients on (\S+), workers on (\S+)")
# A line of the broker's log starts with its date; what follows an "internal:" line up to the next one is
# that failure's traceback.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d ", re.M)


class BrokerProcess:
    """`rolloutd broker` in a subprocess of its own session, its log in `log_path` (else a temporary file).

    Its log level is INFO whatever ROLLOUTD_LOG_LEVEL says: the endpoints are read from an INFO line."""

    def __init__(self, extra: list[str] = (), front: str = "tcp://127.0.0.1:*", back: str = "tcp://127.0.0.1:*",
                 env: dict | None = None, preexec_fn=None, start_timeout_s: float = 60.0,
                 log_path: str | None = None):
        if log_path is None:
            self.log_file = tempfile.NamedTemporaryFile("w+", prefix="rolloutd-broker-", suffix=".log", delete=False)
        else:
            self.log_file = open(log_path, "w+")
        self.log_path = self.log_file.name
        self.cmd = [sys.executable, "-m", "rolloutd.cli", "--log-level", "INFO", "broker", "--front", front,
                    "--back", back, *extra]
        # Its log goes to a file, not a pipe: a pipe nobody reads would fill and stop the broker.
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=SOURCE,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        deadline = time.monotonic() + start_timeout_s
        while True:
            m = _ENDPOINTS.search(self.log())
            if m:
                self.front, self.back = m.groups()
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the broker did not start (exit {self.proc.returncode}): {' '.join(self.cmd)}\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def tail(self, n: int = 1 << 16) -> str:
        """The last `n` bytes of the log (a fuzzed broker's log can run to many MiB)."""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - n))
            return f.read().decode(errors="replace")

    def traceback(self) -> str:
        """The last traceback in the log ('' if none: killed by a signal, or hung). One through msgpack's
        packer nesting runs to hundreds of KB."""
        t = self.tail(64 << 20)
        i = t.rfind("Traceback (most recent call last)")
        return t[i:].strip() if i >= 0 else ""

    def internal_faults(self, limit: int = 10) -> list[str]:
        """The broker's own failures that it logged as "internal:" and survived (its guard kept the loop
        going): each line with its traceback, at most 3000 characters each, the first `limit` of them."""
        with open(self.log_path, "rb") as f:
            text = f.read(64 << 20).decode(errors="replace")
        out = []
        for m in re.finditer(r"^.* internal: .*$", text, re.M):
            end = _LOG_LINE.search(text, m.end() + 1)
            out.append(text[m.start():end.start() if end else m.end() + 1 + 3000].strip()[:3000])
            if len(out) >= limit:
                break
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident memory of the broker process now, in bytes (from /proc, no extra dependency).
        ProcessLookupError once it has exited."""
        return self._status_kib("VmRSS") << 10

    def peak_rss(self) -> int:
        """The most resident memory the broker process has had so far, in bytes. ProcessLookupError once it
        has exited."""
        return self._status_kib("VmHWM") << 10

    def num_fds(self) -> int:
        """File descriptors the broker process holds open now: a zmq connection takes one."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def _status_kib(self, field: str) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except FileNotFoundError:  # exited and reaped
            pass
        # exited and not yet reaped: a zombie's status has no memory fields
        raise ProcessLookupError(f"broker process {self.proc.pid} has exited")

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
