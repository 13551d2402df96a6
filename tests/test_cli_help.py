"""Every command's --help renders (help texts go through rich markup)."""

import pytest

from pyvbak.cli.main import COMMANDS as REGISTERED
from pyvbak.cli.main import main

# the commands the README documents: one added or removed in cli/main.py without the
# README (and this list) fails below
COMMANDS = ["init", "backup", "snapshots", "restore", "verify", "forget", "prune", "unlock", "cbt-off", "demo"]


def test_the_documented_commands_are_the_registered_ones():
    assert sorted(REGISTERED) == sorted(COMMANDS)


def _readme_synopsis() -> list[str]:
    """The lines of the README's "Command line" code block."""
    import os

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    return readme.split("\n## Command line\n", 1)[1].split("```", 2)[1].splitlines()


@pytest.mark.parametrize("command", sorted(REGISTERED))
def test_the_readme_synopsis_shows_every_command_and_its_options(command):
    import re

    import typer

    from pyvbak.cli.main import _app_for

    lines = [ln for ln in _readme_synopsis() if ln.split("#")[0].split()[:2] == ["pyvbak", command]]
    assert lines, f"no 'pyvbak {command} ...' line in the README's Command line block"
    click_command = typer.main.get_command(_app_for([command]))
    click_command = getattr(click_command, "commands", {}).get(command, click_command)
    options = [o for p in click_command.params for o in p.opts if o.startswith("--") and o != "--help"]
    assert options, "no options found: the command's parameters were not read"
    assert [o for o in options if not any(re.search(re.escape(o) + r"(?![\w-])", ln) for ln in lines)] == []


@pytest.mark.parametrize("command", sorted(REGISTERED))
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
    assert f"block decoder {native.selected_decode_kernel()}" in out


def test_no_command_shows_the_help_without_an_empty_error(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert "Commands" in out + err and "error" not in out + err


def test_a_command_option_error_points_at_that_command_help(capsys):
    assert main(["snapshots", "--repo", "/nonexistent", "--vm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'--vm' requires an argument" in err and "(see 'pyvbak snapshots --help')" in err


def test_top_level_help_lists_the_exit_codes_the_errors_carry(capsys):
    """The exit codes were only in the README; every error class's code is in --help."""
    import inspect

    from pyvbak import errors

    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    codes = {c.exit_code for _, c in inspect.getmembers(errors, inspect.isclass)
             if issubclass(c, errors.PyvbakError)}
    for code in sorted(codes | {0}):
        assert f" {code} " in out.split("Exit codes:")[1], code
