"""Two GPUs of one host, run on a lent nvidia-h200-x2 (perf/results/gpu-multi-h200x2.log): a worker per GPU,
each reporting its own GPU, sharing 512 requests, aborting them all, draining on SIGTERM; a tensor-parallel
worker over both GPUs that decodes as vLLM in-process with the same TP; and weight updates from two trainer
processes, one per GPU, into two TP=1 workers and into one TP=2 worker, each engine rank reading the trainer
on its own GPU (matched by UUID)."""
import collections
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from rolloutd import Client  # noqa: E402

from .conftest import Daemon, inprocess_greedy  # noqa: E402
from .test_daemon import prompts  # noqa: E402
from .test_gpu import abort_all_in_flight  # noqa: E402
from .test_gpu_weights import hf_greedy, served  # noqa: E402
from .test_lifecycle import stop_and_check  # noqa: E402
from .test_weights import perturbed, tiny_state  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ENGINE = ("--enforce-eager", "--gpu-memory-utilization", "0.3")
WEIGHTS_ENGINE = (*ENGINE, "--dtype", "float32")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_uuids() -> list[str]:
    return ["GPU-" + str(torch.cuda.get_device_properties(i).uuid) for i in range(2)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("two-gpus") / "up.log", workers=2, extra=("--drain-s", "2", *ENGINE))
    yield d
    d.stop()


def test_each_worker_reports_its_own_gpu(two):
    with Client(two.front) as c:
        devices = sorted(w["devices"] for w in c.status()["workers"])
    assert devices == sorted([u] for u in gpu_uuids())


def test_512_requests_are_shared_by_both_gpus(two):
    with Client(two.front, timeout=300) as c:
        res = c.generate(prompts(512), max_tokens=16, ignore_eos=True)
    per_worker = collections.Counter(r.worker for r in res)
    assert all(len(r.token_ids) == 16 for r in res)
    assert len(per_worker) == 2 and min(per_worker.values()) >= 512 // 4, per_worker


def test_abort_all_with_512_in_flight_on_two_gpus(two):
    reply, results, took = abort_all_in_flight(two.front, 512)
    assert reply.ok
    assert len(results) == 512 and all(r.finish_reason == "abort" for r in results)
    assert len({r.worker for r in results}) == 2
    assert took < 1.0, took


def test_a_stop_signal_to_every_process_drains_both_gpus(tmp_path):
    stop_and_check(Daemon(tmp_path / "up.log", workers=2, extra=("--drain-s", "3", *ENGINE)), drain_s=3.0,
                   every_process=True)


def test_a_tp2_worker_decodes_as_vllm_in_process_with_tp2(tmp_path):
    ps = prompts(4, length=9, start=11)
    sampling = {"temperature": 0.0, "max_tokens": 64, "ignore_eos": True}
    d = Daemon(tmp_path / "tp2.log", workers=1, extra=("--drain-s", "2", "--tensor-parallel-size", "2", *ENGINE))
    try:
        with Client(d.front, timeout=120) as c:
            (w,) = c.status()["workers"]
            assert w["engine"]["tensor_parallel_size"] == 2 and sorted(w["devices"]) == sorted(gpu_uuids())
            ours = [c.generate([pr], **sampling)[0].token_ids for pr in ps]
    finally:
        d.stop()
    assert ours == inprocess_greedy(tmp_path, ps, sampling, "--tensor-parallel-size", "2", *ENGINE)


TRAINER = """
import sys
from rolloutd import Client
from tests.test_weights import perturbed, tiny_state
front, seed, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
state = perturbed(tiny_state(), seed)
state = {k: v.cuda() for k, v in state.items()}
with Client(front, timeout=300) as c:
    out = c.update_weights(state, version, bucket_bytes=256 << 10, atomic=sys.argv[4] == "atomic")
print({w: r["weight_version"] for w, r in out.items()})
"""


def two_trainers(front: str, seed: int, version: int, atomic: bool) -> list[str]:
    """A trainer process on each GPU (CUDA_VISIBLE_DEVICES), both sending the same weights at once."""
    procs = [subprocess.Popen([sys.executable, "-c", TRAINER, front, str(seed), str(version),
                               "atomic" if atomic else "direct"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}) for i in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out.strip().splitlines()[-1])
    return outs


@pytest.mark.parametrize("tp", [1, 2], ids=["two-tp1-workers", "one-tp2-worker"])
def test_two_trainer_processes_one_per_gpu_update_the_engine_ranks_beside_them(tmp_path, tp):
    d = Daemon(tmp_path / "up.log", workers=2 // tp,
               extra=("--drain-s", "2", "--tensor-parallel-size", str(tp), *WEIGHTS_ENGINE))
    try:
        with Client(d.front, timeout=300) as c:
            workers = c.status()["workers"]
            for version, atomic in ((1, True), (2, False)):
                outs = two_trainers(d.front, seed=100 + version, version=version, atomic=atomic)
                # each trainer hears of the workers it reached: its GPU's worker, or the one TP=2 worker
                assert len(outs) == 2 and all(f": {version}" in o for o in outs), outs
                new = perturbed(tiny_state(), 100 + version)
                tokens, seen = served(c)
                assert seen == {version}
                assert tokens == hf_greedy(new)
                names = ["model.norm.weight", "model.embed_tokens.weight"]
                read = c.read_weights(names, count=16)
                assert len(read) == len(workers)
                for ranks in read.values():
                    assert len(ranks) == tp
                    for rank in ranks:
                        assert rank["model.norm.weight"]["head"] == new["model.norm.weight"][:16].tolist()
    finally:
        d.stop()
