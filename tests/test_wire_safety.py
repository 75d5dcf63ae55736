"""Issue 7's findings, one test each: what a peer could do to the broker before, and what holds now.

A broker in a thread with fake workers (plain DEALER sockets) where the rule is the broker's; a broker in a
process of its own where memory or file descriptors are measured.
"""
import resource
import time

import msgpack
import pytest
import zmq

from rolloutd import BrokerUnreachable, Busy, Client, ProtocolError, RequestTimeout
from rolloutd import protocol as p
from rolloutd.errors import WorkerLost
from rolloutd.testing import BrokerProcess

from .test_broker import FakeWorker, ended, gen, raw_client, recv, running_broker


def header(cmd: p.Cmd, hdr: dict) -> list[bytes]:
    return [p.TAG + bytes([cmd]), msgpack.packb(hdr, use_bin_type=True)]


def alive(broker) -> None:
    """A proper client is answered within 2 s."""
    with Client(broker.front_address, timeout=2) as c:
        assert c.ping("broker")["from"] == "broker"


def faults(broker) -> dict:
    with Client(broker.front_address, timeout=2) as c:
        return c.status()["faults"]


@pytest.fixture
def broker():
    with running_broker() as (b, _):
        yield b


# ------------------------------------------------------------------------------------ one message kills it

def test_unknown_keys_of_mixed_types_get_an_error_on_both_sockets(broker):
    bad = {"cid": "c1", "zzz": 1, b"bytes-key": 2}  # sorting str with bytes raised inside the error text
    c = raw_client(broker)
    c.send_multipart(header(p.Cmd.STATUS, bad))
    err = recv(c)
    assert err.CMD is p.Cmd.ERROR and err.code == ProtocolError.code and err.cid == "c1"
    assert "unknown field" in err.message and "zzz" in err.message
    w = zmq.Context.instance().socket(zmq.DEALER)  # never registered
    w.setsockopt(zmq.LINGER, 0)
    w.connect(broker.back_address)
    w.send_multipart(header(p.Cmd.HEARTBEAT, {"inflight": 0, b"x": 1, "y": None}))
    assert recv(w).CMD is p.Cmd.ERROR
    alive(broker)
    assert faults(broker)["bad_message"] == 2


def test_ready_with_capacity_zero_is_refused_and_placement_goes_on(broker):
    w = zmq.Context.instance().socket(zmq.DEALER)
    w.setsockopt(zmq.LINGER, 0)
    w.connect(broker.back_address)
    ready = p.Ready(worker="zero", model="m", devices=["cpu"], capacity=1, weight_version=0, transports=[], pid=1,
                    engine={})
    frames = p.encode(ready)
    frames[1] = msgpack.packb({**ready.header(), "capacity": 0})
    w.send_multipart(frames)
    err = recv(w)
    assert err.CMD is p.Cmd.ERROR and "capacity" in err.message
    c = raw_client(broker)
    c.send_multipart(gen("after"))  # placement divided by capacity: ZeroDivisionError ended the loop
    alive(broker)
    assert broker.status()["pending"] == 1


# ----------------------------------------------------------------------------------- who may say what

def test_results_from_a_worker_the_request_is_not_on_are_dropped(broker):
    a, b = FakeWorker(broker, "a"), FakeWorker(broker, "b")
    c = raw_client(broker)
    c.send_multipart(gen("on-a"))
    g = a.next()
    b.finish(g, tokens=(6, 6, 6))  # b answers for a's request
    assert not c.poll(300), "a result from the wrong worker reached the client"
    assert faults(broker)["not_owner"] == 1
    a.finish(g, tokens=(1,))
    assert ended(recv(c))["on-a"].token_ids == [1]


def test_a_live_workers_name_cannot_be_taken_over(broker):
    real = FakeWorker(broker, "w0")
    thief = zmq.Context.instance().socket(zmq.DEALER)
    thief.setsockopt(zmq.LINGER, 0)
    thief.connect(broker.back_address)
    thief.send_multipart(p.encode(p.Ready(worker="w0", model="m", devices=["cpu"], capacity=8, weight_version=0,
                                          transports=[], pid=2, engine={})))
    bye = recv(thief)
    assert bye.CMD is p.Cmd.DISCONNECT and "taken" in bye.reason
    c = raw_client(broker)
    c.send_multipart(gen("for-w0"))
    assert real.next().rid == "for-w0"
    assert faults(broker)["name_taken"] == 1


