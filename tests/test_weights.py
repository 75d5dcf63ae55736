"""Weight updates through the daemon, on real vLLM (CPU, the tiny model, two workers): a trainer process
hands over perturbed weights by shared memory, and both workers then decode exactly as HF transformers
does with those weights; what goes wrong (a mismatched tensor, a trainer killed half-way) leaves the
previous weights serving, or, for a direct update, a worker that refuses until a complete update lands."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rolloutd.client import Client
from rolloutd.errors import BadRequest, WeightsIncomplete
from rolloutd.models import prepare

from .conftest import STATUS_S, Daemon

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [17, 42], [300, 301, 302, 303], [64, 65, 66], [7] * 6,
           [250, 20, 2], [11, 12, 13, 14, 15, 16]]
TOKENS = 12


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """Two workers serving in float32. The random tiny model's next-token choices are near ties, which bf16
    kernels (vLLM's batched CPU ones, HF's) break differently within a dozen tokens; in float32 both sides
    decode alike unless the weights differ."""
    d = Daemon(tmp_path_factory.mktemp("daemon") / "up.log", extra=("--drain-s", "2", "--dtype", "float32"))
    yield d
    d.stop()


def tiny_state() -> dict:
    """The tiny model's tensors, in float32 (the test daemons serve float32), on the CPU."""
    return {k: v.float() for k, v in load_file(os.path.join(prepare("tiny"), "model.safetensors")).items()}


@pytest.fixture(scope="module")
def original():
    return tiny_state()


@pytest.fixture(scope="module")
def hf():
    """HF transformers' greedy tokens for a state dict: the reference the engines must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(prepare("tiny"), dtype=torch.float32).eval()

    def greedy(state: dict) -> list[list[int]]:
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            return [model.generate(torch.tensor([pr]), max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS,
                                   )[0, len(pr):].tolist() for pr in PROMPTS]
    return greedy


def perturbed(state: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g).to(v.device) for k, v in state.items()}


def served(c: Client) -> tuple[list[list[int]], set, set]:
    """Greedy tokens for PROMPTS through the daemon, the workers that served them, and their versions."""
    res = c.generate(PROMPTS, max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.0)
    return [r.token_ids for r in res], {r.worker for r in res}, {r.weight_version for r in res}


def versions(c: Client) -> dict:
    return {w["id"]: w["weight_version"] for w in c.status(timeout=STATUS_S)["workers"]}


def test_three_updates_in_a_row_serve_exactly_the_new_weights_on_both_workers(daemon, original, hf):
    with Client(daemon.front, timeout=300) as c:
        assert len(versions(c)) == 2
        for version in (1, 2, 3):
            new = perturbed(original, seed=version)
            # 256 KiB buckets: the tiny model's 0.9 MB go in several, through both buffers in turn
            out = c.update_weights(new, version, bucket_bytes=256 << 10)
            assert set(out) == set(versions(c)) and all(v["weight_version"] == version for v in out.values())
            tokens, workers, seen = served(c)
            assert len(workers) == 2, "both workers must have served some of the prompts"
            assert seen == {version}
            assert tokens == hf(new), f"v{version}: the daemon's greedy tokens differ from HF's with the same weights"
            assert set(versions(c).values()) == {version}
            # and read back through the extension: what each engine rank holds is what the trainer sent
            names = ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"]
            for ranks in c.read_weights(names, count=16).values():
                for name in names:
                    assert ranks[0][name]["head"] == new[name][:16].tolist()
                    assert ranks[0][name]["sum"] == pytest.approx(float(new[name].sum()), rel=1e-5)


@pytest.mark.parametrize("spoil, match", [
    (lambda s: {**s, "model.norm.weight": s["model.norm.weight"][:64]}, "has shape"),
    (lambda s: {**s, "model.layers.0.mlp.up_proj.weight": s["model.layers.0.mlp.up_proj.weight"].t()}, "has shape"),
    (lambda s: {**s, "model.layers.9.self_attn.q_proj.weight": s["model.layers.0.self_attn.q_proj.weight"]},
     "has no tensor"),
    (lambda s: {**s, "lm_head.weight": s["lm_head.weight"].bfloat16()}, "cast it"),
], ids=["short", "transposed", "unknown-name", "bfloat16"])
def test_a_mismatched_tensor_is_refused_and_the_old_weights_serve_on(daemon, original, hf, spoil, match):
    with Client(daemon.front, timeout=300) as c:
        base = perturbed(original, seed=10)
        c.update_weights(base, 10)
        with pytest.raises(BadRequest, match=match):
            c.update_weights(spoil(perturbed(original, seed=11)), 11)
        tokens, _, seen = served(c)
        assert seen == {10} and set(versions(c).values()) == {10}
        assert tokens == hf(base)


TRAINER = """
import os, signal, sys, torch
from safetensors.torch import load_file
from rolloutd import weights
from rolloutd.client import Client
state = load_file(sys.argv[2])
calls = 0
real_ready = weights.ShmBuffer.ready
def ready(self):  # the trainer dies packing its third bucket: the first is loaded by then (acknowledged)
    global calls
    calls += 1
    if calls == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real_ready(self)
