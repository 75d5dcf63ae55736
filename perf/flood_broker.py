"""Flood the broker (issue 7): 10,000 connections send 70,000 generates, 300 of them 1M-token (4 MiB)
prompts, to a broker with no worker; it answers each, holds within its budgets, keeps its memory within a
stated bound, and answers a proper client within 2 s.

    python perf/flood_broker.py                      # -> perf/results/flood-cpu.json + .png

tests/test_fuzz.py runs the same code (it imports this file). The fuzz is perf/fuzz_broker.py.

FloodPlan: 10,000 DEALER connections, held by child processes (one process cannot hold 10,000 zmq sockets
under a 20,000 file limit: each takes a TCP and a mailbox descriptor), send 70,000 token-id generates, 300
of them 1M-token (4 MiB) prompts, to a broker with no worker and small budgets (--max-pending,
--max-pending-bytes, --max-client-bytes). Every request must be answered: busy at once, or held; an
abort-all then ends each held one with an aborted result, which tells exactly what was held (count, bytes,
bytes per client) to check against the budgets. The broker's RSS must stay under its baseline with the
connections made + the byte budget + flood_slack() once settled, and + in_transit() at the peak.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import multiprocessing as mp
import os
import random
import resource
import threading
import time
from dataclasses import dataclass

import zmq

from rolloutd import protocol as p
from rolloutd.client import Client
from rolloutd.errors import RolloutdError
from rolloutd.testing import BrokerProcess

from broker_harness import (ANSWER_S, MiB, checked_call, queued, rss_and_answers_figure, rss_or_0, save_figure,
                            save_run, start_broker)
from common import percentiles

C = p.Cmd


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children and the broker inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class RssSampler:
    """The broker's RSS every `every` s in a thread: the flood's timeline."""

    def __init__(self, broker: BrokerProcess, every: float = 0.02):
        self.broker, self.every = broker, every
        self.peak, self.samples, self._stop = 0, [], threading.Event()
        self.t0 = time.monotonic()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                rss = self.broker.rss()
            except ProcessLookupError:  # gone: the checks report it
                continue
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic() - self.t0, rss))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


# ------------------------------------------------------------------------------------------------- the plan

@dataclass
class FloodPlan:
    clients: int = 10_000
    requests: int = 70_000
    # 1M-token prompts (4 MiB each). 300 are 1.2 GiB offered, 19x the pending budget below: the byte budget
    # must refuse most of them, and the flood still takes seconds here (all 70,000 that size: 280 GiB).
    big: int = 300
    # Clients that send 5 big prompts each, first and back to back, while the budgets are still empty: 8 x 6 MiB
    # fits the overall budget, so only the per-client one stops each from holding 20 MiB.
    greedy: int = 8
    small_max_tokens: int = 512
    max_pending: int = 20_000
    max_pending_bytes: int = 64 * MiB
    max_client_bytes: int = 6 * MiB
    seed: int = 7

    def budget_args(self) -> list[str]:
        args = []
        for flag, v in (("--max-pending", self.max_pending), ("--max-pending-bytes", self.max_pending_bytes),
                        ("--max-client-bytes", self.max_client_bytes)):
            if v:  # 0: leave the broker's default (to run against a broker without that budget)
                args += [flag, str(v)]
        return args

    def prompts(self) -> list[list[int]]:
        """Token counts per client: requests spread evenly, `big` of them 1M tokens, 5 on each greedy client
        and one on each of as many others."""
        r = random.Random(self.seed)
        per = [[r.randint(1, self.small_max_tokens) for _ in range(self.requests // self.clients
                                                                    + (c < self.requests % self.clients))]
               for c in range(self.clients)]
        bigs = self.big
        greedy = r.sample(range(self.clients), min(self.greedy, self.clients))
        for c in greedy:
            for k in range(min(5, len(per[c]), bigs)):
                per[c][k], bigs = p.MAX_PROMPT_TOKENS, bigs - 1
        spread = [c for c in range(self.clients) if c not in set(greedy)]
        for c in r.sample(spread, bigs):
            per[c][r.randrange(len(per[c]))] = p.MAX_PROMPT_TOKENS
        return per


# -------------------------------------------------------------------------------------------------- the run

def _flood_child(k: int, front: str, plan: list[list[int]], first_client: int, counters, go, done, out) -> None:
    """One process holding len(plan) client connections: send every request, the greedy clients' (several
    big prompts) first and back to back, the rest round-robin over clients (the big prompts come spread over
    the run), then count answers until told to stop."""
    raise_nofile()
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, len(plan) + 64)
    socks = []
    for _ in plan:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(front)
        socks.append(s)
    ids = memoryview(bytes(4 * max(p.MAX_PROMPT_TOKENS, 1)))
    meta = {}  # rid -> (client index, prompt bytes)
    answers: dict[str, str] = {}
    codes, dups, odd = collections.Counter(), 0, collections.Counter()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    out.put(("ready", k))
    if not go.wait(300):
        out.put(("final", k, {"error": "never told to go"}))
        return

    def receive(timeout_ms: int) -> None:
        nonlocal dups
        for s, _ in poller.poll(timeout_ms):
            for msg in queued(s, 64):
                if msg is None:
                    odd["undecodable"] += 1
                    continue
                if msg.CMD is C.ERROR:
                    got = [(msg.rid, f"error:{msg.code}")]
                elif msg.CMD is C.FINISHED:
                    got = [(rid, "result:" + ",".join(sorted({s.get("finish_reason", "?") for s in samples})))
                           for rid, (samples, _) in zip(msg.rids, msg.items())]
                else:
                    odd[msg.CMD.name] += 1
                    continue
                for rid, what in got:
                    if rid in answers:
                        dups += 1
                    answers[rid] = what
                    codes[what] += 1
                    counters[k * 3 + 1] += 1
                    if what == "error:busy":
                        counters[k * 3 + 2] += 1

    greedy = [c for c, sizes in enumerate(plan) if sizes.count(p.MAX_PROMPT_TOKENS) > 1]
    order = [(c, slot) for c in greedy for slot in range(len(plan[c]))]
    order += [(c, slot) for slot in range(max(len(x) for x in plan)) for c in range(len(plan))
              if c not in set(greedy) and slot < len(plan[c])]
    sent = unsent = 0
    for c, slot in order:
        n = plan[c][slot]
        rid = f"f{first_client + c}-{slot}"
        frames = p.encode(p.Generate(rid=rid, sampling={"max_tokens": 16}, frames=[ids[:4 * n]]))
        try:
            socks[c].send_multipart(frames, zmq.NOBLOCK, copy=n * 4 < 65536)
            sent += 1
            meta[rid] = (first_client + c, 4 * n)
        except zmq.Again:
            unsent += 1
        if sent % 512 == 0:
            receive(0)
            counters[k * 3] = sent
    counters[k * 3] = sent
    out.put(("sent", k, sent, unsent))
    deadline = time.monotonic() + 900  # the parent sets done long before; this is for a parent gone wrong
    while not done.is_set() and time.monotonic() < deadline:
        receive(100)
    receive(0)
    # What the broker held: the requests answered with an aborted result after the abort-all.
    held = collections.Counter()
    held_n = 0
    for rid, what in answers.items():
        if what.startswith("result:") and rid in meta:
            c, nbytes = meta[rid]
            held[c] += nbytes
            held_n += 1
    out.put(("final", k, {"sent": sent, "unsent": unsent, "answered": len(answers), "duplicates": dups,
                          "answers": dict(codes), "other_messages": dict(odd), "held_count": held_n,
                          "held_bytes": sum(held.values()), "max_client_held_bytes": max(held.values(), default=0),
                          "clients_holding": len(held), "unanswered": sum(1 for r in meta if r not in answers)}))
    ctx.destroy(linger=0)


def run_flood(plan: FloodPlan, log_dir: str, *, time_limit_s: float = 300.0) -> dict:
    """The flood (module doc); returns its figures. Budgets 0 are left out of the broker's command line."""
    os.makedirs(log_dir, exist_ok=True)
    soft, hard = raise_nofile()
    per_child = max(1, min(5000, (soft - 256) // 2))  # a DEALER takes 2 descriptors: its TCP connection, its mailbox
    children = math.ceil(plan.clients / per_child)
    t0 = time.monotonic()
    broker = start_broker(os.path.join(log_dir, "flood-broker.log"), plan.budget_args())
    rss_idle = rss_connected = rss_settled = broker.rss()
    sampler = RssSampler(broker, every=0.05)
    prompts = plan.prompts()
    ctx = mp.get_context("spawn")  # children start clean: no copy of this process's zmq context
    counters = ctx.Array("q", 3 * children, lock=False)  # per child: sent, answered, busy
    go, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = []
    for k in range(children):
        lo, hi = k * per_child, min(plan.clients, (k + 1) * per_child)
        procs.append(ctx.Process(target=_flood_child, args=(k, broker.front, prompts[lo:hi], lo, counters, go, done, out),
                                 daemon=True))
        procs[-1].start()
    total = sum(len(x) for x in prompts)
    client = Client(broker.front, timeout=ANSWER_S)
    pings, events = [], {}
    result: dict = {"clients": plan.clients, "requests": total, "big_prompts": sum(x.count(p.MAX_PROMPT_TOKENS) for x in prompts),
                    "big_prompt_bytes": 4 * p.MAX_PROMPT_TOKENS, "children": children, "nofile": [soft, hard],
                    "budgets": {"max_pending": plan.max_pending, "max_pending_bytes": plan.max_pending_bytes,
                                "max_client_bytes": plan.max_client_bytes}, "broker_args": plan.budget_args()}
    finals = {}

    def wait_queue(kind: str, n: int, timeout: float) -> list:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            try:
                m = out.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except Exception:  # queue.Empty
                continue
            if m[0] == "final":
                finals[m[1]] = m[2]
            if m[0] == kind:
                got.append(m)
        return got

    def ping_now(tag: str) -> tuple[bool, float]:
        ok, took, _ = checked_call(client, "ping")
        pings.append((round(time.monotonic() - t0, 3), round(took * 1e3, 2), tag))
        return ok, took

    try:
        if len(wait_queue("ready", children, 300)) < children:
            raise RuntimeError(f"flood children did not start: {finals}")
        # Connections are made in the background: wait until the broker holds one descriptor for each.
        deadline = time.monotonic() + 120
        while broker.num_fds() < plan.clients and time.monotonic() < deadline:
            time.sleep(0.1)
        result["broker_fds"] = broker.num_fds()
        rss_connected = broker.rss()
        events["go"] = time.monotonic() - t0
        go.set()
        sent_msgs, last = [], 0.0
        while len(sent_msgs) < children and time.monotonic() - t0 < time_limit_s:
            sent_msgs += wait_queue("sent", children - len(sent_msgs), 0.1)
            if time.monotonic() - last > 0.1:
                ping_now("flood")
                last = time.monotonic()
        events["sent"] = time.monotonic() - t0
        sent = sum(m[2] for m in sent_msgs)
        result["unsent"] = sum(m[3] for m in sent_msgs)
        # Settled: every request is either refused (busy or another error, counted by the children) or pending.
        st, deadline = {}, time.monotonic() + 120
        while time.monotonic() < deadline and broker.alive():
            ok, took, reply = checked_call(client, "status")
            pings.append((round(time.monotonic() - t0, 3), round(took * 1e3, 2), "status"))
            answered = sum(counters[k * 3 + 1] for k in range(children))
            st = reply if ok else st
            if ok and answered + st.get("pending", 0) >= sent:
                break
            time.sleep(0.2)
        events["settled"] = time.monotonic() - t0
        time.sleep(1.0)  # what was refused is freed as its reply leaves
        rss_settled = broker.rss()
        result["after_flood"] = answered_in_time(client)
        result["status_settled"] = {k: v for k, v in st.items() if k != "workers"}
        result["refused_before_abort"] = sum(counters[k * 3 + 1] for k in range(children))
        result["busy"] = sum(counters[k * 3 + 2] for k in range(children))
        # The abort-all ends every held request with an aborted result: what was held, exactly.
        t = time.perf_counter()
        try:
            with Client(broker.front) as c:
                result["abort_all"] = {"reply_ok": c.abort_all(timeout=60).ok}
        except RolloutdError as e:
            result["abort_all"] = {"error": repr(e)}
        result["abort_all"]["ms"] = round((time.perf_counter() - t) * 1e3, 1)
        deadline = time.monotonic() + 120
        while sum(counters[k * 3 + 1] for k in range(children)) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        events["answered"] = time.monotonic() - t0
        done.set()
        wait_queue("final", children - len(finals), 120)
        result["after_abort"] = answered_in_time(client)
    finally:
        done.set()
        go.set()
        for pr in procs:
            pr.join(30)
            if pr.is_alive():
                pr.kill()
        client.close()
        sampler.stop()
        result["broker_alive"] = broker.alive()
        result["rss_mib_final"] = round(rss_or_0(broker) / MiB, 1) if result["broker_alive"] else None
        # the peak as the kernel kept it (VmHWM: no gap between samples misses it); the sampler's if it died
        rss_peak = max(sampler.peak, rss_or_0(broker, peak=True) if result["broker_alive"] else 0)
        result["broker_exit_code"] = broker.stop(15)
        result["broker_log_tail"] = broker.tail(max_bytes=3000) if result["broker_exit_code"] not in (0, None) else ""
    f = list(finals.values())
    summed = lambda key: sum(x.get(key, 0) for x in f)
    answers = collections.Counter()
    for x in f:
        answers.update(x.get("answers", {}))
    result.update({
        "sent": summed("sent"), "answered": summed("answered"), "unanswered": summed("unanswered"),
        "duplicates": summed("duplicates"), "answers": dict(answers), "held_count": summed("held_count"),
        "held_bytes": summed("held_bytes"), "max_client_held_bytes": max((x.get("max_client_held_bytes", 0) for x in f), default=0),
        "clients_holding": summed("clients_holding"), "children_reports": len(f),
        "child_errors": [x["error"] for x in f if "error" in x],
        "other_messages": dict(sum((collections.Counter(x.get("other_messages", {})) for x in f), collections.Counter())),
        "rss_mib": {"idle": round(rss_idle / MiB, 1), "connected": round(rss_connected / MiB, 1),
                    "settled": round(rss_settled / MiB, 1),
                    "settled_bound": round((rss_connected + plan.max_pending_bytes + flood_slack(plan)) / MiB, 1),
                    "peak": round(rss_peak / MiB, 1),
                    "bound": round((rss_connected + plan.max_pending_bytes + flood_slack(plan)
                                    + in_transit(result["big_prompts"])) / MiB, 1)},
        "events_s": {k: round(v, 2) for k, v in events.items()}, "wall_s": round(time.monotonic() - t0, 1),
        "ping_timeline": pings, "rss_timeline": [(round(t, 2), round(r / MiB, 1)) for t, r in sampler.samples[::5]],
    })
    lat = [x[1] for x in pings if x[2] == "flood"]
    result["ping_during_flood_ms"] = {k: v for k, v in percentiles(lat).items()} if lat else {}
    return result


def answered_in_time(client: Client) -> dict:
    """A proper client's ping and status: answered within ANSWER_S?, how long, and the status reply."""
    out = {}
    for what in ("ping", "status"):
        ok, took, reply = checked_call(client, what)
        out[what] = {"ok": ok, "ms": round(took * 1e3, 2)}
        if what == "status":
            out["status_reply"] = {k: v for k, v in reply.items() if k != "workers"} if ok else reply
    return out


# ----------------------------------------------------------------------------------------------- the bounds

def flood_slack(plan: FloodPlan) -> int:
    """RSS the flood broker may hold, once every request is answered or held, beyond its baseline with the
    connections made and its byte budget: 1 KiB of Python objects per held request (table entries, frame
    objects), 8 KiB per connection that has carried traffic (libzmq's buffers and queues grow with it: the
    10,000 connections here took 66-86 MiB over the baseline plus budget, with 6,200 requests held), and
    64 MiB the allocator keeps. The broker's own budget (held_bytes) is checked exactly, apart from this."""
    return plan.max_pending * 1024 + plan.clients * 8 * 1024 + 64 * MiB


def in_transit(big_prompts: int) -> int:
    """What may sit in libzmq's receive queues on top, at the peak: every big prompt offered. libzmq reads
    each connection into its own queue as fast as the peer sends, and has no bound across connections;
    the broker's loop refuses them as busy only as it reads them."""
    return big_prompts * 4 * p.MAX_PROMPT_TOKENS


# ----------------------------------------------------------------------------------------------- the figure

def plot(result: dict, path: str) -> None:
    """RSS against its peak bound, the run's events, and a proper client's answer times, over time."""
    rss = result["rss_timeline"]
    title = (f"flood: {result['requests']:,} generates from {result['clients']:,} clients, "
             f"{result['big_prompts']} of 4 MiB, no worker")
    fig, a, b = rss_and_answers_figure([x[0] for x in rss], [x[1] for x in rss], result["rss_mib"]["bound"], title,
                                       "seconds")
    for name, at in result["events_s"].items():
        a.axvline(at, color="gray", ls=":")
        a.text(at, a.get_ylim()[1] * 0.95, name, fontsize=7, rotation=90, va="top")
    b.plot([x[0] for x in result["ping_timeline"]], [x[1] for x in result["ping_timeline"]], ".", ms=3)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=FloodPlan.clients)
    ap.add_argument("--requests", type=int, default=FloodPlan.requests)
    ap.add_argument("--big", type=int, default=FloodPlan.big)
    ap.add_argument("--max-pending", type=int, default=FloodPlan.max_pending, help="0: the broker's default")
    ap.add_argument("--max-pending-bytes", type=int, default=FloodPlan.max_pending_bytes, help="0: not passed")
    ap.add_argument("--max-client-bytes", type=int, default=FloodPlan.max_client_bytes, help="0: not passed")
    ap.add_argument("--logs", default=os.path.join("/tmp", f"flood-broker-{os.getpid()}"))
    a = ap.parse_args()
    plan = FloodPlan(clients=a.clients, requests=a.requests, big=a.big, max_pending=a.max_pending,
                     max_pending_bytes=a.max_pending_bytes, max_client_bytes=a.max_client_bytes)
    r = run_flood(plan, a.logs)
    r["plan"] = dataclasses.asdict(plan)
    keys = ("sent", "answered", "answers", "held_count", "held_bytes", "max_client_held_bytes", "rss_mib",
            "after_flood", "after_abort", "ping_during_flood_ms", "events_s", "wall_s")
    save_run("flood", r, a.logs, {k: r.get(k) for k in keys}, plot)


if __name__ == "__main__":
    main()