def test_worker_commands_on_the_front_are_refused_before_their_header_is_read(broker):
    c = raw_client(broker)
    # Under the front's frame limit (a bigger frame drops the connection in libzmq), over any client
    # header's: unpacked, 8 MiB of such a header cost 600 MB and 1.6 s
    huge = [p.TAG + bytes([p.Cmd.FINISHED]), b"\x91" * (3 << 20)]
    t0 = time.monotonic()
    c.send_multipart(huge)
    err = recv(c)
    assert err.code == ProtocolError.code and "Finished is not taken here" in err.message
    assert time.monotonic() - t0 < 1.0
    alive(broker)


def test_controls_of_two_clients_with_the_same_cid_do_not_answer_each_other(broker):
    w = FakeWorker(broker, "a")
    c1, c2 = raw_client(broker), raw_client(broker)
    c1.send_multipart(p.encode(p.AbortAll(cid="same")))
    first = w.next()  # c1's: two connections are read in no set order, so one at a time
    c2.send_multipart(p.encode(p.AbortAll(cid="same")))
    second = w.next()
    assert first.cid != second.cid  # the worker sees the broker's own ids
    w.send(p.Reply(cid=second.cid, data={"aborted": 2}))
    w.send(p.Reply(cid=first.cid, data={"aborted": 1}))
    assert recv(c1).workers["a"]["data"]["aborted"] == 1 and recv(c2).workers["a"]["data"]["aborted"] == 2


# ------------------------------------------------------------------------------------- bounded in bytes

def test_pending_prompts_are_bounded_in_bytes_and_the_rest_get_busy():
    big = list(range(1 << 20))  # 1M tokens: 4 MiB
    with running_broker(max_pending_bytes=10 << 20) as (b, _):
        c = raw_client(b)
        for i in range(4):
            c.send_multipart(p.encode(p.Generate(rid=f"big{i}", sampling={}, frames=[p.pack_ids(big)])))
        err = recv(c)
        assert err.code == Busy.code and err.rid == "big2" and "budget" in err.message
        st = b.status()
        assert st["pending"] == 2 and 8 << 20 < st["held_bytes"] <= 10 << 20


def test_one_client_cannot_take_the_whole_budget():
    with running_broker(max_pending=100, max_client_bytes=3000) as (b, _):
        greedy, other = raw_client(b), raw_client(b)
        for i in range(3):
            greedy.send_multipart(p.encode(p.Generate(rid=f"g{i}", sampling={}, frames=[p.pack_ids([1] * 200)])))
        err = recv(greedy)
        assert err.code == Busy.code and "per-client" in err.message
        other.send_multipart(gen("other"))
        assert not other.poll(200)  # held, not refused
        assert b.status()["pending"] == 3


def test_aborted_pending_requests_leave_no_tombstones():
    with running_broker() as (b, _):  # max_pending=4
        c = raw_client(b)
        for i in range(100):
            c.send_multipart(gen(f"r{i}"))
            c.send_multipart(p.encode(p.Abort(cid=f"c{i}", rids=[f"r{i}"])))
            assert recv(c).CMD is p.Cmd.FINISHED  # aborted with no tokens, never a Busy
            assert recv(c).CMD is p.Cmd.REPLY
        assert b.status()["pending"] == 0 and b.held_bytes == 0


def test_frames_over_the_front_limit_drop_the_connection_not_the_memory():
    with BrokerProcess() as b:
        before = b.peak_rss()
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(b.front)
        blob = b"\0" * (100 << 20)
        s.send_multipart([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"rid": "r", "sampling": {}}),
                          *[blob] * 6], copy=False)
        time.sleep(2.0)  # 600 MB leave in well under this on loopback
        s.close()
        with Client(b.front, timeout=2) as c:
            assert c.ping("broker")["from"] == "broker"
        assert b.peak_rss() - before < 50 << 20, (before, b.peak_rss())


def test_idle_connections_cannot_exhaust_the_brokers_file_descriptors():
    low = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with BrokerProcess(preexec_fn=low) as b:
        ctx = zmq.Context()
        idle = []
        try:
            for _ in range(400):  # more than the soft limit it was started with
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(b.front)
                idle.append(s)
            time.sleep(1.0)
            with Client(b.front, timeout=5) as c:
                assert c.ping("broker")["from"] == "broker"
        finally:
            for s in idle:
                s.close()
            ctx.term()


# --------------------------------------------------------------------------- what nobody waits for ends

