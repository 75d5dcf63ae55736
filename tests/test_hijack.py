"""hijack/ on its own: the version gate, and a receiver's checks of a buffer handle before it opens
anything (the weight path itself runs on real vLLM in test_weights.py and test_gpu_weights.py)."""
import os
import socket

import pytest

from rolloutd import weights
from rolloutd.hijack import versions
from rolloutd.hijack.receive import Receiver, Refused


def test_vllm_versions_are_gated_in_one_place():
    assert versions.refusal("0.32.0+cpu") is None and versions.refusal("0.26.0") is None
    assert versions.refusal("0.29.1rc2.dev7+g1234") is None
    assert "outside" in versions.refusal("0.25.2") and "outside" in versions.refusal("1.0.0")
    assert "cannot read" in versions.refusal("nightly")


@pytest.mark.parametrize("name", ["../etc/passwd", "rolloutd-a/../../x", "other-1-abc", "rolloutd-" + "x" * 300, 7])
def test_a_shared_memory_handle_names_only_rolloutd_files(name):
    with pytest.raises(Refused, match="names match"):
        Receiver(None)._open_shm({"kind": "shm", "id": "1-a", "name": name, "size": 256, "host": ""})


def test_a_shared_memory_handle_from_another_host_or_of_the_wrong_size_is_refused():
    buf = weights.ShmBuffer(4096)
    try:
        rx = Receiver(None)
        with pytest.raises(Refused, match="same host"):
            rx._open_shm({**buf.handle(), "host": "elsewhere"})
        with pytest.raises(Refused, match="the handle says"):
            rx._open_shm({**buf.handle(), "size": 8192})
        view, _, path = rx._open_shm(buf.handle())
        buf.tensor[:4] = 7
        assert view[:4].tolist() == [7] * 4 and path == buf.path  # the same memory, not a copy
        assert buf.handle()["host"] == socket.gethostname()
    finally:
        buf.close()
    assert not os.path.exists(buf.path)


def test_buckets_keep_order_align_offsets_and_give_a_big_tensor_its_own():
    import torch

    named = [("a", torch.zeros(10, dtype=torch.bfloat16)), ("b", torch.zeros(3, dtype=torch.float32)),
             ("big", torch.zeros(1000, dtype=torch.float32)), ("c", torch.zeros(0, dtype=torch.bfloat16))]
    buckets = weights.plan(named, bucket_bytes=1024)
    assert [[n for n, _, _ in b.entries] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    assert [off for _, _, off in buckets[0].entries] == [0, weights.ALIGN]
    assert buckets[1].nbytes >= 4000  # the big tensor alone, over the bucket size: the buffers grow to it


def test_a_staging_buffer_takes_bf16_non_contiguous_empty_and_scalar_tensors_and_the_receiver_sees_them():
    import torch

    buf = weights.ShmBuffer(4096)
    try:
        cases = [(256, torch.arange(10, dtype=torch.bfloat16)),
                 (512, torch.arange(12, dtype=torch.float32).reshape(3, 4).t()),  # non-contiguous
                 (1024, torch.zeros(0, 5, dtype=torch.bfloat16)), (2048, torch.tensor(3.5))]
        for off, t in cases:
            buf.put(off, t)
        view, _, _ = Receiver(None)._open_shm(buf.handle())
        for off, t in cases:
            n = t.numel() * t.element_size()
            assert torch.equal(view[off:off + n].view(t.dtype).view(t.shape), t)
    finally:
        buf.close()
