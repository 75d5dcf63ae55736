"""What a trainer gets back: Result (one prompt), Sample (one of its n completions), Delta (a stream step),
and Reply (the answer to a control call: abort, pause, sleep, ...)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import protocol as p


class Sample:
    """One of a prompt's n completions.

    token_ids / logprobs are Python lists, made on first use; token_array / logprob_array are the same
    numbers as read-only numpy arrays (int32 / float32) over the received message, with no copy: what a
    trainer turning rollouts into tensors wants, and why 512 results arriving at once cost no per-token work.
    """
    __slots__ = ("index", "text", "finish_reason", "token_array", "logprob_array", "_ids", "_lps")

    def __init__(self, index: int, token_array: np.ndarray, text: str, finish_reason: str,
                 logprob_array: np.ndarray | None = None):
        self.index = index
        self.text = text
        self.finish_reason = finish_reason  # "stop", "length" or "abort"
        self.token_array = token_array
        self.logprob_array = logprob_array
        self._ids: list[int] | None = None
        self._lps: list[float] | None = None

    @property
    def token_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self.token_array.tolist()
        return self._ids

    @property
    def logprobs(self) -> list[float] | None:
        """Of each sampled token, when asked for."""
        if self._lps is None and self.logprob_array is not None:
            self._lps = self.logprob_array.tolist()
        return self._lps

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return ((self.index, self.text, self.finish_reason, self.token_ids, self.logprobs)
                == (other.index, other.text, other.finish_reason, other.token_ids, other.logprobs))

    def __repr__(self) -> str:
        return (f"Sample(index={self.index}, tokens={len(self.token_array)}, finish_reason={self.finish_reason!r}, "
                f"text={self.text[:40]!r}{'...' if len(self.text) > 40 else ''})")


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
    def token_array(self) -> np.ndarray:
        return self.samples[0].token_array

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


@dataclass
class WorkerReply:
    """One worker's part of a Reply."""
    ok: bool
    data: dict  # what it answered (aborted counts, pause state, ...)
    error: str | None = None  # when not ok: its error code (rolloutd.errors), "timeout" if it did not answer
    message: str = ""


@dataclass
class Reply:
    """The answer to a control call. ok: every worker it went to succeeded. data: the broker's own part
    (ids it did not know, requests it aborted before they reached a worker, ...). workers: each worker's."""
    ok: bool
    data: dict
    workers: dict[str, WorkerReply]

    @property
    def errors(self) -> dict[str, WorkerReply]:
        """The workers that failed or did not answer."""
        return {name: w for name, w in self.workers.items() if not w.ok}


def reply_from_message(msg: p.Reply) -> Reply:
    workers = {}
    for name, w in msg.workers.items():
        w = w if isinstance(w, dict) else {}
        data = w.get("data")
        workers[str(name)] = WorkerReply(ok=w.get("ok") is True, data=data if isinstance(data, dict) else {},
                                         error=w.get("error"), message=str(w.get("message", "")))
    return Reply(msg.ok, msg.data, workers)


def from_finished(msg: p.Finished) -> list[Result]:
    """Every Result of a (checked) Finished message, each sample a view into its frames, no copy."""
    ids = np.frombuffer(msg.frames[1], dtype=p.TOKEN_DTYPE)
    lps = np.frombuffer(msg.frames[2], dtype=p.LOGPROB_DTYPE) if len(msg.frames) > 2 else None
    out = []
    for rid, smaps, prompt_tokens, spans in msg.spans():
        samples = [Sample(s.get("index", k), ids[a:b], s["text"], s["finish_reason"],
                          None if lp is None else lps[lp:lp + b - a])
                   for k, (s, (a, b, lp)) in enumerate(zip(smaps, spans))]
        out.append(_result(rid, samples, msg.weight_version, msg.worker, prompt_tokens))
    return out


def _result(rid: str, samples: list[Sample], version: int, worker: str, prompt_tokens: int) -> Result:
    if len(samples) > 1:
        samples.sort(key=lambda s: s.index)
    return Result(rid, samples, version, worker, prompt_tokens)


def deltas_from_message(msg: p.Tokens) -> list[Delta]:
    return [Delta(msg.rid, idx, p.unpack_ids(f), text) for (idx, text), f in zip(msg.deltas, msg.frames)]