def test_requests_of_a_vanished_client_end_at_their_deadline():
    with running_broker() as (b, _):
        c = raw_client(b)
        for i in range(3):
            c.send_multipart(p.encode(p.Generate(rid=f"v{i}", sampling={}, timeout_s=0.3, frames=[p.pack_ids([1])])))
        c.close()  # gone, with its requests pending
        deadline = time.monotonic() + 3
        while b.status()["requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.status()["requests"] == 0 and b.held_bytes == 0


def test_a_request_past_its_deadline_is_aborted_on_its_worker_and_its_caller_told(broker):
    w = FakeWorker(broker, "a")
    c = raw_client(broker)
    c.send_multipart(p.encode(p.Generate(rid="slow", sampling={}, timeout_s=0.3, frames=[p.pack_ids([1])])))
    assert w.next().rid == "slow"
    abort = w.next(timeout=3)
    assert abort.CMD is p.Cmd.ABORT and abort.rids == ["slow"]
    err = recv(c)
    assert err.code == RequestTimeout.code and err.rid == "slow"
    assert broker.status()["workers"][0]["inflight"] == 0


# ---------------------------------------------------------------------------------- answers that lie

def test_a_result_missing_its_frames_fails_the_request_at_once(broker):
    w = FakeWorker(broker, "a")
    with Client(broker.front_address, timeout=30) as c:
        c._send(p.Generate(rid="x", sampling={}, frames=[p.pack_ids([1])]), time.monotonic() + 5)
        g = w.next()
        items = [[[{"index": 0, "text": "", "finish_reason": "stop", "logprobs": False, "tokens": 1}], 0]]
        w.send(p.Finished(worker="a", weight_version=0, rids=[g.rid], frames=[msgpack.packb(items)]))  # no ids
        t0 = time.monotonic()
        (err,) = c._recv(time.monotonic() + 5)  # it was dropped, and the call waited out its timeout
        assert time.monotonic() - t0 < 2
        assert err.CMD is p.Cmd.ERROR and err.rid == "x" and err.code == ProtocolError.code
    assert broker.status()["requests"] == 0


def test_a_batch_with_a_bad_sample_index_fails_its_requests_with_a_typed_error(broker):
    w = FakeWorker(broker, "a")
    with Client(broker.front_address, timeout=30) as c:
        import threading
        box = {}
        t = threading.Thread(target=lambda: box.update(r=_catch(c.generate, [[1], [2]], request_ids=["i0", "i1"])))
        t.start()
        gens = [w.next(), w.next()]
        items = [[[{"index": 7, "text": "", "finish_reason": "stop", "logprobs": False, "tokens": 1}], 0]] * 2
        w.send(p.Finished(worker="a", weight_version=0, rids=[g.rid for g in gens],
                          frames=[msgpack.packb(items), p.pack_ids([1, 2])]))
        t.join(5)
    assert isinstance(box["r"], ProtocolError), box  # was a raw TypeError from inside the client
    assert "indices" in str(box["r"])


def _catch(f, *a, **kw):
    try:
        return f(*a, **kw)
    except Exception as e:  # noqa: BLE001 - the test looks at what was raised
        return e


# ------------------------------------------------------------------------------------------ dead peers

def test_a_worker_whose_connection_drops_fails_its_requests_within_a_second():
    with running_broker() as (b, _):  # liveness is 1 s here: bound far below it with a long one
        b.liveness = 100
        w = FakeWorker(b, "a")
        c = raw_client(b)
        c.send_multipart(gen("held"))
        w.next()
        t0 = time.monotonic()
        w.sock.close()
        err = recv(c, timeout=5)
        assert err.code == WorkerLost.code and err.rid == "held" and "connection dropped" in err.message
        assert time.monotonic() - t0 < 1.0


# ---------------------------------------------------------------------------------------------- client

def test_a_calls_timeout_bounds_reaching_the_broker_too():
    with BrokerProcess() as b:
        address = b.front
    with Client(address, timeout=1.0) as c:  # nothing listens there any more
        t0 = time.monotonic()
        with pytest.raises(BrokerUnreachable):
            c.generate([[1, 2]], max_tokens=2)
        assert time.monotonic() - t0 < 1.5


def test_calls_in_flight_end_at_once_when_the_broker_goes_and_the_client_works_again_after():
    with BrokerProcess() as b:
        front, back = b.front, b.back
        with Client(front, timeout=60) as c:
            import threading
            box = {}
            t = threading.Thread(target=lambda: box.update(r=_catch(c.generate, [[1, 2]], max_tokens=2)))
            t.start()
            time.sleep(0.5)  # the request waits at the broker: no worker
            t0 = time.monotonic()
            b.proc.kill()
            t.join(10)
            assert isinstance(box["r"], BrokerUnreachable), box
            assert time.monotonic() - t0 < 2
            with BrokerProcess(front=front, back=back) as again:
                assert again.front == front
                assert c.ping("broker", timeout=10)["from"] == "broker"
