"""Peak memory of a process and everything it started, sampled from /proc while it runs.

Ray's work happens in raylet-spawned worker processes, not in the driver, so the memory of a variant is the
sum over its whole process tree: RSS and anonymous RSS every sample, PSS (which does not double count
shared pages) every few samples, as reading smaps_rollup costs more.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
        children[int(fields[1])].append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    children = _ppid_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _status_kb(pid: int, keys=("VmRSS", "RssAnon")) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


@dataclass
class TreeMemory:
    """Peaks over the samples of one process tree (kB), and the processes it held at the RSS peak."""

    peak_rss: int = 0
    peak_anon: int = 0
    peak_pss: int = 0
    peak_procs: list[str] = field(default_factory=list)
    max_procs: int = 0
    samples: int = 0

    def sample(self, root: int, *, with_pss: bool) -> None:
        tree = process_tree(root)
        stats = [_status_kb(p) for p in tree]
        rss = sum(s.get("VmRSS", 0) for s in stats)
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_procs = sorted(_comm(p) for p in tree)
        self.peak_anon = max(self.peak_anon, sum(s.get("RssAnon", 0) for s in stats))
        if with_pss:
            self.peak_pss = max(self.peak_pss, sum(_pss_kb(p) for p in tree))
        self.max_procs = max(self.max_procs, len(tree))
        self.samples += 1


def watch(proc: subprocess.Popen, *, timeout: float, what: str, interval: float = 0.2,
          pss_every: int = 5) -> TreeMemory:
    """Sample `proc`'s tree until it exits. `proc` must lead its own process group (start_new_session=True):
    past `timeout` seconds, or on any error here, that group is ended."""
    mem = TreeMemory()
    t0 = time.perf_counter()
    try:
        while proc.poll() is None:
            mem.sample(proc.pid, with_pss=mem.samples % pss_every == 0)
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGTERM)  # the group started for this variant
                proc.wait(30)
                raise TimeoutError(f"{what} ran past --timeout {timeout} s")
            time.sleep(interval)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return mem
