"""The header line every benchmark prints: when, where, which versions, and how loaded the machine was."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path


def machine_header(name: str) -> str:
    import ray
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"# {name} {_dt.datetime.now().astimezone().isoformat(timespec='seconds')} | {platform.node()} | "
            f"{cpu} | cores={os.cpu_count()} | python {platform.python_version()} torch {torch.__version__} "
            f"(threads {torch.get_num_threads()}) torchvision {torchvision.__version__} ray {ray.__version__} | "
            f"load avg {load}")
