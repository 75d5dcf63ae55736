"""What the fuzz (perf/fuzz_broker.py) and the flood (perf/flood_broker.py) share: the broker under test, a
proper client's timed calls, reading what the broker sent a socket, and saving a run's result.

The broker under test is the rolloutd this process imports (rolloutd.testing starts it from that tree).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import zmq

from rolloutd import protocol as p
from rolloutd.client import Client
from rolloutd.errors import RolloutdError
from rolloutd.testing import SOURCE, BrokerProcess

from common import ROOT, maybe_plot, save

MiB = 1 << 20
ANSWER_S = 2.0  # a proper client's ping and status must be answered within this, all along


def start_broker(log_path: str, extra: list[str] = ()) -> BrokerProcess:
    """The broker under test, its log in log_path. --drain-s 0: at its stop, what it holds is aborted at
    once (no fake worker finishes it), so that it exits 0 well within the harness's stop timeout."""
    return BrokerProcess(extra=["--drain-s", "0", *extra], log_path=log_path)


def rss_or_0(broker: BrokerProcess, peak: bool = False) -> int:
    """The broker's RSS now (peak: the most it has had), 0 once it has exited (its checks report that)."""
    try:
        return broker.peak_rss() if peak else broker.rss()
    except ProcessLookupError:
        return 0


def checked_call(client: Client, what: str) -> tuple[bool, float, dict | str]:
    """(answered in time, seconds, the reply or what the client raised) for client.ping("broker") or
    client.status()."""
    t = time.perf_counter()
    try:
        reply = client.ping("broker", timeout=ANSWER_S) if what == "ping" else client.status(timeout=ANSWER_S)
        took = time.perf_counter() - t
        return took <= ANSWER_S, took, reply
    except RolloutdError as e:
        return False, time.perf_counter() - t, f"{type(e).__name__}: {e}"


def queued(sock: zmq.Socket, limit: int):
    """What the broker sent this socket and is queued now, up to `limit` messages: each decoded, its bulk
    frames unchecked (the harness reads headers only), or None where it does not decode."""
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = p.decode(frames, p.ANY, check_frames=False)
        except RolloutdError:
            msg = None
        yield msg


def rss_and_answers_figure(x: list, rss_mib: list, bound_mib: float, title: str, xlabel: str):
    """The two panels of both runs' figures: the broker's RSS against its bound (top), and the axes for a
    proper client's answer times, log scale, with the ANSWER_S line (bottom): (figure, top, bottom)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    a.plot(x, rss_mib, label="broker RSS")
    a.axhline(bound_mib, color="r", ls="--", label="bound")
    a.set_ylabel("MiB")
    a.set_title(title)
    b.axhline(ANSWER_S * 1e3, color="r", ls="--", label=f"{ANSWER_S:.0f} s")
    b.set_yscale("log")
    b.set_ylabel("client answer (ms)")
    b.set_xlabel(xlabel)
    return fig, a, b


def save_figure(fig, path: str) -> None:
    """A legend on each panel, and the PNG."""
    for ax in fig.axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def git_state() -> dict:
    """This checkout's HEAD and what is changed under rolloutd/ (the run's result records what it ran)."""
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"head": run("log", "-1", "--format=%h %s"), "changed": run("status", "--porcelain", "rolloutd").splitlines()}


def save_run(name: str, result: dict, logs: str, summary: dict, plot) -> None:
    """Save a run as perf/results/NAME-cpu.json with its plot beside it, and print `summary` (save() would
    print it all: the timelines would bury the figures)."""
    # These broker-only runs are on CPU wherever they run: name the result as the other cpu ones are.
    os.environ.setdefault("BENCH_TAG", "cpu")
    command = f"python perf/{os.path.basename(sys.argv[0])} " + " ".join(sys.argv[1:])
    result.update(git=git_state(), broker_source=SOURCE, logs=logs)
    with contextlib.redirect_stdout(io.StringIO()):
        saved = save(name, result, command)
    print(json.dumps(summary, indent=1, default=str))
    print("wrote", saved["_path"])
    maybe_plot(plot, saved)
