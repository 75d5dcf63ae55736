"""What a trainer gets back: Result (one prompt), Sample (one of its n completions), Delta (a stream step)."""
from __future__ import annotations

from dataclasses import dataclass

from . import protocol as p


@dataclass
class Sample:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length" or "abort"
    logprobs: list[float] | None = None  # of each sampled token, when asked for


@dataclass
class Result:
    """One prompt's answer. `samples` holds all n completions; the flat fields are samples[0]'s,
    so n=1 callers can write `result.text`."""
    request_id: str
    samples: list[Sample]
    weight_version: int  # the weights that produced it
    worker: str  # the worker that served it
    prompt_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def finish_reason(self) -> str:
        return self.samples[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.samples[0].logprobs


@dataclass
class Delta:
    """What one sample gained in one engine step (streaming)."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str


def from_message(msg: p.Result) -> Result:
    samples = []
    frames = iter(msg.frames)
    for s in msg.samples:
        ids = p.unpack_ids(next(frames))
        lps = p.unpack_logprobs(next(frames)) if s.get("logprobs") else None
        samples.append(Sample(s.get("index", len(samples)), ids, s["text"], s["finish_reason"], lps))
    samples.sort(key=lambda s: s.index)
    return Result(msg.rid, samples, msg.weight_version, msg.worker, msg.prompt_tokens)


def deltas_from_message(msg: p.Tokens) -> list[Delta]:
    return [Delta(msg.rid, idx, p.unpack_ids(f), text) for (idx, text), f in zip(msg.deltas, msg.frames)]
