"""Broker rules, isolated: a real Broker in a thread, fake workers that are plain DEALER sockets driven by
the test. (That the whole path works with real vLLM workers is tests/test_daemon.py's job.)"""
import contextlib
import threading
import time

import msgpack
import pytest
import zmq

from rolloutd import protocol as p
from rolloutd.broker import Broker
from rolloutd.client import Client
from rolloutd.errors import Busy, ShuttingDown, WorkerLost
from rolloutd.results import from_finished

HB = 0.1
# Fake workers beat only when a test says so; 10 intervals (1 s) keeps them alive through a test's own
# waits on a loaded CI machine, where 3 (0.3 s) expired healthy ones.
LIVENESS = 10


@contextlib.contextmanager
def running_broker(**kw):
    """A broker serving in a thread of this process: yields it and the thread, stops it after."""
    box, ready = {}, threading.Event()

    def run():
        b = Broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ctx=zmq.Context.instance(),
                   **{"heartbeat_s": HB, "liveness": LIVENESS, "max_pending": 4, "control_timeout_s": 1.0, **kw})
        box["b"] = b
        ready.set()
        b.run()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        yield box["b"], t
    finally:
        box["b"].stop()
        t.join(5)


@pytest.fixture
def broker():
    with running_broker() as (b, _):
        yield b


def recv(sock, timeout=2.0):
    assert sock.poll(timeout * 1000), "nothing arrived in time"
    return p.decode(sock.recv_multipart(), p.ANY)


def recv_skip_beats(sock, timeout=2.0):
    deadline = time.monotonic() + timeout
    while True:
        m = recv(sock, max(0.01, deadline - time.monotonic()))
        if m.CMD is not p.Cmd.HEARTBEAT:
            return m


class FakeWorker:
    def __init__(self, broker, name, capacity=8):
        self.name = name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(broker.back_address)
        self.send(p.Ready(worker=name, model="m", devices=["cpu"], capacity=capacity, weight_version=0,
                          transports=[], pid=0, engine={}))
        assert recv(self.sock).CMD is p.Cmd.HEARTBEAT  # the broker's acknowledgement

    def send(self, msg):
        self.sock.send_multipart(p.encode(msg))

    def beat(self):
        self.send(p.Heartbeat())

    def next(self, timeout=2.0):
        return recv_skip_beats(self.sock, timeout)

    def has_nothing(self, within=0.3):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.sock.poll(20):
                m = p.decode(self.sock.recv_multipart(), p.ANY)
                if m.CMD is not p.Cmd.HEARTBEAT:
                    return False
        return True

    def finish(self, gen: p.Generate, tokens=(1, 2)):
        self.send(finished(self.name, gen.rid, gen.n, tokens))


def finished(worker: str, rid: str, n: int = 1, tokens=(1, 2), reason: str = "stop") -> p.Finished:
    """A worker's Finished for one request: n samples, each these tokens."""
    return p.Finished.pack(worker, 0, [(rid, 0, [(i, "x", reason, list(tokens), None) for i in range(n)])])


def ended(msg: p.Message) -> dict:
    """The requests a Finished message ended: {rid: results.Result}."""
    assert msg.CMD is p.Cmd.FINISHED, msg
    msg.check_frames()
    return {r.request_id: r for r in from_finished(msg)}


def rid_of(msg: p.Message) -> str:
    """The one request a message answers (an Error's rid, a Finished's only rid)."""
    if msg.CMD is p.Cmd.FINISHED:
        (rid,) = msg.rids
        return rid
    return msg.rid


def raw_client(broker):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(broker.front_address)
    return s


def gen(rid, n=1):
    return p.encode(p.Generate(rid=rid, sampling={"n": n}, frames=[p.pack_ids([1, 2, 3])]))


def test_least_loaded_placement_keeps_a_prompts_samples_together(broker):
    a, b = FakeWorker(broker, "a"), FakeWorker(broker, "b")
    c = raw_client(broker)
    for i in range(4):
        c.send_multipart(gen(f"r{i}", n=2))
    got = {"a": [a.next(), a.next()], "b": [b.next(), b.next()]}
    for msgs in got.values():
        assert all(m.CMD is p.Cmd.GENERATE and m.n == 2 for m in msgs)
    # results come back to the client, frames untouched
    for name, w in (("a", a), ("b", b)):
        for m in got[name]:
            w.finish(m, tokens=(7, 8, 9))
    results = {rid: r for _ in range(4) for rid, r in ended(recv(c)).items()}
    assert sorted(results) == ["r0", "r1", "r2", "r3"]
    assert all(s.token_ids == [7, 8, 9] for r in results.values() for s in r.samples)
    assert broker.status()["requests"] == 0


