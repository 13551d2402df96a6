"""Helpers shared by the benchmarks in bench/ (run as scripts: bench/ is on sys.path)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (recorded with every result in RESULTS.md)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
