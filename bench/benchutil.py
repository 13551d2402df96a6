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


def ensure_bytecode() -> None:
    """Compile pyvbak's modules to ``__pycache__`` before any timed CLI run.

    ``pip install`` byte-compiles a package when it installs it, so a user's ``pyvbak``
    loads ``.pyc`` files.  An editable checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (as
    on the machine these results come from) compiles every module from source on every
    run instead: ~26 ms of builtins.compile per CLI start (cProfile), 164 vs 134 ms for
    ``python -c "import pyvbak.cli.main, pyvbak.engine.backup"`` (medians of 15).  Writing
    the ``.pyc`` files once makes the timed runs measure what an installed pyvbak does."""
    import compileall
    import os

    import pyvbak

    compileall.compile_dir(os.path.dirname(pyvbak.__file__), quiet=1)


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``VmHWM``).

    Not ``getrusage().ru_maxrss``: Linux keeps that across ``execve``, so a benchmark's
    child process would report the parent's memory at fork time if it was larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def report(out: dict, as_json: bool) -> None:
    """Print a benchmark's result: JSON (what RESULTS.md quotes), or one ``key: value`` line
    per entry."""
    import json

    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


def image_bench_args(doc: str, *, size_mib: int, rounds: int, extra=None):
    """Parse the arguments the image benchmarks share: ``--size-mib``, ``--rounds`` (the
    variants alternate within each), ``--json``; ``extra(parser)`` adds a script's own."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=size_mib)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--json", action="store_true")
    if extra is not None:
        extra(ap)
    return ap.parse_args()