weights.ShmBuffer.ready = ready
with Client(sys.argv[1], timeout=60) as c:
    c.update_weights(state, 99, bucket_bytes=256 << 10, atomic=sys.argv[3] == "atomic", timeout=float(sys.argv[4]))
"""


def _trainer_killed_mid_update(daemon, tmp_path, state: dict, mode: str, timeout_s: float) -> None:
    f = tmp_path / "state.safetensors"
    save_file(state, str(f))
    out = subprocess.run([sys.executable, "-c", TRAINER, daemon.front, str(f), mode, str(timeout_s)],
                         capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]


def test_a_trainer_killed_mid_update_leaves_the_old_weights_serving(daemon, original, hf, tmp_path):
    with Client(daemon.front, timeout=300) as c:
        base = perturbed(original, seed=20)
        c.update_weights(base, 20)
        before = set(os.listdir("/dev/shm"))
        _trainer_killed_mid_update(daemon, tmp_path, perturbed(original, seed=21), "atomic", 5.0)
        # Generation is paused by the update until the workers give up on the silent trainer (5 s): these
        # requests wait, then run on the old weights.
        tokens, _, seen = served(c)
        assert seen == {20} and set(versions(c).values()) == {20}
        assert tokens == hf(base)
        left = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("rolloutd-")}
        assert not left, f"the dead trainer's shared memory was not removed: {left}"


def test_a_direct_update_cut_short_refuses_requests_until_a_complete_one_lands(daemon, original, hf, tmp_path):
    with Client(daemon.front, timeout=300) as c:
        c.update_weights(perturbed(original, seed=30), 30)
        _trainer_killed_mid_update(daemon, tmp_path, perturbed(original, seed=31), "direct", 5.0)
        with pytest.raises(WeightsIncomplete):
            c.generate(PROMPTS[:2], max_tokens=4, temperature=0.0)
        new = perturbed(original, seed=32)
        c.update_weights(new, 32, atomic=False)
        tokens, workers, seen = served(c)
        assert seen == {32} and len(workers) == 2
        assert tokens == hf(new)


def test_load_weights_from_path_round_trips(daemon, original, hf, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    new = perturbed(original, seed=40)
    save_file(new, str(folder / "model.safetensors"))
    with Client(daemon.front, timeout=300) as c:
        reply = c.load_weights_from_path(str(folder), 40)
        assert reply.ok and {w.data["weight_version"] for w in reply.workers.values()} == {40}
        tokens, _, seen = served(c)
        assert seen == {40} and tokens == hf(new)
        # and back to the checkpoint the workers started from
        assert c.load_weights_from_path(prepare("tiny"), 41).ok
        tokens, _, seen = served(c)
        assert seen == {41} and tokens == hf(original)
        with pytest.raises(BadRequest, match="safetensors"):
            c.load_weights_from_path(str(tmp_path / "nothing-here"), 42)
        assert set(versions(c).values()) == {41}


def test_a_tensor_parallel_worker_takes_an_update_from_one_trainer(tmp_path, original, hf):
    """--tp 2 on CPU: both engine ranks open the same shared memory, and vLLM's load_weights gives each its
    shard; the worker then decodes as HF does with the whole new weights."""
    d = Daemon(tmp_path / "tp2.log", workers=1,
               extra=("--drain-s", "2", "--dtype", "float32", "--tensor-parallel-size", "2"))
    try:
        with Client(d.front, timeout=300) as c:
            (w,) = c.status(timeout=STATUS_S)["workers"]
            assert w["engine"]["tensor_parallel_size"] == 2
            new = perturbed(original, seed=70)
            c.update_weights(new, 70, bucket_bytes=256 << 10)
            tokens, _, seen = served(c)
            assert seen == {70} and tokens == hf(new)
            ranks = c.read_weights(["model.norm.weight"], count=8)[w["id"]]
            assert len(ranks) == 2 and all(r["model.norm.weight"]["head"] == new["model.norm.weight"][:8].tolist()
                                           for r in ranks)
    finally:
        d.stop()


def test_the_async_client_updates_too(daemon, original, hf):
    import asyncio

    from rolloutd import AsyncClient

    new = perturbed(original, seed=80)

    async def main():
        async with AsyncClient(daemon.front, timeout=300) as c:
            out = await c.update_weights(new, 80, bucket_bytes=256 << 10)
            read = await c.read_weights(["model.norm.weight"], count=4)
            return out, read
    out, read = asyncio.run(main())
    assert {v["weight_version"] for v in out.values()} == {80}
    assert all(r[0]["model.norm.weight"]["head"] == new["model.norm.weight"][:4].tolist() for r in read.values())
    with Client(daemon.front, timeout=300) as c:
        tokens, _, seen = served(c)
    assert seen == {80} and tokens == hf(new)


KILLER = """
import os, signal, sys, torch
from safetensors.torch import load_file
from rolloutd import weights
from rolloutd.client import Client
from rolloutd.errors import WorkerLost
state = load_file(sys.argv[2])
calls = 0
real_ready = weights.ShmBuffer.ready
def ready(self):  # a worker dies after the first bucket went out
    global calls
    calls += 1
    if calls == 2:
        os.kill(int(sys.argv[3]), signal.SIGKILL)
    real_ready(self)
