"""The codec: round trips of every message kind, and a clear error for each way a message can be wrong."""
import struct

import msgpack
import numpy as np
import pytest

from rolloutd import protocol as p
from rolloutd.errors import BadRequest, ProtocolError
from rolloutd.results import from_finished


def roundtrip(msg):
    return p.decode(p.encode(msg), p.ANY)


def test_every_command_has_a_message_class():
    assert {c.CMD for c in p._BY_CMD.values()} == set(p.Cmd)


def test_generate_with_token_ids_roundtrip():
    ids = np.arange(1000, dtype=np.int64) * 7
    m = roundtrip(p.Generate(rid="r1", sampling={"n": 4, "temperature": 1, "max_tokens": 8},
                             frames=[p.pack_ids(ids)]))
    assert isinstance(m, p.Generate)
    assert m.rid == "r1" and m.n == 4 and m.prompt is None
    assert m.sampling["temperature"] == 1.0 and isinstance(m.sampling["temperature"], float)
    assert p.unpack_ids(m.frames[0]) == ids.tolist()


def test_token_ids_travel_as_int32_bytes_not_msgpack_lists():
    frames = p.encode(p.Generate(rid="r", sampling={}, frames=[p.pack_ids([1, 2, 3])]))
    assert frames[0] == p.TAG + bytes([p.Cmd.GENERATE])
    assert frames[2] == np.array([1, 2, 3], dtype="<i4").tobytes()


def test_chat_and_text_prompts_roundtrip():
    chat = [{"role": "user", "content": "hi"}]
    assert roundtrip(p.Generate(rid="a", sampling={}, prompt=chat)).prompt == chat
    assert roundtrip(p.Generate(rid="b", sampling={}, prompt="hello")).prompt == "hello"


def test_finished_roundtrip_with_logprobs_and_an_empty_sample():
    m = roundtrip(p.Finished.pack("w0", 3, [("r", 4, [(0, "ab", "stop", [5, 6], [-0.5, -1.25]),
                                                       (1, "", "abort", [], None)])]))
    m.check_frames()
    (r,) = from_finished(m)
    assert (r.request_id, r.weight_version, r.worker, r.prompt_tokens) == ("r", 3, "w0", 4)
    assert [(s.index, s.text, s.finish_reason, s.token_ids, s.logprobs) for s in r.samples] == \
        [(0, "ab", "stop", [5, 6], [-0.5, -1.25]), (1, "", "abort", [], None)]


def test_control_messages_roundtrip():
    for msg in [p.Abort(cid="c", rids=["a", "b"]), p.AbortAll(cid="c"), p.Sleep(cid="c", level=2),
                p.Wake(cid="c", tags=["weights"]), p.Pause(cid="c", mode="keep"), p.Resume(cid="c"),
                p.Status(cid="c"), p.Ping(cid="c", target="broker"), p.Reply(cid="c", data={"x": [1]}),
                p.Error(code="busy", message="full", rid="r"), p.Heartbeat(inflight=3), p.Disconnect(reason="x"),
                p.LoadWeights(cid="c", update="u", version=2, source="path", path="/x"),
                p.LoadWeights(cid="c", update="u", version=2, source="shm", workers=["w0"], pause="abort",
                              manifest=[["a.weight", "bfloat16", [4, 8]], ["b", "int64", []]], atomic=False),
                p.WeightsBucket(cid="c", update="u", index=1, buffer={"host": {"kind": "shm", "id": "1-a"}},
                                tensors=[["a.weight", "bfloat16", [4, 8], 256]]),
                p.WeightsEnd(cid="c", update="u", commit=True, workers=["w0", "w1"]),
                p.Ready(worker="w", model="m", devices=["cpu"], capacity=8, weight_version=0,
                        transports=["path"], pid=1, engine={"vllm": "0.32.0"}, host="h")]:
        assert roundtrip(msg) == msg


