"""Typed errors: what a trainer catches, and the wire codes they travel as.

Every error that crosses the wire carries a short code; the client turns the code back into one of
these classes, so `except WorkerLost:` works the same in-process and across machines.
"""
from __future__ import annotations


class RolloutdError(Exception):
    """Base of every error rolloutd raises on purpose."""

    code = "internal"

    def __init__(self, message: str = "", *, request_id: str | None = None):
        super().__init__(message or self.__doc__.strip().splitlines()[0])
        self.message = message
        self.request_id = request_id


class ProtocolError(RolloutdError):
    """A message that does not follow the wire protocol (tag, command, types, sizes)."""

    code = "protocol"


class BadRequest(RolloutdError):
    """The request is well formed but asks for something invalid (a sampling value, an empty prompt)."""

    code = "bad_request"


class Busy(RolloutdError):
    """Every queue that could take the request is full; retry later or send less at once."""

    code = "busy"


class WorkerLost(RolloutdError):
    """The worker that held the request stopped answering (it died or was cut off)."""

    code = "worker_lost"


class RequestTimeout(RolloutdError):
    """No answer within the call's timeout."""

    code = "timeout"


class BrokerUnreachable(RolloutdError):
    """The broker did not answer at all: is `rolloutd up` (or `rolloutd broker`) running at that address?"""

    code = "broker_unreachable"


class Unsupported(RolloutdError):
    """The engine or this version of rolloutd cannot do what was asked."""

    code = "unsupported"


class EngineError(RolloutdError):
    """The vLLM engine raised while serving the request."""

    code = "engine"


class Paused(RolloutdError):
    """The worker is paused (and refuses new requests) or asleep; resume or wake it first."""

    code = "paused"


class ShuttingDown(RolloutdError):
    """The daemon is stopping and takes no new work."""

    code = "shutting_down"


class InsecureBind(RolloutdError):
    """Listening on a non-loopback address needs keys (`rolloutd keys generate`) or --insecure.

    Without keys, anyone who can reach such an address can submit work or register as a worker."""

    code = "insecure"


class WeightsIncomplete(RolloutdError):
    """A weight update failed part-way on this worker (atomic=False): it serves nothing until a complete
    update lands, rather than a model that is half old and half new."""

    code = "weights_incomplete"


class InternalError(RolloutdError):
    """A bug in rolloutd; the message says where."""

    code = "internal"


_BY_CODE = {cls.code: cls for cls in (
    ProtocolError, BadRequest, Busy, WorkerLost, RequestTimeout, BrokerUnreachable, Unsupported,
    EngineError, Paused, ShuttingDown, InsecureBind, WeightsIncomplete, InternalError)}


def from_code(code: str, message: str, request_id: str | None = None) -> RolloutdError:
    """The typed error for a wire code (unknown codes become InternalError, keeping the message)."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, request_id=request_id)
