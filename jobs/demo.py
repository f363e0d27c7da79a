"""Entry point: `python -m jobs.demo` runs the demo end to end on this machine."""
from __future__ import annotations

import sys

from pipeline.demo import run_demo

if __name__ == "__main__":
    sys.exit(run_demo())
