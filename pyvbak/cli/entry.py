"""The console-script entry point (``pyvbak``, ``python -m pyvbak``).

Kept apart from ``main`` so that it runs before the command line's imports, and owns the
two process-level costs a user waits for on every command beside the work itself
(measured in bench/RESULTS.md, "CLI start-up"):

- the cyclic garbage collector is off while the modules load: importing numpy, typer and
  pyvbak allocates tens of thousands of long-lived objects, so the collections it would
  trigger find nothing to free (~8 ms here);
- on the way out the surviving objects are frozen (``gc.freeze``): the interpreter's last
  collection at shutdown then skips them, the process exits anyway (~15 ms here).

Neither changes what runs: atexit handlers, ``finally`` blocks and module teardown all
still happen.
"""

from __future__ import annotations

import gc
import sys


def entry() -> None:
    gc.disable()
    try:
        from .main import main
    finally:
        gc.enable()
    code = main()
    gc.freeze()
    sys.exit(code)
