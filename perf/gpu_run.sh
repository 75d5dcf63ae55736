#!/usr/bin/env bash
# The GPU work of a session, in one call on the lent H100 (device tool), from the repo root, once
# /tmp/ship holds vllm.part.* and wheels.tar. Carries: .gpu/wheels.tar, .gpu/setup.sh, .gpu/extra (wheels
# the image lacks), .gpu/models (the tiny model); perf/gpu_kit.sh builds them all here.
# Runs the tests marked gpu, then the benchmarks; logs and JSON results go to $OUT.
set -uo pipefail
cp .gpu/wheels.tar /tmp/ship/ 2>/dev/null
source .gpu/setup.sh || exit 1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/extra/*.whl 2>&1 | grep -v WARNING
export ROLLOUTD_CACHE=$PWD/.gpu PYTHONPATH=$PWD:$PYTHONPATH BENCH_TAG=${BENCH_TAG:-h100} PYTHONUNBUFFERED=1
nvidia-smi -L
touch "$OUT/.start"
[ -z "${SKIP_GPU_TESTS:-}" ] && python3 -m pytest -m gpu -v -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu.py tests/test_gpu_weights.py} 2>&1 | grep -v "^(EngineCore\|^(Worker" | tee "$OUT/gpu-tests.log"
cd perf
for b in ${GPU_BENCH-roundtrip abort}; do
  case $b in
    roundtrip) python3 bench_roundtrip.py --n 5000 ;;
    abort) python3 bench_abort.py --repeat 20 ;;
    abort512) BENCH_TAG=h100-512x100 python3 bench_abort.py --inflight 512 --repeat 100 ;;  # a p99 from 100 trials
    throughput) python3 bench_throughput.py --prompts 256 --n 4 --max-tokens 512 --repeat 3 ;;
    trace) python3 trace_abort.py --inflight 512 --repeat 30 --detail 3 ;;
    weights) python3 bench_weights.py --repeat 5 --bucket-mb 1024,2048 ;;
    ipcopen) python3 bench_ipc_open.py --repeat 5 ;;
    weights_tp) python3 bench_weights_tp.py --repeat 5 --bucket-mb 1024,2048 ;;  # 2 GPUs
    # the three-way harness (Ray shipped too: gpu_kit.sh --with-ray), in pieces that fit a call
    bench_engine) BENCH_TAG=$BENCH_TAG-engine python3 bench.py --workloads short,long,fanout,stream --repeat 10 ;;
    bench_short) BENCH_TAG=$BENCH_TAG-short python3 bench.py --workloads short,stream --repeat 10 ;;
    bench_long) BENCH_TAG=$BENCH_TAG-long python3 bench.py --workloads long,fanout --repeat 10 ;;
    bench_control) BENCH_TAG=$BENCH_TAG-control python3 bench.py --workloads roundtrip,abort --repeat 10 ;;
    bench_8b) BENCH_TAG=$BENCH_TAG-8b python3 bench.py --model 8b --workloads short,long,fanout,stream --repeat 10 ;;
  esac 2>&1 | grep --line-buffered -v "^(EngineCore\|^(Worker\|^INFO" | tee "$OUT/bench-$b.log" | tail -120
  # after each, what it wrote: a call cut short keeps what ran
  find results -maxdepth 1 -newer "$OUT/.start" -name "*-$BENCH_TAG*" -exec cp {} "$OUT/" \;
done
ls -la "$OUT"
