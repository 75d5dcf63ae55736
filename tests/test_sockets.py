"""rolloutd.sockets' send and receive: what pyzmq's send_multipart and recv_multipart do, less their enum costs."""
import zmq
import pytest

from rolloutd import sockets


@pytest.fixture
def pair():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://test-sockets")
    b.connect("inproc://test-sockets")
    yield a, b
    a.close(0)
    b.close(0)


def test_send_and_recv_move_whole_messages_as_multipart_does(pair):
    a, b = pair
    sockets.send(a, [b"one", memoryview(b"two"), zmq.Frame(b"three")])
    a.send_multipart([b"x", b""])
    sockets.send(a, [b"alone"], zmq.NOBLOCK, copy=False)
    assert sockets.readable(b)
    assert sockets.recv(b, zmq.NOBLOCK) == [b"one", b"two", b"three"]
    frames = sockets.recv(b, zmq.NOBLOCK, copy=False)
    assert [f.bytes for f in frames] == [b"x", b""] and all(isinstance(f, zmq.Frame) for f in frames)
    assert b.recv_multipart() == [b"alone"]
    assert not sockets.readable(b)
    with pytest.raises(zmq.Again):
        sockets.recv(b, zmq.NOBLOCK)


def test_a_frame_that_cannot_be_sent_sends_nothing(pair):
    a, b = pair
    with pytest.raises(TypeError):
        sockets.send(a, [b"head", 12345])
    sockets.send(a, [b"next"])
    assert b.recv_multipart() == [b"next"]  # not glued to a half-sent message
