"""The command line's own rules: what `up` hands on to its workers, and a newcomer's mistakes (issue 14),
each one line on stderr, exit code 2, within a second of its own."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from rolloutd import cli


def test_every_worker_option_of_up_reaches_its_workers_unchanged():
    argv = ["up", "--model", "tiny", "--tp", "2", "--max-model-len", "300", "--max-num-seqs", "7",
            "--gpu-memory-utilization", "0.3", "--kv-cache-gb", "0.5", "--dtype", "float32", "--seed", "3",
            "--enforce-eager", "--enable-sleep-mode", "--engine-arg", "a=1", "--engine-arg", "b=x",
            "--heartbeat-s", "0.5", "--drain-s", "4", "--capacity", "9"]
    up = cli.build_parser().parse_args(argv)
    worker = cli.build_parser().parse_args(["worker", *cli._passthrough(up, up.forward)])
    # every option a worker takes and `up` also declares, the same value on both sides
    shared = {a.dest for a in up.forward}
    assert {"model", "tensor_parallel_size", "enforce_eager", "engine_arg", "drain_s", "capacity"} <= shared
    assert {d: getattr(worker, d) for d in shared} == {d: getattr(up, d) for d in shared}


def test_up_hands_on_nothing_that_is_not_set():
    up = cli.build_parser().parse_args(["up", "--model", "tiny"])
    argv = cli._passthrough(up, up.forward)
    assert "--enforce-eager" not in argv and "--max-model-len" not in argv and "--engine-arg" not in argv



# ------------------------------------------------------------------- a newcomer's mistakes: one line, at once

def run_cli(*args, env=None, timeout=120):
    """`rolloutd ARGS` in a subprocess: (exit code, stderr's first line, seconds taken)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rolloutd.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    return r.returncode, lines[0] if lines else "", time.monotonic() - t0


@pytest.mark.parametrize("args,first_line", [
    (["up", "--model", "/path/that/does/not/exist"],
     "rolloutd up: --model /path/that/does/not/exist: no such folder; built-in models: smollm2, tiny"),
    (["up", "--model", "tinny"], "rolloutd up: --model tinny: not a built-in model nor a folder; did you mean tiny?"),
    (["worker", "--model", "smollm"],
     "rolloutd worker: --model smollm: not a built-in model nor a folder; did you mean smollm2?"),
    (["up", "--model", "tiny", "--kv-cache-gb", "1", "--gpu-memory-utilization", "0.5"],
     "rolloutd up: --kv-cache-gb and --gpu-memory-utilization both size the KV cache: give one"),
    (["broker", "--front", "localhost:5555"],
     "rolloutd broker: localhost:5555 (from --front) is not an address: write tcp://HOST:PORT"),
])
def test_mistakes_before_anything_starts_get_one_line_and_exit_2(args, first_line):
    code, line, took = run_cli(*args)
    assert (code, line) == (2, first_line)
    assert took < 3.0  # a second of its own; the rest is Python starting on a loaded machine


def test_an_hf_folder_without_config_is_named(tmp_path):
    code, line, _ = run_cli("up", "--model", str(tmp_path))
    assert (code, line) == (2, f"rolloutd up: --model {tmp_path}: the folder has no config.json "
                               "(is it a Hugging Face model folder?)")


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU is here")
def test_sleep_mode_on_a_cpu_machine_is_refused():
    code, line, _ = run_cli("up", "--model", "tiny", "--enable-sleep-mode")
    assert (code, line) == (2, "rolloutd up: --enable-sleep-mode needs a GPU: vLLM cannot sleep on CPU")


@pytest.mark.parametrize("cmd,flag,env", [("broker", "--front", None), ("broker", None, "ROLLOUTD_BACK"),
                                          ("up", "--back", None)])
def test_a_port_in_use_names_the_address_and_what_set_it(cmd, flag, env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        args = [cmd, "--model", "tiny"] if cmd == "up" else [cmd]
        code, line, took = run_cli(*args, *([flag, addr] if flag else []), env={env: addr} if env else None)
    source = flag or f"${env}"
    assert (code, line) == (2, f"rolloutd {cmd}: {addr} is in use (set by {source}): another rolloutd may be "
                               "running there; stop it or choose another port")
    assert took < 3.0


@pytest.mark.parametrize("how", ["flag", "env", "default"])
def test_no_broker_names_the_address_where_it_came_from_and_what_to_run(how):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"  # nothing listens: bound, never listening
        args, env, source = {"flag": (["--address", addr], None, "--address"),
                             "env": ([], {"ROLLOUTD_ADDRESS": addr}, "$ROLLOUTD_ADDRESS"),
                             "default": ([], {"ROLLOUTD_ADDRESS": ""}, "the default")}[how]
        if how == "default":
            addr = "tcp://127.0.0.1:5555"
        code, line, took = run_cli("status", "--timeout", "1", *args, env=env)
    assert (code, line) == (2, f"rolloutd status: no broker answers at {addr} (from {source}); start one with "
                               "`rolloutd up`, or point --address or $ROLLOUTD_ADDRESS at a running one")
    assert took < 4.0  # --timeout 1 bounds the wait


@pytest.mark.slow
def test_an_engine_that_cannot_start_stops_up_with_its_reason_in_one_line(tmp_path):
    from rolloutd.models import prepare

    model = tmp_path / "model"
    shutil.copytree(prepare("tiny"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    r = subprocess.run([sys.executable, "-m", "rolloutd.cli", "up", "--model", str(model), "--workers", "1",
                        "--front", f"ipc://{tmp_path}/front", "--back", f"ipc://{tmp_path}/back"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr[-3000:]
    reasons = [line for line in r.stderr.splitlines() if "the vLLM engine did not start" in line]
    assert len(reasons) == 1 and "FooForCausalLM" in reasons[0] and "full log: " in reasons[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