def test_full_workers_queue_then_refuse_as_busy(broker):
    w = FakeWorker(broker, "a", capacity=2)
    c = raw_client(broker)
    c.send_multipart(gen("first", n=2))
    first = w.next()
    for i in range(4):  # max_pending=4
        c.send_multipart(gen(f"wait{i}", n=1))
    c.send_multipart(gen("refused", n=1))
    err = recv(c)
    assert err.CMD is p.Cmd.ERROR and err.code == Busy.code and err.rid == "refused"
    assert w.has_nothing()  # the waiting ones are held by the broker, not pushed onto a full worker
    w.finish(first)
    assert rid_of(recv(c)) == "first"
    assert {w.next().rid, w.next().rid} == {"wait0", "wait1"}  # room for 2 sequences again


def test_silent_worker_fails_its_requests_with_worker_lost(broker):
    a, b = FakeWorker(broker, "a"), FakeWorker(broker, "b")
    c = raw_client(broker)
    c.send_multipart(gen("ra"))
    c.send_multipart(gen("rb"))
    on = {"a": a.next().rid, "b": b.next().rid}
    t0 = time.monotonic()
    deadline = t0 + 3
    err = None
    while time.monotonic() < deadline and err is None:  # b keeps beating, a has died
        b.beat()
        if c.poll(50):
            err = p.decode(c.recv_multipart(), p.ANY)
    assert err is not None and err.code == WorkerLost.code and err.rid == on["a"]
    assert time.monotonic() - t0 < HB * LIVENESS + 0.9
    assert [w["id"] for w in broker.status()["workers"]] == ["b"]
    b.finish(p.Generate(rid=on["b"], sampling={}, prompt="x"))
    assert rid_of(recv(c)) == on["b"]


def test_abort_reaches_only_the_owner_and_names_unknown_ids(broker):
    a, b = FakeWorker(broker, "a"), FakeWorker(broker, "b")
    c = raw_client(broker)
    c.send_multipart(gen("ra"))
    c.send_multipart(gen("rb"))
    owner = {a.next().rid: a, b.next().rid: b}
    c.send_multipart(p.encode(p.Abort(cid="c1", rids=["ra", "nope"])))
    w = owner["ra"]
    other = b if w is a else a
    m = w.next()
    assert m.CMD is p.Cmd.ABORT and m.rids == ["ra"]
    assert other.has_nothing()
    w.send(p.Reply(cid=m.cid, data={"aborted": 1, "unknown": []}))  # the broker's own id for the call
    r = recv(c)
    assert r.CMD is p.Cmd.REPLY and r.data["unknown"] == ["nope"]
    assert r.workers[w.name] == {"ok": True, "data": {"aborted": 1, "unknown": []}}


def test_fan_out_aggregates_and_times_out_silent_workers(broker):
    a, b = FakeWorker(broker, "a"), FakeWorker(broker, "b")
    c = raw_client(broker)
    c.send_multipart(p.encode(p.AbortAll(cid="c2")))
    got_a, got_b = a.next(), b.next()
    assert got_a.CMD is p.Cmd.ABORT_ALL and got_b.CMD is p.Cmd.ABORT_ALL
    a.send(p.Reply(cid=got_a.cid, data={"aborted": 3}))
    t0 = time.monotonic()
    while not c.poll(50):  # b answers nothing but keeps beating: the reply closes at control_timeout_s
        a.beat()
        b.beat()
        assert time.monotonic() - t0 < 3
    r = p.decode(c.recv_multipart(), p.ANY)
    assert r.CMD is p.Cmd.REPLY and not r.ok
    assert r.workers["a"] == {"ok": True, "data": {"aborted": 3}} and r.workers["b"]["error"] == "timeout"


def test_pending_requests_abort_at_once_with_no_tokens(broker):
    c = raw_client(broker)
    c.send_multipart(gen("waiting", n=3))  # no worker yet
    c.send_multipart(p.encode(p.AbortAll(cid="c3")))
    (res,) = ended(recv(c)).values()
    assert res.request_id == "waiting" and res.weight_version == -1
    assert [(s.finish_reason, s.token_ids) for s in res.samples] == [("abort", [])] * 3
    assert recv(c).CMD is p.Cmd.REPLY


@pytest.mark.parametrize("frames,match", [
    ([b"garbage"], "at least 2 frames"),
    ([b"NOPE\x0a", msgpack.packb({"rid": "r"})], "bad protocol tag"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"rid": 5, "sampling": {}})], "Generate.rid must be str"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), b"\x00" * (p.MAX_HEADER_BYTES + 10)], "over the limit"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"rid": "r", "sampling": {"n": -1}, "prompt": "x"})], "`n` must be"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"sampling": {}, "prompt": "x"})], "missing field"),
    ([p.TAG + bytes([p.Cmd.READY]), msgpack.packb({"worker": "x"})], "Ready is not taken here"),
])
def test_bad_client_messages_get_an_error_reply_and_the_broker_keeps_serving(broker, frames, match):
    c = raw_client(broker)
    c.send_multipart(frames)
    err = recv(c)
    assert err.CMD is p.Cmd.ERROR and err.code in ("protocol", "bad_request")
    assert match in err.message
    with Client(broker.front_address, timeout=2) as cl:
        assert cl.ping("broker")["from"] == "broker"


