#!/usr/bin/env bash
# Builds .gpu/ here: everything a run on the lent GPU machine carries (it has no vLLM and no network).
#   vllm.part.00, vllm.part.01, wheels.tar, setup.sh   ../shared/gpu/prepare.sh (vLLM 0.26.0; --with-ray adds Ray)
#   extra/    wheels the GPU image lacks, for its Python 3.12: msgpack, psutil, pytest, pytest-timeout
#   models/   the tiny model, made here as the tests make it (ROLLOUTD_CACHE=.gpu)
#   ray.part.00, ray.part.01   with --with-ray (Ray 2.60, for `rolloutd bench` there)
# Each piece is made only if missing; arguments go to prepare.sh. Then, on the machine (README, "GPU runs"):
# one call per part in a row, perf/gpu_run.sh in the last.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
shared="${ROLLOUTD_SHARED:-$root/../shared}"
if [ ! -f .gpu/vllm.part.00 ] || [ ! -f .gpu/wheels.tar ] || [ ! -f .gpu/setup.sh ] \
   || { [ "${1:-}" = "--with-ray" ] && [ ! -f .gpu/ray.part.01 ]; }; then
  bash "$shared/gpu/prepare.sh" "$@"
fi
if ! ls .gpu/extra/msgpack-*.whl >/dev/null 2>&1; then
  mkdir -p .gpu/extra
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
    --dest .gpu/extra msgpack psutil pytest pytest-timeout
fi
source bin/_venv.sh >/dev/null
ROLLOUTD_CACHE="$root/.gpu" python -m rolloutd.cli models prepare tiny >/dev/null
for f in .gpu/vllm.part.0? .gpu/ray.part.0? .gpu/wheels.tar; do
  [ -f "$f" ] || continue
  [ "$(stat -c %s "$f")" -lt $((64 << 20)) ] || { echo "$f is over the 64 MiB a call may carry" >&2; exit 1; }
done
du -sh .gpu/*.part.* .gpu/wheels.tar .gpu/extra .gpu/models
