"""rolloutd: the generation half of an RL training loop, as a daemon (broker + one vLLM worker per GPU)."""
from .client import AsyncClient, Client
from .errors import (BadRequest, BrokerUnreachable, Busy, EngineError, Paused, ProtocolError, RequestTimeout,
                     RolloutdError, ShuttingDown, Unsupported, WorkerLost)
from .results import Delta, Reply, Result, Sample, WorkerReply

__version__ = "0.1.0"
__all__ = ["Client", "AsyncClient", "Result", "Sample", "Delta", "Reply", "WorkerReply", "RolloutdError", "ProtocolError", "BadRequest",
           "Busy", "WorkerLost", "RequestTimeout", "BrokerUnreachable", "Unsupported", "EngineError", "Paused", "ShuttingDown"]
