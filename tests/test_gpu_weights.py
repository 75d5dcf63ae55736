"""Weight updates through CUDA IPC, on the lent H100 (perf/results/gpu-tests-h100.log): this test process is
the trainer, with its tensors on the GPU; the daemon's worker on the same GPU loads them, and then decodes
as HF transformers does with those weights. A sleeping worker refuses an update unless asked to wake, and
a trainer that runs PyTorch's expandable segments still shares its buffers. The 8B shape is measured and
read back in perf/bench_weights.py."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from rolloutd import Client, Paused  # noqa: E402
from rolloutd.models import prepare  # noqa: E402

from .conftest import Daemon  # noqa: E402
from .test_weights import PROMPTS, TOKENS, perturbed  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ENGINE = ("--enforce-eager", "--gpu-memory-utilization", "0.3", "--dtype", "float32", "--enable-sleep-mode")


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("gpu-weights") / "up.log", workers=1, extra=("--drain-s", "2", *ENGINE))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def original():
    from safetensors.torch import load_file

    return {k: v.float().cuda() for k, v in load_file(os.path.join(prepare("tiny"), "model.safetensors")).items()}


def hf_greedy(state: dict) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(prepare("tiny"), dtype=torch.float32).eval()
    model.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return [model.generate(torch.tensor([pr]), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                               do_sample=False)[0, len(pr):].tolist() for pr in PROMPTS]


def served(c: Client) -> tuple[list[list[int]], set]:
    res = c.generate(PROMPTS, max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.0)
    return [r.token_ids for r in res], {r.weight_version for r in res}


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "direct"])
def test_cuda_ipc_update_serves_exactly_the_new_weights(gpu_daemon, original, atomic):
    with Client(gpu_daemon.front, timeout=300) as c:
        (w,) = c.status()["workers"]
        assert "cuda_ipc" in w["transports"]
        for version in (1, 2):
            new = perturbed(original, seed=version + 10 * atomic)
            assert next(iter(new.values())).is_cuda
            out = c.update_weights(new, version, bucket_bytes=256 << 10, atomic=atomic)
            assert out[w["id"]]["weight_version"] == version
            tokens, seen = served(c)
            assert seen == {version}
            assert tokens == hf_greedy(new)
            read = c.read_weights(["model.norm.weight", "lm_head.weight"], count=16)[w["id"]][0]
            for name in ("model.norm.weight", "lm_head.weight"):
                assert read[name]["head"] == new[name].flatten()[:16].tolist()


def test_an_update_to_a_sleeping_worker_is_refused_unless_it_may_wake(gpu_daemon, original):
    with Client(gpu_daemon.front, timeout=300) as c:
        new = perturbed(original, seed=50)
        assert c.sleep(1).ok
        with pytest.raises(Paused, match="asleep"):
            c.update_weights(new, 50)
        c.update_weights(new, 51, wake=True)
        tokens, seen = served(c)
        assert seen == {51} and tokens == hf_greedy(new)


TRAINER = """
import os, sys, torch
from safetensors.torch import load_file
from rolloutd import Client
state = {k: v.float().cuda() * 1.01 for k, v in load_file(sys.argv[2]).items()}
with Client(sys.argv[1], timeout=120) as c:
    out = c.update_weights(state, 60, bucket_bytes=256 << 10)
print(sorted(v["weight_version"] for v in out.values()))
"""


def test_a_trainer_with_expandable_segments_still_shares_its_buffers(gpu_daemon):
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    out = subprocess.run([sys.executable, "-c", TRAINER, gpu_daemon.front,
                          os.path.join(prepare("tiny"), "model.safetensors")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[60]"
