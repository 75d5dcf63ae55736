"""Evidence, from outside rolloutd, that the machine stopped running its ordinary processes during a block.

On the 2-core CI VMs, under vLLM load, ordinary processes stall for tenths of a second to many seconds at a
time (perf/results/README.md). A test that loses a timing race may retry when this happened; it must not
believe rolloutd's own processes about it, since a rolloutd loop that blocks itself would say "stalled" just
the same. So the witness is a sleeper process pinned to each CPU, at ordinary priority like the processes
under test, sleeping 10 ms at a time and recording how late it wakes (perf/watch_vcpus.py does the same by
hand). A process that does nothing but sleep cannot be kept waiting for seconds by anything rolloutd does:
when it wakes that late, the machine did not run ordinary processes. (Real-time sleepers were tried: they
woke on time through stalls of 2-7 s that held every ordinary process, so they are blind to these.) The
kernel's steal time (/proc/stat) is reported beside it; these stalls mostly do not show there.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time

TICK_S = 0.01
# Shorter oversleeps are scheduling noise (and the host's routine small preemptions, which add up to
# seconds of steal over a long test without delaying anything much): only stalls this long count.
STALL_S = 0.05
_READY_TIMEOUT_S = 60.0


def steal_s() -> float:
    """Steal time of all CPUs together since boot, in seconds (the 8th number of /proc/stat's "cpu" line)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _sleeper(cpu: int, stop, out, slot: int) -> None:
    """Pinned to `cpu`: until `stop`, sleep TICK_S at a time; out[slot] = the longest oversleep,
    out[slot + 1] = the sum of those of STALL_S or more, out[slot + 2] = the ticks so far. Each tick is
    measured from the end of the one before, so once the first tick is recorded every moment lies in some
    measured tick, and the tick under way when `stop` is set is recorded before the loop ends."""
    os.sched_setaffinity(0, {cpu})
    worst = total = 0.0
    ticks = 0
    t = time.monotonic()
    while True:
        time.sleep(TICK_S)
        now = time.monotonic()
        late, t = now - t - TICK_S, now
        worst = max(worst, late)
        if late >= STALL_S:
            total += late
        ticks += 1
        out[slot], out[slot + 1], out[slot + 2] = worst, total, ticks
        if stop.is_set():
            return


class HostFreezeWatch:
    """A context manager over a block: after it,
      frozen_s   the longest oversleep any pinned sleeper saw (s),
      stalled_s  the sum of the sleepers' oversleeps of STALL_S or more, all CPUs together (s),
      steal_s    the steal time the kernel counted over the block, all CPUs together (s),
      evidence_s how long the host kept CPUs of this machine from running, by both witnesses (s),
      steal_counted whether this machine's hypervisor reports steal time at all.
    """

    def __enter__(self) -> "HostFreezeWatch":
        self.frozen_s = self.stalled_s = self.steal_s = 0.0
        # Not fork: the test process has threads (zmq, torch), and a child forked from it may inherit a lock
        # one of them held. Not spawn either, which takes long to start a Python: the block often begins at
        # a moment the test has just arranged (requests in flight). forkserver forks from a small server.
        ctx = mp.get_context("forkserver")
        cpus = sorted(os.sched_getaffinity(0))
        self._out = ctx.RawArray("d", 3 * len(cpus))
        self._stop = ctx.Event()
        self._procs = [ctx.Process(target=_sleeper, args=(cpu, self._stop, self._out, 3 * i), daemon=True)
                       for i, cpu in enumerate(cpus)]
        for proc in self._procs:
            proc.start()
        # The block is watched from its first moment: it begins once every sleeper has recorded a tick.
        # (A sleeper that had only said it started could be stopped before its first measurement.)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while min(self._out[2::3]) < 1:
            if time.monotonic() > deadline:
                self._end()
                raise RuntimeError(f"the CPU sleepers did not start within {_READY_TIMEOUT_S:.0f} s")
            time.sleep(0.002)
        self._stalled0 = sum(self._out[1::3])  # stalls of the ticks before the block are not its
        self._steal0 = steal_s()
        self.steal_counted = self._steal0 > 0  # a hypervisor that reports none has 0 since boot
        return self

    def __exit__(self, *exc) -> None:
        self._end()  # first: a sleeper whose CPU is away as the block ends reports that stall once back
        self.steal_s = steal_s() - self._steal0
        out = list(self._out)
        self.frozen_s = max(out[0::3], default=0.0)
        self.stalled_s = sum(out[1::3]) - self._stalled0

    def _end(self) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    @property
    def evidence_s(self) -> float:
        """The sleepers' stalls: the time ordinary processes were not run, seen from outside rolloutd."""
        return self.stalled_s

    def __str__(self) -> str:
        return (f"host freeze evidence {self.evidence_s:.2f} s (sleepers: longest {self.frozen_s:.2f} s, "
                f"stalls {self.stalled_s:.2f} s; steal {self.steal_s:.2f} s)")
