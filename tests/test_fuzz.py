"""Issue 7: whatever arrives on its sockets, the broker process stays up, answers a proper client within 2 s
and keeps its memory bounded. The harness is perf/fuzz_broker.py (messages from perf/fuzz_messages.py) and
perf/flood_broker.py; their long runs and figures are `python perf/fuzz_broker.py --messages 100000` and
`python perf/flood_broker.py`, and these are their CI-sized runs. Each test starts `rolloutd broker` as a
subprocess on ports it picks (rolloutd.testing.BrokerProcess); none starts an engine.

A failing fuzz test names the input: the messages since the last good check are replayed against fresh
brokers and cut down to the few that fail it (the "isolated" entry of the report). The seed is fixed
(ROLLOUTD_FUZZ_SEED overrides it); what the fake workers answer also depends on timing.
"""
import json
import os
import sys

import pytest

from rolloutd import protocol as p

# perf/ on the path: the harness's modules import each other (and perf/common.py) by their names
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
import flood_broker as fl  # noqa: E402
import fuzz_broker as fz  # noqa: E402
import fuzz_messages as fm  # noqa: E402

SEED = int(os.environ.get("ROLLOUTD_FUZZ_SEED", "7"))
MESSAGES = 20_000


def report(r: dict, *keys) -> str:
    return json.dumps({k: r.get(k) for k in keys}, indent=1, default=str)[:20_000]


def test_the_fuzzers_valid_messages_decode_and_every_kind_is_sent():
    """Mutations start from valid messages, and valid ones keep the broker's tables busy: if these did not
    decode, the fuzz would only ever test the decoder's first check."""
    f = fm.Fuzzer(SEED)
    f.assigned.append((b"fz-w0", "r1", 2))
    f.controls.append((b"fz-w0", "c1"))
    for _ in range(20):
        for cmd in fm.CLIENT_CMDS:
            p.decode(p.encode(f.valid(cmd, "front", b"fz-c0")), p.CLIENT_TO_BROKER)
        for cmd in fm.WORKER_CMDS:
            p.decode(p.encode(f.valid(cmd, "back", b"fz-w0")), p.WORKER_TO_BROKER)
    cases = [f.next() for _ in range(5000)]
    for side in ("front", "back"):
        sent = {c.kind for c in cases if c.side == side}
        assert sent >= {k for k, w in fm.KINDS.items() if w >= 1}, side
    # registered identities and strangers both speak on the back
    assert {c.ident for c in cases if c.side == "back"} == set(fm.WORKERS + fm.STRANGERS)


def test_the_typed_header_decode_takes_what_the_checked_one_takes_and_nothing_else():
    """protocol.decode's fast path (msgspec, typed) against its field-by-field checks, on the fuzzer's messages
    (repeated keys, keys of every type, ext types, bad UTF-8, deep nesting...): whatever the fast path takes,
    the checks take too, with the same values and types."""
    f = fm.Fuzzer(SEED)
    f.assigned.append((b"fz-w0", "r1", 2))
    f.controls.append((b"fz-w0", "c1"))
    typed = 0
    for _ in range(MESSAGES):
        frames = f.next().frames
        if len(frames) < 2 or bytes(frames[0][:4]) != p.TAG or len(frames[0]) != 5 or frames[0][4] not in p._BY_CMD:
            continue
        cls = p._BY_CMD[frames[0][4]]
        if len(frames[1]) > cls.MAX_HEADER:
            continue
        fast = p._typed_header(cls, frames[1])
        if fast is None:
            continue
        typed += 1
        assert repr(fast) == repr(p._checked_header(cls, frames[1])), (cls.__name__, bytes(frames[1])[:300])
    assert typed > MESSAGES // 10  # the valid ones, and mutations that stay valid


