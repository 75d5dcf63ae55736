"""GPU-only paths, run on the lent H100 (see perf/results/gpu-tests.log): the worker reports its GPU UUID,
greedy through the daemon equals vLLM in-process on the GPU, vLLM sleep level 1 and wake_up through the
broker, abort all with 512 requests in flight, and a stop signal sent to every process (as systemd and
slurm do) that still drains: with one GPU, vLLM's engine-core process hosts the model itself."""
import asyncio
import time

import pytest

torch = pytest.importorskip("torch")

from rolloutd import AsyncClient, Client, Paused  # noqa: E402

from .conftest import Daemon, inprocess_greedy  # noqa: E402
from .test_lifecycle import stop_and_check  # noqa: E402
from .test_daemon import prompts  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENGINE = ("--enforce-eager", "--gpu-memory-utilization", "0.3")


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("gpu") / "up.log", workers=1,
               extra=("--drain-s", "2", "--enable-sleep-mode", *ENGINE))
    yield d
    d.stop()


def test_worker_reports_its_gpu_uuid(gpu_daemon):
    with Client(gpu_daemon.front) as c:
        (w,) = c.status()["workers"]
    assert w["devices"] == ["GPU-" + str(torch.cuda.get_device_properties(0).uuid)]


def test_greedy_through_the_daemon_equals_vllm_in_process_on_gpu(gpu_daemon, tmp_path):
    ps = prompts(4, length=9, start=11)
    sampling = {"temperature": 0.0, "max_tokens": 64, "ignore_eos": True}
    with Client(gpu_daemon.front, timeout=120) as c:
        ours = [c.generate([pr], **sampling)[0].token_ids for pr in ps]
    assert ours == inprocess_greedy(tmp_path, ps, sampling, *ENGINE)


def test_sleep_level_1_refuses_work_and_wake_restores_the_same_weights(gpu_daemon):
    with Client(gpu_daemon.front, timeout=120) as c:
        before = c.generate(prompts(2), temperature=0.0, max_tokens=32, ignore_eos=True)
        free_awake = torch.cuda.mem_get_info()[0]
        reply = c.sleep(1)
        assert reply.ok, reply
        assert torch.cuda.mem_get_info()[0] > free_awake  # the GPU memory really came back
        with pytest.raises(Paused):
            c.generate(prompts(1), max_tokens=4)
        assert c.wake_up().ok
        after = c.generate(prompts(2), temperature=0.0, max_tokens=32, ignore_eos=True)
    assert [r.token_ids for r in after] == [r.token_ids for r in before]


def abort_all_in_flight(front: str, n: int) -> tuple:
    """n long requests in flight for a second, then abort_all: its reply, the results, and how long from
    the abort until every stream had ended (s)."""
    async def main():
        async with AsyncClient(front, timeout=300) as c:
            task = asyncio.create_task(c.generate(prompts(n), max_tokens=3000, ignore_eos=True))
            await asyncio.sleep(1.0)
            t0 = time.perf_counter()
            reply = await c.abort_all()
            results = await asyncio.wait_for(task, 30)
            return reply, results, time.perf_counter() - t0
    return asyncio.run(main())


def test_abort_all_with_512_in_flight_closes_every_stream(gpu_daemon):
    reply, results, took = abort_all_in_flight(gpu_daemon.front, 512)
    assert reply.ok
    assert len(results) == 512 and all(r.finish_reason == "abort" for r in results)
    assert took < 1.0, took


def test_a_stop_signal_to_every_process_still_drains_on_gpu(tmp_path):
    stop_and_check(Daemon(tmp_path / "up.log", workers=1, extra=("--drain-s", "3", *ENGINE)), drain_s=3.0,
                   every_process=True)
