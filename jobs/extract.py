"""Entry point: `python -m jobs.extract --config FILE [section.key=value ...]` (also under `ray job submit`)."""
from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
