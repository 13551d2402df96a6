try:
    from pyvbak.cli.entry import entry
except KeyboardInterrupt:  # (before entry() has its own handling: one line, exit 10, no traceback)
    import sys

    print("pyvbak: error: interrupted (Ctrl-C) while starting: nothing was done", file=sys.stderr)
    sys.exit(10)

entry()