def test_bad_worker_messages_get_an_error_and_unknown_workers_are_told_to_register(broker):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(broker.back_address)
    s.send_multipart([b"\x00\x01\x02"])
    assert recv(s).code == "protocol"
    s.send_multipart(p.encode(p.Heartbeat()))
    assert recv(s).CMD is p.Cmd.DISCONNECT
    w = FakeWorker(broker, "ok")  # held: a worker whose socket closes is dropped at once
    with Client(broker.front_address, timeout=2) as cl:
        assert [x["id"] for x in cl.status()["workers"]] == ["ok"]
    w.sock.close()


def test_duplicate_request_ids_are_refused(broker):
    FakeWorker(broker, "a")
    c = raw_client(broker)
    c.send_multipart(gen("same"))
    c.send_multipart(gen("same"))
    err = recv(c)
    assert err.CMD is p.Cmd.ERROR and err.code == "bad_request" and "already in flight" in err.message


def test_a_results_batch_reaches_each_client_with_its_own(broker):
    w = FakeWorker(broker, "a")
    c1, c2 = raw_client(broker), raw_client(broker)
    c1.send_multipart(gen("one"))
    c2.send_multipart(gen("two"))
    c1.send_multipart(gen("three"))
    gens = [w.next() for _ in range(3)]
    w.send(p.Finished.pack("a", 0, [(g.rid, 0, [(0, g.rid, "abort", [1], None)]) for g in gens]))
    got1, got2 = ended(recv(c1)), ended(recv(c2))
    assert sorted(got1) == ["one", "three"] and list(got2) == ["two"]
    assert got1["three"].text == "three" and got2["two"].token_ids == [1]
    assert broker.status()["requests"] == 0 and broker.status()["workers"][0]["inflight"] == 0


def test_a_bad_results_batch_fails_its_requests_instead_of_dropping_them(broker):
    w = FakeWorker(broker, "a")
    c1, c2 = raw_client(broker), raw_client(broker)
    c1.send_multipart(gen("bad-one"))
    c2.send_multipart(gen("bad-two"))
    gens = [w.next() for _ in range(2)]
    items = [[[{"index": 0, "text": "", "finish_reason": "stop", "logprobs": False, "tokens": 5}], 0] for g in gens]
    bad = p.Finished(worker="a", weight_version=0, rids=[g.rid for g in gens],
                     frames=[msgpack.packb(items), p.pack_ids([1])])  # 10 ids promised, 1 there
    w.send(bad)
    got1, got2 = recv(c1), recv(c2)
    assert (got1.CMD, got1.rid, got1.code) == (p.Cmd.ERROR, "bad-one", "internal")
    assert (got2.CMD, got2.rid, got2.code) == (p.Cmd.ERROR, "bad-two", "internal")
    assert broker.status()["requests"] == 0


def test_a_stopping_broker_refuses_new_work_drains_then_aborts_and_forwards_the_partials():
    with running_broker(drain_s=0.5) as (b, t):
        w = FakeWorker(b, "a")
        c = raw_client(b)
        c.send_multipart(gen("quick"))
        c.send_multipart(gen("slow", n=2))
        quick, slow = w.next(), w.next()
        b.stops.signal()  # what SIGTERM does
        c.send_multipart(gen("late"))
        err = recv(c)
        assert err.CMD is p.Cmd.ERROR and err.code == ShuttingDown.code and err.rid == "late"
        w.finish(quick)  # finishes within the drain: delivered as usual
        assert rid_of(recv(c)) == "quick"
        abort = w.next(timeout=3.0)  # the drain is over: what is left is aborted at its worker
        assert abort.CMD is p.Cmd.ABORT and abort.rids == ["slow"]
        w.finish(slow, tokens=(4,))  # its partial output
        res = ended(recv(c))
        assert list(res) == ["slow"] and [s.token_ids for s in res["slow"].samples] == [[4], [4]]
        t.join(3)
        assert not t.is_alive(), "the broker did not end once nothing was in flight"


def test_a_second_stop_aborts_at_once_and_a_silent_worker_cannot_hold_the_broker():
    with running_broker(drain_s=60) as (b, t):
        w = FakeWorker(b, "a")
        c = raw_client(b)
        c.send_multipart(gen("long"))
        w.next()
        b.stops.signal()
        assert w.has_nothing(within=0.3)  # draining
        b.stops.force(2)  # a second signal
        abort = w.next()
        assert abort.CMD is p.Cmd.ABORT and abort.rids == ["long"]
        # the worker beats but never answers: after the grace the request fails, and the broker ends
        deadline = time.monotonic() + 10
        while not c.poll(50) and time.monotonic() < deadline:
            w.beat()
        err = recv(c)
        assert err.CMD is p.Cmd.ERROR and err.code == ShuttingDown.code and err.rid == "long"
        t.join(3)
        assert not t.is_alive()