@pytest.mark.parametrize("bad, field", [
    (dict(manifest=[["a", "complex64", [1]]]), "manifest"),  # a dtype that is not carried
    (dict(manifest=[["a", "bfloat16", [-1]]]), "manifest"),
    (dict(manifest=[["a", "bfloat16", [1] * 9]]), "manifest"),  # too many dimensions
    (dict(manifest=[["", "bfloat16", [1]]]), "manifest"),
    (dict(manifest=[["a", "bfloat16"]]), "manifest"),
    (dict(version=-1), "version"),
    (dict(timeout_s=0), "timeout_s"),
    (dict(pause="later"), "pause"),
    (dict(workers=[""]), "workers"),
])
def test_weight_update_fields_are_checked(bad, field):
    good = dict(cid="c", update="u", version=1, source="shm")
    with pytest.raises(ProtocolError, match=f"LoadWeights.{field} must be"):
        p.decode(p.encode(p.LoadWeights(**{**good, **bad})), p.ANY)


def test_a_bucket_needs_a_buffer_and_offsets():
    good = dict(cid="c", update="u", index=0, buffer={"host": {}}, tensors=[["a", "bfloat16", [2], 0]])
    for bad, field in [(dict(buffer={}), "buffer"), (dict(buffer={"host": 3}), "buffer"),
                       (dict(tensors=[["a", "bfloat16", [2]]]), "tensors"),
                       (dict(tensors=[["a", "bfloat16", [2], -256]]), "tensors")]:
        with pytest.raises(ProtocolError, match=f"WeightsBucket.{field} must be"):
            p.decode(p.encode(p.WeightsBucket(**{**good, **bad})), p.ANY)


def test_wrong_tag_is_named():
    frames = p.encode(p.Status(cid="c"))
    frames[0] = b"XXXX" + frames[0][4:]
    with pytest.raises(ProtocolError, match="bad protocol tag"):
        p.decode(frames, p.ANY)


@pytest.mark.parametrize("frames,match", [
    ([], "at least 2 frames"),
    ([b"garbage"], "at least 2 frames"),
    ([b"\x00\x01", b"x"], "bad protocol tag"),
    ([p.TAG + b"\xff", msgpack.packb({})], "unknown command byte"),
    ([p.TAG + bytes([p.Cmd.STATUS]), b"\xc1\xc1"], "not valid msgpack"),
    ([p.TAG + bytes([p.Cmd.STATUS]), msgpack.packb([1, 2])], "must be a map"),
    ([p.TAG + bytes([p.Cmd.STATUS]), msgpack.packb({})], "missing field `cid`"),
    ([p.TAG + bytes([p.Cmd.STATUS]), msgpack.packb({"cid": 5})], "Status.cid must be str"),
    ([p.TAG + bytes([p.Cmd.STATUS]), msgpack.packb({"cid": "c", "zzz": 1})], "unknown field"),
    ([p.TAG + bytes([p.Cmd.ABORT]), msgpack.packb({"cid": "c", "rids": ["a", 3]})], "Abort.rids must be"),
    ([p.TAG + bytes([p.Cmd.STATUS]), b"\x00" * (p.MAX_HEADER_BYTES + 1)], "over the limit"),
    ([p.TAG + bytes([p.Cmd.STATUS])] + [b""] * 3, "Status carries at most 0 bulk frames"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"rid": "r", "sampling": {}}), b"abc"], "whole number of int32"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"rid": "r", "sampling": {}})], "exactly one frame"),
    ([p.TAG + bytes([p.Cmd.GENERATE]), msgpack.packb({"rid": "", "sampling": {}, "prompt": "x"})], "rid must be"),
])
def test_malformed_messages_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode(frames, p.ANY)


@pytest.mark.parametrize("sampling,match", [
    ({"n": 0}, "`n` must be"),
    ({"temperature": -1}, "`temperature`"),
    ({"top_p": 0}, "`top_p`"),
    ({"max_tokens": "many"}, "`max_tokens`"),
    ({"ignore_eos": 1}, "`ignore_eos`"),
    ({"n": True}, "`n`"),
    ({"bogus": 1}, "unknown sampling option `bogus`"),
])
def test_bad_sampling_is_a_bad_request(sampling, match):
    with pytest.raises(BadRequest, match=match):
        p.decode(p.encode(p.Generate(rid="r", sampling=sampling, prompt="hi")), p.ANY)


