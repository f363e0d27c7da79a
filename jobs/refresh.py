"""Entry point for schedulers: `python -m jobs.refresh --config FILE [section.key=value ...]`."""
from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
