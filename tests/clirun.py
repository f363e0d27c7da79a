"""Runs the `strata` command as a user would (a subprocess) and checks how it fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def strata(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`strata ARGS` with this interpreter, from the repository root; stdout and stderr captured."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_fails(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command exited with `code`, its stderr ends with one `strata <cmd>: error: ...` line naming every
    needle, and holds no traceback. Returns that line."""
    line = last_line(proc.stderr)
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr ends: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr[-3000:]
    assert line.startswith("strata ") and ": error: " in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line
