"""Fuzz the broker (issue 7): whatever arrives on either socket, the broker process stays up, answers a
proper client within 2 s, and keeps its memory within a stated bound.

    python perf/fuzz_broker.py --messages 100000     # -> perf/results/fuzz-cpu.json + .png

tests/test_fuzz.py runs the same code with CI-sized counts (it imports this file). The messages come from
perf/fuzz_messages.py (Fuzzer); the flood of generates is perf/flood_broker.py.

The fake peers (Peers) are one DEALER per identity: 6 clients on the front; on the back, 4 workers that
register with a valid READY and 2 strangers that never do. The fake workers take what the broker assigns
them and answer it (or a mutation of an answer), so the request table, placement, pending queue and control
replies are exercised, not only the decoder.
Every CHECK_EVERY messages: the broker process is alive, rolloutd.Client answers ping("broker") and
status() within ANSWER_S, RSS is read (now, and the peak so far, which no sampling can miss), and a barrier
(a ping on every fuzz client socket, FIFO behind what it sent) proves the broker read everything so far:
the fuzz cannot run ahead of a stuck broker.
A failed check is a crash (dead: its traceback is read from its log) or a broker alive and not answering;
either way the messages since the last good check are replayed against fresh brokers and cut down (ddmin)
to the few that fail it the same way, and the run goes on with a new broker (the CI test stops at the
first). The broker's own bugs that its guard survives are counted in its status()["faults"]["internal"]
and collected from its log: findings too.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import re
import subprocess
import time

import zmq

from rolloutd import protocol as p
from rolloutd.client import Client
from rolloutd.testing import BrokerProcess

from broker_harness import (ANSWER_S, MiB, checked_call, queued, rss_and_answers_figure, rss_or_0, save_figure,
                            save_run, start_broker)
from common import percentiles
from fuzz_messages import CLIENTS, KINDS, STRANGERS, WORKERS, Case, Fuzzer, describe

C = p.Cmd
CHECK_EVERY = 250  # fuzz messages between checks
DRAIN_EVERY = 50  # fuzz messages between reads of what the broker sent the fake peers
BARRIER_S = 10.0  # a barrier waits this long for the broker to catch up before it calls it stuck
# A broker that died may take this long to exit: it closes its sockets with a 10 s linger.
_EXIT_WAIT_S = 12.0
# The fuzz broker's RSS may grow by this over its start: the largest message of the fuzz that its sockets
# take (two 64 MiB frames on the back; the front refuses frames over 4 MiB), one more such arriving while
# it is read, and 128 MiB for what the pending queue holds (a few 4 MiB prompts) and the allocator keeps.
FUZZ_RSS_GROWTH = 384 * MiB


# ------------------------------------------------------------------------------------------- the fake peers

class Peers:
    """The fuzz's sockets, one DEALER per identity, each with its identity set (a replay reuses it)."""

    def __init__(self, broker: BrokerProcess):
        self.ctx = zmq.Context()
        self.socks = {}
        for side, idents, addr in (("front", CLIENTS, broker.front), ("back", WORKERS + STRANGERS, broker.back)):
            for ident in idents:
                s = self.ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, ident)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(addr)
                self.socks[side, ident] = s
        self.received = collections.Counter()  # (side, what) -> count
        self.barriers: set[str] = set()  # barrier cids not answered yet
        self.unsent = 0

    def send(self, case: Case) -> bool:
        """Send without blocking for long: a broker that stopped reading must not stop the fuzz."""
        s = self.socks[case.side, case.ident]
        deadline = time.monotonic() + ANSWER_S
        while True:
            try:
                s.send_multipart(case.frames, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if time.monotonic() > deadline:
                    self.unsent += 1
                    return False
                s.poll(50, zmq.POLLOUT)

    def drain(self, fz: Fuzzer | None, limit: int = 2000) -> None:
        """Read what the broker sent every fake peer (bounded), tell the fuzzer, count it."""
        for (side, ident), s in self.socks.items():
            for msg in queued(s, limit):
                if msg is None:
                    self.received[side, "undecodable"] += 1
                    continue
                what = msg.CMD.name + (f":{msg.code}" if msg.CMD is C.ERROR else "")
                self.received[side, what] += 1
                if getattr(msg, "cid", None) in self.barriers:
                    self.barriers.discard(msg.cid)
                if fz is not None:
                    fz.observe(side, ident, msg)

    def barrier(self, n: int, idents: list = CLIENTS, timeout: float = BARRIER_S) -> bool:
        """A ping to the broker on these fuzz client sockets; True once all are answered. Each comes after
        everything that socket sent: the broker has read all of it."""
        for ident in idents:
            cid = f"barrier-{n}-{ident.decode()}"
            self.barriers.add(cid)
            self.send(Case("front", ident, "barrier", "PING", p.encode(p.Ping(cid=cid, target="broker"))))
        deadline = time.monotonic() + timeout
        while self.barriers and time.monotonic() < deadline:
            self.drain(None)
            if self.barriers:
                time.sleep(0.002)
        ok = not self.barriers
        self.barriers.clear()
        return ok

    def close(self) -> None:
        self.ctx.destroy(linger=0)


# -------------------------------------------------------------------------------- failures, and their input

def signature(tb: str) -> str:
    """A crash's kind: the exception's type and the innermost place in rolloutd it came from (its text can
    differ for one bug: "'<' not supported between 'str' and 'bytes'", or 'bytes' and 'str')."""
    if not tb:
        return "no traceback (killed, or hung)"
    lines = [l.strip() for l in tb.splitlines() if l.strip()]
    files = [l for l in lines if l.startswith("File ")]
    # Python prints a traceback's innermost 1000 frames: one through msgpack's packer may show no rolloutd
    where = [l for l in files if "rolloutd" in l] or files or ["?"]
    exc = next((l for l in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", l)), lines[-1])
    return f"{exc.split(':')[0]} at {where[-1]}"


def answer_problem(what: str, ok: bool, took: float, reply) -> str | None:
    """How a proper client's call went wrong, in words that do not change between runs (None: it did not)."""
    if ok:
        return None
    got = re.sub(r"tcp://\S+", "tcp://...", reply) if isinstance(reply, str) else f"answered after over {ANSWER_S:g} s"
    return f"{what} not answered ({got})"


def probe(broker: BrokerProcess, client: Client) -> str | None:
    """What is wrong with the broker now: dead, or a proper client's ping or status not answered in time."""
    if not broker.alive():
        return "dead"
    for what in ("ping", "status"):
        problem = answer_problem(what, *checked_call(client, what))
        if problem:
            return problem
    return None


def failure(broker: BrokerProcess, problem: str) -> str:
    """A failure's signature, the same for the same bug in another run: a dead broker's exception and where
    it came from, or what a proper client got instead of an answer. A broker that stopped answering may be
    on its way out (it flushes its sockets at exit): it gets the time to."""
    if broker.alive() and not re.search(r"InternalError|BadRequest|ProtocolError|Busy", problem):
        try:
            broker.proc.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
    return signature(broker.traceback()) if not broker.alive() else f"alive, {problem}"


def replay(cases: list, log_path: str, want: str | None = None) -> tuple[bool, int | None, str]:
    """Send cases in order to a fresh broker, each followed by a proper client's ping and status (so the next
    one arrives after it was read); (failed with signature `want` (any failure if None), index of the
    message after which it failed, signature)."""
    b = start_broker(log_path)
    peers = Peers(b)
    client = Client(b.front, timeout=ANSWER_S)
    at, sig = None, ""
    try:
        for i, case in enumerate(cases):
            peers.send(case)
            # Read before the probe: a ping behind it on its own connection (FIFO) for a client's message;
            # a worker's gets a moment (the probe travels on the other socket).
            if case.side == "front":
                peers.barrier(i, [case.ident], ANSWER_S)
            else:
                time.sleep(0.005)
            problem = probe(b, client)
            if problem is None and i == len(cases) - 1:
                time.sleep(0.3)  # what the last message started (a pending request placed) may fail it late
                problem = probe(b, client)
            peers.drain(None)
            if problem:
                at, sig = i, failure(b, problem)
                break
    finally:
        client.close()
        peers.close()
        b.stop(5)
    return at is not None and (want is None or sig == want), at, sig


def isolate(cases: list, log_dir: str, want: str, budget_s: float = 120.0) -> dict:
    """The fewest of `cases`, in their order, that still fail a fresh broker the same way (ddmin, bounded
    in time: "minimal" says whether it got to the end)."""
    log = os.path.join(log_dir, "replay.log")
    ok, at, sig = replay(cases, log, want)
    if not ok:
        return {"reproduced": False, "replayed": len(cases), "replay_signature": sig}
    deadline, tries = time.monotonic() + budget_s, 1

    def fails(subset):
        nonlocal tries
        tries += 1
        return replay(subset, log, want)[0]

    items = cases[:at + 1]
    if fails(items[-1:]):  # most often the one message alone
        items = items[-1:]
    n = 2
    while len(items) >= 2 and time.monotonic() < deadline:
        chunk = math.ceil(len(items) / n)
        parts = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        for part in parts:
            if fails(part):
                items, n = part, 2
                break
        else:
            for part in parts:
                rest = [c for c in items if not any(c is x for x in part)]
                if fails(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return {"reproduced": True, "minimal": time.monotonic() < deadline, "replays": tries,
            "inputs": [describe(c) for c in items]}


def run_fuzz(messages: int, seed: int, log_dir: str, *, kinds: dict | None = None, stop_on_crash: bool = False,
             isolate_crashes: bool = True, max_crashes: int = 50, kill_at: int | None = None,
             time_limit_s: float = 3600.0, progress: bool = False) -> dict:
    """Fuzz a broker subprocess with `messages` messages; returns the figures main() saves.

    kill_at: SIGKILL the broker after that many messages (the harness's own test: it must see the crash)."""
    os.makedirs(log_dir, exist_ok=True)
    fz = Fuzzer(seed, kinds)
    sent = {"front": collections.Counter(), "back": collections.Counter()}
    by_cmd, received = collections.Counter(), collections.Counter()
    crashes, timeline, lat = [], [], {"ping": [], "status": []}
    answers = {"ok": 0, "total": 0}
    seen_sigs: set[str] = set()
    faults = collections.Counter()  # status()["faults"], summed over the run's brokers
    internal = []  # failures of the broker's own code that its guard caught, from its logs
    run = {"starts": 0, "barriers_ok": 0, "unsent": 0, "last_status": {}, "rss_peak": 0}
    t0 = time.monotonic()
    ring: collections.deque = collections.deque(maxlen=2 * CHECK_EVERY)  # reaches back past the last check

    def start():
        run["starts"] += 1
        b = start_broker(os.path.join(log_dir, f"broker-{run['starts']}.log"))
        return b, Peers(b), Client(b.front, timeout=ANSWER_S)

    def close(broker, peers, client):
        ok, _, st = checked_call(client, "status") if broker.alive() else (False, 0, None)
        faults.update((st if ok else run["last_status"]).get("faults", {}))
        run["last_status"] = {}
        run["rss_peak"] = max(run["rss_peak"], rss_or_0(broker, peak=True))
        client.close()
        peers.drain(fz)
        received.update(peers.received)
        run["unsent"] += peers.unsent
        peers.close()
        code = broker.stop(5)
        what = lambda fault: fault.split(" internal: ")[-1].splitlines()[0]
        seen = {what(x) for x in internal}
        for x in broker.internal_faults():  # one of each kind
            if what(x) not in seen:
                internal.append(x)
                seen.add(what(x))
        return code

    def check(i, broker, peers, client) -> str | None:
        """What is wrong with the broker now (None: nothing): dead, not answering a proper client in time,
        or not reading the fuzz sockets. Records answer times and RSS."""
        if not broker.alive():
            return "dead"
        problem = None
        for what in ("ping", "status"):
            ok, took, reply = checked_call(client, what)
            answers["total"] += 1
            answers["ok"] += ok
            lat[what].append(took)
            if what == "status" and ok:
                run["last_status"] = reply
            problem = problem or answer_problem(what, ok, took, reply)
        if not problem and not peers.barrier(i):
            problem = f"the fuzz sockets' pings not all answered within {BARRIER_S} s"
        run["barriers_ok"] += problem is None
        alive = broker.alive()
        rss = rss_or_0(broker) if alive else 0
        run["rss_peak"] = max(run["rss_peak"], rss_or_0(broker, peak=True) if alive else 0)
        timeline.append([i, round(rss / MiB, 1), round(lat["ping"][-1] * 1e3, 2), round(lat["status"][-1] * 1e3, 2)])
        return problem if alive else "dead"

    broker, peers, client = start()
    rss_before = broker.rss()
    i, exit_code = 0, None
    try:
        while i < messages and time.monotonic() - t0 < time_limit_s:
            case = fz.next()
            peers.send(case)
            ring.append(case)
            sent[case.side][case.kind] += 1
            by_cmd[f"{case.side}:{case.cmd}"] += 1
            i += 1
            if kill_at is not None and i == kill_at:
                broker.proc.kill()
                broker.proc.wait(5)
            if i % DRAIN_EVERY == 0:
                peers.drain(fz)
            # checked every CHECK_EVERY messages, at the end, and at once when the process is seen gone
            if i % CHECK_EVERY and i != messages and (i % DRAIN_EVERY or broker.alive()):
                continue
            problem = check(i, broker, peers, client)
            if progress and i % (20 * CHECK_EVERY) == 0:
                print(f"{i} messages, {time.monotonic() - t0:.0f} s, rss {timeline[-1][1]} MiB, crashes {len(crashes)}",
                      flush=True)
            if problem is None:
                continue
            # --- a failure: dead, or alive and not answering (restarted all the same: it may stay so)
            sig = failure(broker, problem)
            alive = broker.alive()
            tb = "" if alive else broker.traceback()
            crash = {"at_message": i, "exit_code": broker.proc.returncode, "signature": sig,
                     "exception": tb.strip().splitlines()[-1] if tb else "",
                     "traceback": tb if len(tb) < 4000 else f"{tb[:2500]}\n...\n{tb[-1500:]}", "log": broker.log_path}
            close(broker, peers, client)
            if isolate_crashes and sig not in seen_sigs and kill_at is None:
                crash["isolated"] = isolate(list(ring), log_dir, sig)
            seen_sigs.add(sig)
            crashes.append(crash)
            if progress:
                print(f"CRASH at message {i}: {sig}", flush=True)
            broker = None
            if stop_on_crash or len(crashes) >= max_crashes:
                break
            fz.reset()
            ring.clear()
            broker, peers, client = start()
    finally:
        rss_after = 0
        if broker is not None:
            peers.drain(fz)
            rss_after = rss_or_0(broker)
            exit_code = close(broker, peers, client)
    by_side = {"front": {}, "back": {}}
    for (side, what), n in sorted(received.items()):
        by_side[side][what] = n
    pct = lambda xs: {k: (round(v * 1e3, 3) if k != "n" else v) for k, v in percentiles(xs).items()} if xs else {}
    return {
        "messages": i, "seed": seed, "wall_s": round(time.monotonic() - t0, 1),
        "sent": {side: dict(sorted(c.items())) for side, c in sent.items()},
        "sent_total": {side: sum(c.values()) for side, c in sent.items()},
        "sent_by_command": dict(sorted(by_cmd.items())), "unsent": run["unsent"],
        "received": by_side, "barriers_ok": run["barriers_ok"],
        "crashes": crashes, "broker_starts": run["starts"], "last_exit_code": exit_code,
        "rss_mib": {"before": round(rss_before / MiB, 1), "after": round(rss_after / MiB, 1),
                    "peak": round(run["rss_peak"] / MiB, 1), "bound": round((rss_before + FUZZ_RSS_GROWTH) / MiB, 1)},
        "answers": answers, "latency_ms": {"ping": pct(lat["ping"]), "status": pct(lat["status"]),
                                           "all": pct(lat["ping"] + lat["status"])},
        "faults": dict(sorted(faults.items())), "internal_faults": internal[:20],
        "timeline": timeline,
    }


# ----------------------------------------------------------------------------------------------- the figure

def plot(result: dict, path: str) -> None:
    """RSS against its bound, and a proper client's answer times, at each check; failed checks in red."""
    tl = result["timeline"]
    x = [r[0] for r in tl]
    title = (f"fuzz: {result['messages']:,} messages, {len(result['crashes'])} failed check(s) (red), "
             f"{result['faults'].get('internal', 0)} internal fault(s)")
    fig, a, b = rss_and_answers_figure(x, [r[1] for r in tl], result["rss_mib"]["bound"], title, "messages sent")
    b.plot(x, [r[2] for r in tl], ".", ms=3, label="ping")
    b.plot(x, [r[3] for r in tl], ".", ms=3, label="status")
    for c in result["crashes"]:
        for ax in (a, b):
            ax.axvline(c["at_message"], color="r", alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--without", nargs="*", default=[], choices=list(KINDS),
                    help="leave these kinds out (to look past a crash that every run hits first)")
    ap.add_argument("--stop-on-crash", action="store_true")
    ap.add_argument("--logs", default=os.path.join("/tmp", f"fuzz-broker-{os.getpid()}"))
    a = ap.parse_args()
    kinds = {k: w for k, w in KINDS.items() if k not in a.without}
    r = run_fuzz(a.messages, a.seed, a.logs, kinds=kinds, stop_on_crash=a.stop_on_crash, progress=True)
    r["kinds"] = kinds
    keys = ("messages", "wall_s", "sent_total", "broker_starts", "faults", "rss_mib", "answers", "latency_ms")
    summary = {k: r.get(k) for k in keys}
    summary["crashes"] = [f"{c['at_message']}: {c['signature']}" for c in r["crashes"]]
    save_run("fuzz", r, a.logs, summary, plot)


if __name__ == "__main__":
    main()
