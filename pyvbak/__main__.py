from pyvbak.cli.main import entry

entry()
