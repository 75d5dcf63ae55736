"""How a stop request escalates, the same for `rolloutd up`, the broker and a worker.

First SIGTERM/SIGINT: drain (take nothing new, let in-flight work finish up to a deadline, then abort it
and deliver the partial outputs). Second: abort at once, still delivering what is held. Third: exit.

systemd (KillMode=control-group, its default) and slurm signal every process of the unit or job step at
once, and `rolloutd up` passes the signal on to its children as well: a child gets the one stop twice
within milliseconds. Signals that close together count as one, so that this does not skip the drain.
"""
from __future__ import annotations

import time
from enum import IntEnum

# Signals closer than this to the previous counted one are the same stop request.
SAME_STOP_S = 1.0


class Stop(IntEnum):
    """How far a stop has gone: each signal moves it one step."""
    RUNNING = 0
    DRAIN = 1  # take nothing new, let what is in flight finish until the drain time
    NOW = 2  # abort what is in flight at once, still delivering the partial outputs
    EXIT = 3  # end now


class StopRequests:
    """Counts stop requests from signals. Safe to call from a signal handler: it only sets state."""

    def __init__(self) -> None:
        self.level = Stop.RUNNING
        self._last = -float("inf")

    def signal(self, *_args) -> bool:
        """One more signal; True if it raised the level (not a repeat of the last one)."""
        now = time.monotonic()
        if now - self._last < SAME_STOP_S:
            return False
        self._last = now
        self.level = Stop(min(self.level + 1, Stop.EXIT))
        return True

    def force(self, level: Stop) -> None:
        """Raise the level without a signal (a dead engine, say)."""
        self.level = max(self.level, level)
