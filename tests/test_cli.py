"""The command line's own rules (no engine): what `up` hands on to its workers."""
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

