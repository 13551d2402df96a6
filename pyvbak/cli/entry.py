"""The console-script entry point (``pyvbak``, ``python -m pyvbak``).

Beside the work itself, a user waits on every command for the interpreter to start, the
modules to load and the process to exit.  The exit part is taken here: before returning,
the objects left (mostly those of numpy, typer and pyvbak's modules) are frozen with
``gc.freeze``, so the interpreter's last collection at shutdown skips them instead of
traversing them all just before the process is gone anyway.  Measured with
``python bench/startup.py`` (bench/RESULTS.md, "CLI start-up"): ``pyvbak snapshots``
130-136 ms through here vs 141-165 ms through ``main`` directly (medians, three runs).  Nothing else changes:
atexit handlers, ``finally`` blocks and module teardown all still run.
"""

from __future__ import annotations

import gc
import sys


def entry() -> None:
    try:
        from .main import main
    except KeyboardInterrupt:  # Ctrl-C while the modules load: nothing was started yet
        print("pyvbak: error: interrupted (Ctrl-C) while starting: nothing was done", file=sys.stderr)
        sys.exit(10)  # errors.Interrupted.exit_code (not imported: it may be what was interrupted)
    code = main(exiting=True)  # signals are ignored from its return on: the outcome is decided
    gc.freeze()
    sys.exit(code)
