"""The worker's rule for an update of a worker whose ranks use several GPUs, isolated: one part per GPU,
each from its own trainer process, joined into one update that commits when every part has ended (the same
against real vLLM on two GPUs is test_gpu_multi.py's, which CI cannot run). The engine here only records
what it is asked; the worker around WeightUpdates is the few attributes it uses."""
import asyncio

import pytest

from rolloutd import protocol as p
from rolloutd.errors import BadRequest, Busy
from rolloutd.weight_updates import WeightUpdates

GPUS = ["GPU-a", "GPU-b"]
MANIFEST = [["w", "float32", [2]]]


class RecordingEngine:
    def __init__(self):
        self.calls: list[tuple] = []

    async def collective_rpc(self, method, args=()):
        self.calls.append((method, *args))
        return [{"rank": i} for i in range(len(GPUS))]

    async def reset_prefix_cache(self):
        return True


class TwoGpuWorker:
    id = "w0"
    devices = GPUS
    paused = None
    sleeping = 0
    weight_version = 0

    def __init__(self):
        self.engine = RecordingEngine()
        self.pauses: list[str] = []

    async def pause(self, mode, refuse):
        self.paused = mode
        self.pauses.append(mode)

    async def resume(self):
        self.paused = None

    async def fail_all(self, err):
        pass


def begin(part: str, device: str, version: int = 1, timeout_s: float = 30.0, **kw) -> p.LoadWeights:
    return p.LoadWeights(cid=f"c-{part}", update=part, version=version, source="cuda_ipc", device=device,
                         manifest=kw.pop("manifest", MANIFEST), timeout_s=timeout_s, atomic=False, **kw)


def bucket(part: str, device: str) -> p.WeightsBucket:
    return p.WeightsBucket(cid=f"b-{part}", update=part, index=0, buffer={device: {"kind": "cuda_ipc", "id": part}},
                           tensors=[["w", "float32", [2], 0]])


def end(part: str, commit: bool = True) -> p.WeightsEnd:
    return p.WeightsEnd(cid=f"e-{part}", update=part, commit=commit)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_one_part_per_gpu_joins_one_update_that_commits_once_every_part_has_ended():
    async def main():
        w = TwoGpuWorker()
        u = WeightUpdates(w)
        await u.begin(begin("pa", "GPU-a"))
        assert (await u.begin(begin("pb", "GPU-b")))["joined"] == "pa"
        await u.bucket(bucket("pb", "GPU-b"))
        await u.bucket(bucket("pa", "GPU-a"))
        first = asyncio.create_task(u.end(end("pa")))
        await asyncio.sleep(0.05)
        assert not first.done() and w.weight_version == 0  # the other GPU's trainer has not ended yet
        second = await u.end(end("pb"))
        assert (await first) == second and second["weight_version"] == 1 and w.weight_version == 1
        methods = [(c[0], c[1]) for c in w.engine.calls]
        # the ranks know the update by its first part's id, begin once and commit once
        assert methods == [("rolloutd_weights_begin", "pa"), ("rolloutd_weights_load", "pa"),
                           ("rolloutd_weights_load", "pa"), ("rolloutd_weights_end", "pa")]
        assert w.pauses == ["wait"] and w.paused is None and u.open is None
    run(main())


def test_a_part_from_a_gpu_the_worker_has_no_rank_on_is_refused():
    async def main():
        u = WeightUpdates(TwoGpuWorker())
        with pytest.raises(BadRequest, match="no engine rank on GPU-c"):
            await u.begin(begin("pa", "GPU-c"))
    run(main())


@pytest.mark.parametrize("second", [begin("pb", "GPU-a"), begin("pb", "GPU-b", version=2)],
                         ids=["same-gpu-again", "other-version"])
def test_a_second_update_while_one_is_open_is_busy(second):
    async def main():
        u = WeightUpdates(TwoGpuWorker())
        await u.begin(begin("pa", "GPU-a"))
        with pytest.raises(Busy):
            await u.begin(second)
    run(main())


def test_parts_that_send_other_tensors_are_refused():
    async def main():
        u = WeightUpdates(TwoGpuWorker())
        await u.begin(begin("pa", "GPU-a"))
        with pytest.raises(BadRequest, match="same names"):
            await u.begin(begin("pb", "GPU-b", manifest=[["w", "float32", [3]]]))
    run(main())


def test_a_part_that_drops_fails_the_part_waiting_for_it_and_nothing_is_published():
    async def main():
        w = TwoGpuWorker()
        u = WeightUpdates(w)
        await u.begin(begin("pa", "GPU-a"))
        await u.begin(begin("pb", "GPU-b"))
        waiting = asyncio.create_task(u.end(end("pa")))
        await asyncio.sleep(0.05)
        await u.end(end("pb", commit=False))
        with pytest.raises(BadRequest, match="dropped"):
            await waiting
        assert w.weight_version == 0 and u.open is None
        assert ("rolloutd_weights_end", "pa", False) in w.engine.calls
        assert ("rolloutd_weights_end", "pa", True) not in w.engine.calls
    run(main())


def test_a_gpu_whose_trainer_never_comes_drops_the_update_at_its_deadline_saying_which():
    async def main():
        w = TwoGpuWorker()
        u = WeightUpdates(w)
        await u.begin(begin("pa", "GPU-a", timeout_s=0.2))
        with pytest.raises(BadRequest, match=r"no trainer on \['GPU-b'\] joined it"):
            await u.end(p.WeightsEnd(cid="e-pa", update="pa", commit=True, timeout_s=0.2))
        assert w.weight_version == 0 and u.open is None
    run(main())
