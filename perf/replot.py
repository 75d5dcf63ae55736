"""Draw a result's PNG from its JSON (for runs on machines without matplotlib).

    python perf/replot.py perf/results/abort-h100.json   # or any result, fuzz-cpu.json and flood-cpu.json too
"""
import importlib
import json
import sys

import matplotlib

matplotlib.use("Agg")

for path in sys.argv[1:]:
    with open(path) as f:
        r = json.load(f)
    name = r["benchmark"].split("-")[0]  # results saved before the tag had a field of its own carry it here
    # the plot is its runner's: bench_NAME.py, or fuzz_broker.py / flood_broker.py
    module = f"{name}_broker" if name in ("fuzz", "flood") else f"bench_{name}"
    importlib.import_module(module).plot(r, path[:-5] + ".png")
    print("wrote", path[:-5] + ".png")