def test_the_harness_sees_a_dead_broker(tmp_path):
    """The fuzz must not run on past a broker that died (here: killed by the harness itself; valid messages
    only, so that no bug of the broker's ends it first)."""
    r = fz.run_fuzz(1000, SEED, str(tmp_path), kinds={"valid": 1}, kill_at=300, stop_on_crash=True)
    assert len(r["crashes"]) == 1, report(r, "crashes", "messages")
    assert r["crashes"][0]["at_message"] <= 300 + fz.DRAIN_EVERY
    assert r["crashes"][0]["signature"] == "no traceback (killed, or hung)"


def test_fuzz_both_sockets(tmp_path):
    r = fz.run_fuzz(MESSAGES, SEED, str(tmp_path), stop_on_crash=True, time_limit_s=150)
    what = report(r, "messages", "wall_s", "crashes", "faults", "internal_faults", "answers", "rss_mib", "received")
    assert not r["crashes"], what
    assert r["messages"] == MESSAGES, f"ran out of time\n{what}"
    # The broker's guard keeps it alive through its own bugs; the fuzz counts them as failures all the same.
    assert r["faults"].get("internal", 0) == 0, what
    checks = MESSAGES // fz.CHECK_EVERY
    assert r["answers"]["total"] == 2 * checks and r["answers"]["ok"] == r["answers"]["total"], what
    # every fuzz client socket's ping came back after what it sent: the broker read all of it
    assert r["barriers_ok"] == checks and r["unsent"] == 0, what
    # The messages reached the broker and were judged there, and the valid ones went through it both ways.
    assert r["faults"].get("bad_message", 0) >= MESSAGES // 2, what
    assert r["received"]["back"].get("GENERATE", 0) > 100 and r["received"]["front"].get("FINISHED", 0) > 100, what
    assert r["rss_mib"]["peak"] <= r["rss_mib"]["bound"], what
    assert r["last_exit_code"] == 0, what


def test_flood_of_generates_with_no_worker_is_answered_within_budgets(tmp_path):
    """70,000 generates from 10,000 connections, 300 of them 1M-token (4 MiB) prompts, and no worker:
    each is refused as busy or held, what is held stays within the broker's budgets and its memory with it,
    and a proper client is still answered in time."""
    plan = fl.FloodPlan()
    soft, hard = fl.raise_nofile()
    if hard < plan.clients + 1024:
        pytest.skip(f"the open-file hard limit ({hard}) is too low for a broker with {plan.clients} connections")
    r = fl.run_flood(plan, str(tmp_path))
    what = report(r, *[k for k in r if not k.endswith("timeline")])
    assert r["broker_alive"] and r["broker_exit_code"] == 0, what
    assert r["sent"] == plan.requests and r["unsent"] == 0 and r["children_reports"] == r["children"], what
    # Every request answered once: busy at once, or held until the abort-all ended it.
    assert r["answered"] == r["sent"] and r["unanswered"] == 0 and r["duplicates"] == 0, what
    assert set(r["answers"]) <= {"error:busy", "result:abort"}, what
    assert r["answers"].get("error:busy", 0) > 0 and r["held_count"] > 0, what
    assert r["status_settled"]["pending"] == r["held_count"], what
    # What was held (the aborted ones' prompt bytes) is within every budget; the broker counts a little more
    # per request than its prompt (header, overhead), never less.
    assert r["held_count"] <= plan.max_pending, what
    assert r["held_bytes"] <= r["status_settled"]["held_bytes"] <= plan.max_pending_bytes, what
    assert r["max_client_held_bytes"] <= plan.max_client_bytes, what
    # Once everything is answered or held, the broker's memory is what it holds: the refused prompts are gone.
    assert r["rss_mib"]["settled"] <= r["rss_mib"]["settled_bound"], what
    # At the peak, prompts not yet read may sit in libzmq's queues too (perf/flood_broker.in_transit).
    assert r["rss_mib"]["peak"] <= r["rss_mib"]["bound"], what
    for when in ("after_flood", "after_abort"):
        assert r[when]["ping"]["ok"] and r[when]["status"]["ok"], what
    assert r["after_abort"]["status_reply"]["pending"] == 0 and r["after_abort"]["status_reply"]["held_bytes"] == 0, what
