"""`rolloutd bench`, the three-way harness (perf/bench.py), end to end on real engines: one trial of a
workload and of the round trip on each side, in-process vLLM, rolloutd and Ray. The harness itself refuses a
run whose sides give different greedy answers or a token count other than the workload's."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray")


@pytest.mark.timeout(1200)
def test_three_sides_run_the_same_engines_and_every_figure_is_written(tmp_path):
    env = dict(os.environ, BENCH_RESULTS=str(tmp_path), BENCH_TAG="test", RAY_USAGE_STATS_ENABLED="0")
    run = subprocess.run([sys.executable, "-m", "rolloutd.cli", "bench", "--repeat", "1", "--size", "cpu",
                          "--workloads", "short,roundtrip", "--pings", "100"],
                         env=env, capture_output=True, text=True, timeout=1100)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp_path / "bench-test.json").read_text())
    assert [len(ids) for ids in r["greedy_equal_on_every_side"]] == [16] * 4
    short = r["summary"]["short"]
    assert set(short["sides"]) == {"inprocess", "rolloutd", "ray"}
    for side in short["sides"].values():
        assert side["tokens_per_s"] > 0 and 0 < side["latency_p50_ms"] <= side["latency_p99_ms"]
    assert set(short["ratios"]) == {"rolloutd_over_inprocess", "ray_over_inprocess", "rolloutd_over_ray"}
    trips = r["trials"]["roundtrip"]
    assert set(trips) == {"raw_pyzmq", "rolloutd", "ray"}  # nothing to time in-process
    assert all(len(t[0]["samples_us"]) == 100 for t in trips.values())
    assert r["summary"]["roundtrip"]["ratios"]["rolloutd_over_raw_pyzmq"] > 0
    md = (tmp_path / "bench-test.md").read_text()
    assert "rolloutd / in-process" in md and "raw pyzmq" in md and r["commit"] in md
