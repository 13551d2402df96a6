from pyvbak.cli.entry import entry

entry()