def test_sampling_normalises_stop_string_and_drops_none():
    assert p.check_sampling({"stop": "x", "seed": None, "top_p": 1}) == {"stop": ["x"], "top_p": 1.0}


@pytest.mark.parametrize("prompt", ["", [], [{"role": "user"}], [{"role": 1, "content": "x"}]])
def test_bad_prompts_are_bad_requests(prompt):
    with pytest.raises(BadRequest):
        p.decode(p.encode(p.Generate(rid="r", sampling={}, prompt=prompt)), p.ANY)


def test_empty_token_prompt_is_a_bad_request():
    with pytest.raises(BadRequest, match="empty prompt"):
        p.decode(p.encode(p.Generate(rid="r", sampling={}, frames=[b""])), p.ANY)


def test_finished_frames_must_add_up_but_the_broker_can_forward_without_reading_them():
    m = p.Finished.pack("w", 0, [("r", 0, [(0, "", "stop", [1], [-0.5])])])
    m.frames = m.frames[:2]  # the logprobs frame lost
    with pytest.raises(ProtocolError, match="need 3 frames"):
        p.decode(p.encode(m), p.ANY)
    assert p.decode(p.encode(m), p.ANY, check_frames=False).rids == ["r"]


def test_finished_packs_any_number_of_requests_in_a_few_frames_and_selects_some():
    ended = [("a", 3, [(0, "a", "abort", [1, 2], None)]), ("b", 3, [(0, "b", "abort", [3], [-0.5])]),
             ("c", 3, [(0, "c", "abort", [], None)])]
    batch = roundtrip(p.Finished.pack("w", 2, ended))
    batch.check_frames()
    # every sample's ids in one frame, the logprobs in another, whatever the count
    assert batch.rids == ["a", "b", "c"] and len(batch.frames) == 3
    assert p.unpack_ids(batch.frames[1]) == [1, 2, 3]
    some = roundtrip(batch.select({"b", "c"}))
    some.check_frames()
    assert [(r.request_id, r.token_ids, r.logprobs) for r in from_finished(some)] == [("b", [3], [-0.5]), ("c", [], None)]
    assert batch.select({"zzz"}) is None


def test_finished_may_carry_more_text_than_a_command_header():
    text = "x" * (p.MAX_HEADER_BYTES + 10)  # 16 samples of a long chain of thought
    m = roundtrip(p.Finished.pack("w", 0, [("r", 0, [(0, text, "stop", [1], None)])]))
    assert from_finished(m)[0].text == text
    with pytest.raises(ProtocolError, match="over the limit"):
        p.decode(p.encode(p.Status(cid="x" * (p.MAX_HEADER_BYTES + 10))), p.ANY)


def _sample(tokens=1, **kw):
    return {"index": 0, "text": "", "finish_reason": "stop", "tokens": tokens, **kw}


@pytest.mark.parametrize("items,frames,match", [
    ([[[_sample()], 0]], [], "need 2 frames"),
    ([[[_sample()], 0]], [p.pack_ids([1]), b""], "need 2 frames"),
    ([[[_sample(logprobs=True)], 0]], [p.pack_ids([1])], "need 3 frames"),
    ([[[_sample(2)], 0]], [p.pack_ids([1])], "count 2 token ids"),
    ([[[_sample(1, logprobs=True)], 0]], [p.pack_ids([1]), struct.pack('<2f', 1.0, 2.0)], "count 1 logprobs"),
    ([[[_sample(-1)], 0]], [b""], "token count"),
    ([[[{"index": 0, "text": "", "finish_reason": "stop"}], 0]], [b""], "token count"),
    ([[["x"], 0]], [b""], "each item is"),
    ([[[_sample()], 0], [[_sample()], 0]], [p.pack_ids([1, 2])], "1 rids need as many items"),
    (None, [b""], "not valid msgpack"),
])
def test_bad_finished_messages_are_protocol_errors(items, frames, match):
    packed = [b"\xc1"] if items is None else [msgpack.packb(items)]
    with pytest.raises(ProtocolError, match=match):
        p.decode(p.encode(p.Finished(worker="w", weight_version=0, rids=["a"], frames=packed + frames)), p.ANY)


