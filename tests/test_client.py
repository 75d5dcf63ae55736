"""Client-side rules that need no engine: typed errors for a missing broker and for bad input."""
import asyncio
import time

import pytest

from rolloutd import AsyncClient, BadRequest, BrokerUnreachable, Client
from rolloutd.testing import nothing_listens


@pytest.fixture(scope="module")
def nobody():
    """An address where nothing listens: a port held bound, never listening, while these tests run."""
    with nothing_listens() as address:
        yield address


def test_generate_without_a_broker_raises_broker_unreachable_quickly(nobody):
    with Client(nobody, timeout=30, connect_timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnreachable):
            c.generate([[1, 2, 3]], max_tokens=4)
        assert time.monotonic() - t0 < 5


def test_status_without_a_broker_raises_broker_unreachable(nobody):
    with Client(nobody, connect_timeout=0.5) as c:
        with pytest.raises(BrokerUnreachable):
            c.status(timeout=0.5)


def test_async_generate_without_a_broker_raises_broker_unreachable(nobody):
    async def main():
        async with AsyncClient(nobody, timeout=30, connect_timeout=0.5) as c:
            await c.generate([[1, 2, 3]], max_tokens=4)
    with pytest.raises(BrokerUnreachable):
        asyncio.run(main())


@pytest.mark.parametrize("prompts,match", [
    ("a bare string", "list of prompts"),
    ([1, 2, 3], "list of prompts"),
    ([3.5], "a prompt is"),
    ([[]], "a prompt is"),
    ([[{"role": "user"}]], "role"),
])
def test_bad_prompts_are_refused_before_sending(prompts, match, nobody):
    with Client(nobody, connect_timeout=0.5) as c:
        with pytest.raises(BadRequest, match=match):
            c.generate(prompts)


def test_bad_sampling_is_refused_before_sending(nobody):
    with Client(nobody, connect_timeout=0.5) as c:
        with pytest.raises(BadRequest, match="temperature"):
            c.generate([[1]], temperature=-1)
        with pytest.raises(BadRequest, match="2 prompts but 1 request ids"):
            c.generate([[1], [2]], request_ids=["a"])
        with pytest.raises(BadRequest, match="repeat"):
            c.generate([[1], [2]], request_ids=["a", "a"])