weights.ShmBuffer.ready = ready
with Client(sys.argv[1], timeout=60) as c:
    try:
        c.update_weights(state, 99, bucket_bytes=256 << 10, timeout=30)
    except WorkerLost as e:
        print("WorkerLost:", e)
"""


def test_a_worker_killed_mid_update_fails_the_update_and_the_other_keeps_the_old_weights(tmp_path, original, hf):
    d = Daemon(tmp_path / "up.log", extra=("--drain-s", "2", "--dtype", "float32"))
    try:
        with Client(d.front, timeout=300) as c:
            base = perturbed(original, seed=90)
            c.update_weights(base, 90)
            victim = c.status(timeout=STATUS_S)["workers"][0]
            f = tmp_path / "state.safetensors"
            save_file(perturbed(original, seed=91), str(f))
            out = subprocess.run([sys.executable, "-c", KILLER, d.front, str(f), str(victim["pid"])],
                                 capture_output=True, text=True, timeout=120,
                                 cwd=os.path.dirname(os.path.dirname(__file__)))
            assert out.returncode == 0 and "WorkerLost:" in out.stdout, (out.stdout, out.stderr[-3000:])
            assert victim["id"] in out.stdout  # the error names the worker that went
            left = [w for w in c.status(timeout=STATUS_S)["workers"] if w["id"] != victim["id"]]
            assert len(left) == 1 and left[0]["weight_version"] == 90
            res = c.generate(PROMPTS, max_tokens=TOKENS, min_tokens=TOKENS, temperature=0.0)
            assert {r.worker for r in res} == {left[0]["id"]} and {r.weight_version for r in res} == {90}
            assert [r.token_ids for r in res] == hf(base)
    finally:
        d.stop()
