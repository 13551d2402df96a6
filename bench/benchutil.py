"""Helpers shared by the benchmarks in bench/ (run as scripts: bench/ is on sys.path)."""

from __future__ import annotations

import os
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


_WORKER = r'''
import contextlib, io, json, sys, time
sys.path.insert(0, sys.argv[1])
import pyvbak
assert pyvbak.__file__.startswith(sys.argv[1]), f"imported {pyvbak.__file__}, not the checkout {sys.argv[1]}"
from pyvbak.cli.main import main
for _ in sys.stdin:
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(sys.argv[2:])
    dt = time.perf_counter() - t0
    print(json.dumps({"s": dt, "code": code, "result": json.loads(out.getvalue()) if code == 0 else {}}), flush=True)
'''


class PyvbakWorker:
    """A child process that imported the pyvbak of checkout ``root`` once and runs
    ``main(args)`` (a ``--json`` command) on each ``run()``, timing main() alone: the
    command's work without interpreter start-up and imports, in a process of its own (as
    a job runner would run it), not perturbed by the bench's own threads and buffers."""

    def __init__(self, root: str, args: list[str], env: dict, cwd: str | None = None):
        import sys

        env = dict(env)
        env.pop("PYTHONPATH", None)
        root = os.path.abspath(root)
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, root, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)

    def run(self) -> tuple[float, int, dict]:
        """(seconds main() took, its exit code, its JSON output or {})."""
        import json

        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the pyvbak worker process died")
        doc = json.loads(line)
        return doc["s"], doc["code"], doc["result"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
