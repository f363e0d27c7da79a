"""The end-to-end demo on the embedded default: local machine, bundled encoder, file:// store."""
from __future__ import annotations

import sys

from pipeline.demo import run_demo

if __name__ == "__main__":
    sys.exit(run_demo())
