"""The driver's watch over a running job: progress in images (rate, ETA) and stalls.

Ray Data's own progress counts blocks of rows; a job's units and blocks vary in size, so the driver polls the
job's JobProgress actor and logs images. If no block is written for `run.stall_timeout_s`, it logs which units
are in flight on which nodes (and for how long), then stops the job: a re-run resumes from the blocks written.
"""
from __future__ import annotations

import _thread
import logging
import signal
import threading
import time

import ray

from ..failures import first_line

log = logging.getLogger(__name__)


class JobStalled(RuntimeError):
    """No block was written for run.stall_timeout_s; nothing was published, and a re-run resumes."""


class JobMonitor:
    def __init__(self, progress, *, total: int, unknown_units: int, interval: float, stall_timeout: float):
        self.progress, self.total, self.unknown = progress, total, unknown_units
        self.interval, self.stall_timeout = max(0.1, interval), stall_timeout
        self.stalled: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-monitor", daemon=True)
        self._t0 = time.time()

    def __enter__(self) -> JobMonitor:
        self._restore_sigint = _handle_sigint()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._restore_sigint is not None:
            signal.signal(signal.SIGINT, self._restore_sigint)

    def _run(self) -> None:
        next_log = time.time() + self.interval
        seen = time.time()  # the last status read: a progress actor gone for good is a stall too
        while not self._stop.wait(min(1.0, self.interval)):
            try:
                status = ray.get(self.progress.status.remote(), timeout=30)
            except Exception as e:  # noqa: BLE001 - a monitor must never take the job down
                log.debug("progress unavailable: %s", e)
                if self.stall_timeout and time.time() - seen > self.stall_timeout:
                    self.stalled = (f"the job's progress could not be read for {_duration(time.time() - seen)} "
                                    f"(run.stall_timeout_s={self.stall_timeout:g}): {first_line(e)[:200]}. "
                                    f"Stopped: blocks written so far are kept, nothing was published; run the "
                                    f"same command again to resume")
                    log.error("%s", self.stalled)
                    _thread.interrupt_main()
                    return
                continue
            now = seen = time.time()
            if now >= next_log:
                log.info("%s", self.line(status, now))
                next_log = now + self.interval
            if self.stall_timeout and now - status["last"] > self.stall_timeout:
                self.stalled = self.stall_message(status, now)
                log.error("%s", self.stalled)
                _thread.interrupt_main()  # the driver is blocked in Ray Data: stop it there
                return

    def line(self, status: dict, now: float) -> str:
        done, errors, total = status["images"], status["errors"], status.get("total", self.total)
        rate = done / max(1e-9, now - self._t0)
        if total and not self.unknown:
            left = max(0, total - done)
            eta = f", ETA {_duration(left / rate)}" if rate > 0 and left else ""
            of = f" of {total} ({done / total:.0%})"
        else:
            of, eta = f" of at least {total}" if total else "", ""
        return (f"progress: {done} images{of}, {errors} errors, {rate:.1f} images/s{eta}; "
                f"{len(status['in_flight'])} units in flight")

    def stall_message(self, status: dict, now: float) -> str:
        nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        flights = sorted(status["in_flight"].items(), key=lambda kv: kv[1][1])
        shown = "; ".join(f"{unit} on node {nodes.get(node, node[:12])}{'' if node in alive else ' (dead)'} "
                          f"for {_duration(now - since)}" for unit, (node, since, _left) in flights[:10])
        return (f"no block written for {_duration(now - status['last'])} (run.stall_timeout_s="
                f"{self.stall_timeout:g}); in flight: {shown or 'nothing reported'}. Stopped: blocks written so "
                f"far are kept, nothing was published; run the same command again to resume")


def _handle_sigint():
    """Let `_thread.interrupt_main` reach this driver for the job's duration; returns the handler to restore.

    interrupt_main does nothing while SIGINT is ignored or at its default, and a process started in the
    background by a non-interactive shell (`nohup strata extract … &`, some schedulers) starts with it
    ignored: the stall would be logged and the driver would wait on forever. Python's own handler is set
    for the job (from the main thread only, where signal handlers can be set); None: nothing to restore.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.getsignal(signal.SIGINT)
    if callable(current):
        return None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return current if current is not None else signal.SIG_DFL


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
