"""Parts of rolloutd run as real processes for tests and benchmarks (not used by the daemon itself).

    with BrokerProcess(extra=["--max-pending-bytes", str(64 << 20)]) as b:
        Client(b.front).status()
        b.rss()   # the broker process's resident memory, in bytes

    with Daemon("tiny", workers=1, env={"ROLLOUTD_LIVENESS": "30"}) as d:
        Client(d.front).generate([[1, 2, 3]], max_tokens=8)

No address is guessed: a broker binds port 0 of 127.0.0.1 and its endpoints are read back from its log;
`rolloutd up`, whose workers and readiness check must know the addresses before its broker starts, gets
ipc:// addresses in a fresh temporary folder, unique by construction.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# The folder holding this rolloutd package. The processes start there (`python -m` puts its working folder
# first on the path): they run the same rolloutd as the process that started them, even where PYTHONPATH or
# an installed copy would give a bare `python -m rolloutd.cli` another.
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENDPOINTS = re.compile(r"broker: clients on (\S+), workers on (\S+)")
# What `rolloutd up` prints on stdout once every worker has registered (launcher.Launcher._wait_ready).
_READY = re.compile(r"^rolloutd: ready: (\d+) worker\(s\) behind ", re.M)
# A line of the broker's log starts with its date; what follows an "internal:" line up to the next one is
# that failure's traceback.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d ", re.M)


@contextlib.contextmanager
def nothing_listens():
    """A tcp:// address on 127.0.0.1 where nothing listens, for as long as the block runs: a port this process
    holds bound but never listening on. A connection there is refused at once, and no other process can take
    the port meanwhile (a port found free and let go could be taken by the time it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


class _Process:
    """A `rolloutd` command in a subprocess of its own session, its output in a log file; stopped with
    SIGTERM, then SIGKILL to its process group past `stop_timeout_s`."""

    def __init__(self, args: list[str], log_path, env: dict | None, preexec_fn, stop_timeout_s: float):
        self.log_file = open(log_path, "w+")
        self.log_path = self.log_file.name
        self.stop_timeout_s = stop_timeout_s
        self.cmd = [sys.executable, "-m", "rolloutd.cli", *args]
        # Its log goes to a file, not a pipe: a pipe nobody reads would fill and stop the process.
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=SOURCE,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)

    def _wait_for(self, pattern: re.Pattern, timeout_s: float, what: str, every_s: float) -> re.Match:
        """The first match of pattern in the log, waiting for it at most timeout_s; stopped, RuntimeError
        with the log's tail, if the process exits or the time runs out first. Reads only what is new."""
        deadline = time.monotonic() + timeout_s
        searched = 0  # the log up to here is whole lines without a match
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(searched)
                new = f.read()
            m = pattern.search(new.decode(errors="replace"))
            if m:
                return m
            searched += new.rfind(b"\n") + 1
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} (exit {self.proc.returncode}, log {self.log_path}): {' '.join(self.cmd)}"
                                   f"\n{self.tail()}")
            time.sleep(every_s)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_mark(self) -> int:
        """Where the log ends now: log_since() of it is what comes after."""
        return os.path.getsize(self.log_path)

    def log_since(self, since: int) -> str:
        """The log after log_mark() `since`."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def tail(self, lines: int = 40, max_bytes: int = 1 << 20) -> str:
        """The last `lines` lines of the log, from its last `max_bytes` at most (a log can run to many MiB)."""
        return "".join(self.log_since(max(0, self.log_mark() - max_bytes)).splitlines(True)[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL to the process group past `timeout` (else stop_timeout_s); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log_file.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class BrokerProcess(_Process):
    """`rolloutd broker` in a subprocess of its own session, its log in `log_path` (else a temporary file).

    Its log level is INFO whatever ROLLOUTD_LOG_LEVEL says: the endpoints are read from an INFO line."""

    def __init__(self, extra: list[str] = (), front: str = "tcp://127.0.0.1:*", back: str = "tcp://127.0.0.1:*",
                 env: dict | None = None, preexec_fn=None, start_timeout_s: float = 60.0,
                 log_path: str | None = None):
        if log_path is None:
            with tempfile.NamedTemporaryFile(prefix="rolloutd-broker-", suffix=".log", delete=False) as f:
                log_path = f.name
        super().__init__(["--log-level", "INFO", "broker", "--front", front, "--back", back, *extra], log_path, env,
                         preexec_fn, stop_timeout_s=30.0)
        m = self._wait_for(_ENDPOINTS, start_timeout_s, "the broker did not start", every_s=0.05)
        self.front, self.back = m.groups()

    def traceback(self) -> str:
        """The last traceback in the log ('' if none: killed by a signal, or hung). One through msgpack's
        packer nesting runs to hundreds of KB."""
        t = self.log_since(max(0, self.log_mark() - (64 << 20)))
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


class Daemon(_Process):
    """`rolloutd up` (a broker and `workers` vLLM workers on `model`, a built-in name or a folder) in a
    subprocess of its own session, ready once it says every worker has registered.

    Its addresses are ipc:// sockets in a fresh temporary folder (front, back), removed at stop(); its log
    (the launcher's, the broker's and the workers' output) goes to `log_path`, else to up.log in that folder,
    which is then kept. `extra` goes after the addresses on `up`'s command line, `env` over this process's
    environment (e.g. ROLLOUTD_LIVENESS), `log_level` before `up` where given. RuntimeError with the log's
    tail if it exits, or is not ready within ready_timeout_s."""

    def __init__(self, model: str, workers: int = 1, extra=(), env: dict | None = None, log_path=None,
                 log_level: str | None = None, ready_timeout_s: float = 600.0, stop_timeout_s: float = 120.0):
        self.folder = tempfile.mkdtemp(prefix="rolloutd-up-")
        self.front, self.back = f"ipc://{self.folder}/front", f"ipc://{self.folder}/back"
        level = ["--log-level", log_level] if log_level else []
        super().__init__([*level, "up", "--model", model, "--workers", str(workers), "--front", self.front,
                          "--back", self.back, *extra], log_path or os.path.join(self.folder, "up.log"), env, None,
                         stop_timeout_s)
        m = self._wait_for(_READY, ready_timeout_s, "rolloutd up did not come up", every_s=0.2)
        self.workers = int(m.group(1))  # `--workers 0` starts one per GPU

    def worker_expiries(self, since: int) -> list[str]:
        """The broker's log lines, after log_mark() `since`, of workers it expired for silence: a healthy
        worker frozen by the host for longer than the liveness is one, and comes back with READY."""
        return [line.strip() for line in self.log_since(since).splitlines() if "heartbeats; failing" in line]

    def stop(self, timeout: float | None = None) -> int | None:
        rc = super().stop(timeout)
        for name in ("front", "back"):  # a killed broker leaves its sockets behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.folder, name))
        if os.path.dirname(os.path.abspath(self.log_path)) != self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        return rc