def test_the_engines_sample_states_reach_the_client_as_they_were():
    from rolloutd import engine as eng

    def state(ids, text, reason, lps=None):
        st = eng.SampleState()
        st.ids, st.text, st.finish_reason, st.lps = ids, text, reason, lps
        return st

    states = {0: state([5, 6, 7], "xyz", "stop", [-0.1, -0.2, -0.3]), 1: state([3], "c", "length", [-1.0, -2.0])}
    ended = [("b", 2, eng.samples_of(states, 3, True)), ("c", 1, eng.samples_of({}, 1, False))]
    got = from_finished(roundtrip(p.Finished.pack("w", 3, ended)))
    assert [(s.token_ids, s.text, s.finish_reason) for s in got[0].samples] == \
        [([5, 6, 7], "xyz", "stop"), ([3], "c", "length"), ([], "", "abort")]  # sample 2 never produced output
    assert got[0].samples[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert got[0].samples[1].logprobs is None  # two logprobs for one token: not sent
    assert got[1].samples[0].finish_reason == "abort" and got[1].prompt_tokens == 1


def test_headers_nested_too_deep_are_refused_and_named_without_recursion():
    # {"cid": "c", "x": [[[...[nil]...]]]}, 1000 deep: more than msgpack's packer or repr can take again
    deep = b"\x82\xa3cid\xa1c\xa1x" + b"\x91" * 1000 + b"\xc0"
    with pytest.raises(ProtocolError, match="deeper than 16"):
        p.decode([p.TAG + bytes([p.Cmd.STATUS]), deep], p.ANY)
    shallow = {"cid": "c", "engine": {"a": [[1]]}}
    assert not p._too_deep(shallow)


def test_error_texts_show_any_value_briefly():
    text = p._show({"k": [[[[["x" * 1000]]]]], b"b": 1})
    assert len(text) < 200 and text.startswith("dict")



def test_headers_decode_typed_yet_exactly_as_checked_field_by_field():
    """decode takes a header through msgspec's typed decoder first (_typed_header) and falls back to the
    field-by-field checks (_checked_header) for anything off: what it gives must not depend on the path."""
    ping = p.encode(p.Ping(cid="c", target="w"))
    assert p._typed_header(p.Ping, ping[1]) == p._checked_header(p.Ping, ping[1]) == {"cid": "c", "target": "w"}
    # an int for a float field stays an int, as the checks let it
    gen = p.decode(p.encode(p.Generate(rid="r", sampling={}, prompt="hi", timeout_s=5)), p.ANY)
    assert type(gen.timeout_s) is int
    # map keys other than str/bytes: msgpack refuses them (strict_map_key), msgspec would not
    head = p.TAG + bytes([p.Cmd.REPLY])
    bad = msgpack.packb({"cid": "c", "data": {1: 2}})
    assert p._typed_header(p.Reply, bad) is None
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        p.decode([head, bad], p.ANY)
    # extension types: msgspec makes its own objects of them; the checked path keeps msgpack's, as before
    ext = msgpack.packb({"cid": "c", "data": {"x": msgpack.ExtType(5, b"e")}})
    assert p._typed_header(p.Reply, ext) is None
    assert p.decode([head, ext], p.ANY).data == {"x": msgpack.ExtType(5, b"e")}
    # a rule broken: the checked path names it
    with pytest.raises(ProtocolError, match="Ping.cid must be str, 1..128 characters"):
        p.decode([p.TAG + bytes([p.Cmd.PING]), msgpack.packb({"cid": "x" * 129})], p.ANY)
