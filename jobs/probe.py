"""Entry point: `python -m jobs.probe --store URI --config FILE` (also under `ray job submit`)."""
from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
