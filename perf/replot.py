"""Draw a result's PNG from its JSON (for runs on machines without matplotlib).

    python perf/replot.py perf/results/abort-h100.json
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
    importlib.import_module(f"bench_{name}").plot(r, path[:-5] + ".png")
    print("wrote", path[:-5] + ".png")
