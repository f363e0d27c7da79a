"""The probe grid's progress: a bar on a terminal, log lines elsewhere, both counting groups and heads."""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd

from pipeline.probes import InMemoryFeatureTable, ProbeConfig, run_probe_grid
from pipeline.probes.progress import GridProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_file_gets_log_lines(caplog):
    tty = _Tty()
    bar = GridProgress(4, stream=tty, width=8)
    bar.update(2, 10)
    bar.update(2, 6)
    out = tty.getvalue()
    assert "\rprobe grid [####....] 2/4 groups, 10 heads" in out and "[########] 4/4 groups, 16 heads" in out
    assert out.endswith("\n")
    with caplog.at_level(logging.INFO, logger="pipeline.probes.progress"):
        plain = GridProgress(2, stream=io.StringIO(), min_interval=0)
        plain.update(1, 3)
        plain.update(1, 3)
    assert [r.getMessage() for r in caplog.records][-1].startswith("probe grid: 2/2 groups, 6 heads, ")


def test_the_grid_reports_every_group(caplog):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(120)], "label": y})
    features = {"a": rng.normal(size=(120, 4)) + y[:, None], "b": rng.normal(size=(120, 3))}
    table = InMemoryFeatureTable({k: v.astype(np.float32) for k, v in features.items()}, index)
    with caplog.at_level(logging.INFO, logger="pipeline.probes.progress"):
        run_probe_grid(table, ProbeConfig.from_dict({"tasks": ["label"], "heads": ["linear"]}), use_ray=False)
    last = [r.getMessage() for r in caplog.records if r.name == "pipeline.probes.progress"][-1]
    assert last.startswith("probe grid: 2/2 groups, ") and "heads/s" in last
