"""Defaults shared by every part, each overridable by an environment variable (flags win over both)."""
from __future__ import annotations

import os

# Where clients reach the broker, and where workers reach it.
DEFAULT_FRONT = "tcp://127.0.0.1:5555"
DEFAULT_BACK = "tcp://127.0.0.1:5556"
FRONT = os.environ.get("ROLLOUTD_ADDRESS", DEFAULT_FRONT)
BACK = os.environ.get("ROLLOUTD_BACK", DEFAULT_BACK)

# Liveness as in the ZeroMQ guide's Majordomo: a peer silent for LIVENESS intervals is dead. 5, not the
# guide's 3: a worker's loop adding 512 requests to vLLM, or a full garbage collection, goes quiet for a
# second or two and must not be taken for dead. A killed worker is noticed at once anyway, by its
# connection dropping: liveness is for networks that go silent.
HEARTBEAT_S = float(os.environ.get("ROLLOUTD_HEARTBEAT_S", "1.0"))
LIVENESS = int(os.environ.get("ROLLOUTD_LIVENESS", "5"))

# Requests the broker holds when every worker is full; past this many, or past these bytes (their prompts,
# all clients together and per client), a request is refused as busy.
MAX_PENDING = int(os.environ.get("ROLLOUTD_MAX_PENDING", "65536"))
MAX_PENDING_BYTES = int(os.environ.get("ROLLOUTD_MAX_PENDING_BYTES", str(1 << 30)))
MAX_CLIENT_BYTES = int(os.environ.get("ROLLOUTD_MAX_CLIENT_BYTES", str(256 << 20)))

# On a stop signal, how long requests in flight may still finish before they are aborted.
DRAIN_S = float(os.environ.get("ROLLOUTD_DRAIN_S", "30"))

# High-water marks (messages) on every socket: past them senders block or fail, memory stays bounded.
HWM = int(os.environ.get("ROLLOUTD_HWM", "200000"))

# Fanned-out commands (abort all, sleep, ...) that a worker never answers are closed after this.
CONTROL_TIMEOUT_S = float(os.environ.get("ROLLOUTD_CONTROL_TIMEOUT_S", "60"))

# Model cache for `rolloutd models prepare`.
CACHE = os.environ.get("ROLLOUTD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rolloutd"))
