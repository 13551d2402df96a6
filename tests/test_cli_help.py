"""Every command's --help renders (help texts go through rich markup)."""

import pytest

from pyvbak.cli.main import main

COMMANDS = ["init", "backup", "snapshots", "restore", "verify", "forget", "prune", "unlock", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"pyvbak {command}" in out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_version(capsys):
    import pyvbak
    from pyvbak import native
    from pyvbak.cli.main import main

    capsys.readouterr()
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"pyvbak {pyvbak.__version__} (repository format 1;")
    assert native.selected_kernel() in out and native.selected_sha256_kernel() in out
