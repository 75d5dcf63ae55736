"""The same vLLM engine driven in-process, with no daemon in between: the baseline that tests (greedy
equality) and benchmarks (throughput, abort latency) compare the daemon against.

    python -m rolloutd.inprocess --model tiny --prompts prompts.json --sampling '{"max_tokens": 32}'

prints one JSON line: {"token_ids": [[[...] per sample] per prompt], "seconds": wall time of the generation}.
--sequential runs one prompt at a time (a batch of one on both sides makes greedy decoding bit-exact).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from . import engine as eng


async def generate(engine, prompts: list[list[int]], sampling: dict, sequential: bool = False,
                   prefix: str = "ref") -> list[list[list[int]]]:
    """Token ids of every sample (in index order) for each prompt."""
    params = eng.sampling_params(sampling, stream=False)

    async def one(i: int, ids: list[int]) -> list[list[int]]:
        st: dict = {}
        async for out in engine.generate(eng.tokens_prompt(ids), params, f"{prefix}-{i}"):
            eng.accumulate(st, out, False)
        return [st[k].ids for k in sorted(st)]

    if sequential:
        return [await one(i, ids) for i, ids in enumerate(prompts)]
    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rolloutd.inprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF folder or built-in name (smollm2, tiny)")
    ap.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    ap.add_argument("--sampling", default="{}", help="JSON sampling options")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--sequential", action="store_true", help="one prompt at a time")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    a = ap.parse_args(argv)
    from .models import resolve

    with open(a.prompts) as f:
        prompts = json.load(f)
    sampling = json.loads(a.sampling)

    async def run():
        engine = eng.build_engine(eng.EngineOptions(model=resolve(a.model), max_model_len=a.max_model_len,
                                                    enforce_eager=a.enforce_eager,
                                                    gpu_memory_utilization=a.gpu_memory_utilization,
                                                    tensor_parallel_size=a.tensor_parallel_size))
        try:
            t0 = time.perf_counter()
            ids = await generate(engine, prompts, sampling, a.sequential)
            return ids, time.perf_counter() - t0
        finally:
            engine.shutdown()

    ids, seconds = asyncio.run(run())
    sys.stdout.write(json.dumps({"token_ids": ids, "seconds": seconds}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
