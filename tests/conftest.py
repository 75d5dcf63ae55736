"""Shared helpers: a real daemon (`rolloutd up` with real vLLM workers on the tiny model) as a fixture."""
import os
import subprocess
import sys
import time

import pytest

from rolloutd import testing
from rolloutd.client import Client
from rolloutd.models import prepare

from .host_freeze import HostFreezeWatch

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


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Daemon(testing.Daemon):
    """`rolloutd up` on the tiny model with the tests' policy (HEARTBEAT_S, LIVENESS, MODEL_LEN), its log
    in `log_path`."""

    def __init__(self, log_path, workers=2, extra=("--drain-s", "2"), max_model_len=MODEL_LEN):
        super().__init__(prepare("tiny"), workers=workers, log_path=log_path,
                         extra=("--heartbeat-s", str(HEARTBEAT_S), "--max-model-len", str(max_model_len), *extra),
                         env={"ROLLOUTD_LIVENESS": str(LIVENESS)}, ready_timeout_s=300, stop_timeout_s=90)

    def worker_pids(self) -> list[int]:
        with Client(self.front) as c:
            return [w["pid"] for w in c.status(timeout=STATUS_S)["workers"]]


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


def race_attempts(attempt, daemon: "Daemon | None" = None, tries: int = 3, freeze_s: float = 0.5):
    """Run attempt() until it returns None (it won its race). What it returns otherwise says how it lost:
    a test that acts while requests run (abort one, pause) loses when the requests end first, and that
    happens when the host freezes the process that acts or carries the message while vLLM's engine
    process runs on (CI: an abort delayed past 30000 tokens). A lost attempt is retried only if the host
    was seen freezing this machine's CPUs for freeze_s or more meanwhile (HostFreezeWatch: evidence from
    outside rolloutd, whose own processes would report a loop that blocks itself as a stall just the same).
    With none seen, the loss is a failure, with the daemon's log meanwhile. Every attempt lost to a freeze:
    skip."""
    lost = []
    for _ in range(tries):
        mark = daemon.log_mark() if daemon else 0
        with HostFreezeWatch() as host:
            why = attempt()
        if why is None:
            return
        if host.evidence_s < freeze_s:
            log = f"\ndaemon log meanwhile:\n{daemon.log_since(mark)[-4000:]}" if daemon else ""
            raise AssertionError(f"{why}, with no host freeze of {freeze_s} s seen ({host}){log}")
        lost.append((why, round(host.evidence_s, 2)))
    pytest.skip(f"the host froze this machine during every attempt (how it lost, frozen s) = {lost}: "
                "not measurable")


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
