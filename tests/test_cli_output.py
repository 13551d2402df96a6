"""The CLI's result lines when the output cannot take them: a terminal whose encoding
lacks a name's characters, stdout on a full device.  A restore that put its file in
place is a success either way (it was a traceback and exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from images import MiB, assert_one_error_line, random_bytes

ROOT = Path(__file__).resolve().parent.parent


def pyvbak(*args, stdout=subprocess.PIPE, **env):
    return subprocess.run([sys.executable, "-m", "pyvbak", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_names_the_terminal_cannot_encode_are_escaped(tmp_path):
    img, repo = tmp_path / "d.img", tmp_path / "repo"
    img.write_bytes(random_bytes(MiB, seed=5))
    assert pyvbak("init", repo).returncode == 0
    p = pyvbak("backup", img, "--repo", repo, "--vm", "web-Жук")
    assert p.returncode == 0, p.stderr
    for args in (("snapshots", "--repo", repo), ("restore", "web-Жук@latest", tmp_path / "out.img", "--repo", repo)):
        p = pyvbak(*args, PYTHONIOENCODING="latin-1")
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        assert "web-\\u0416\\u0443\\u043a" in p.stdout, p.stdout
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_restore_whose_result_line_cannot_be_written_still_succeeds(tmp_path, unbuffered):
    """Block-buffered (PYTHONUNBUFFERED unset, as users run it: this machine sets it), the
    line waited for the interpreter's exit and failed there: "Exception ignored", exit 120."""
    img, repo = tmp_path / "d.img", tmp_path / "repo"
    img.write_bytes(random_bytes(MiB, seed=6))
    assert pyvbak("init", repo).returncode == 0
    assert pyvbak("backup", img, "--repo", repo, "--vm", "v").returncode == 0
    with open("/dev/full", "w") as full:
        p = pyvbak("restore", "v@latest", tmp_path / "out.img", "--repo", repo, stdout=full,
                   PYTHONUNBUFFERED=unbuffered)
    assert p.returncode == 0, p.stderr
    assert "restore completed" in p.stderr and "No space left" in p.stderr and "Exception ignored" not in p.stderr
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize("command", ["snapshots", "verify"])
def test_a_listing_whose_output_cannot_be_written_says_it_was_standard_output(tmp_path, unbuffered, command):
    """It said only "No space left on device", naming no file: the user looked at the
    repository's disk."""
    img, repo = tmp_path / "d.img", tmp_path / "repo"
    img.write_bytes(random_bytes(MiB, seed=11))
    assert pyvbak("init", repo).returncode == 0
    assert pyvbak("backup", img, "--repo", repo, "--vm", "v").returncode == 0
    with open("/dev/full", "w") as full:
        p = pyvbak(command, "--repo", repo, stdout=full, PYTHONUNBUFFERED=unbuffered)
    assert p.returncode == 1
    assert_one_error_line(p.stderr, "cannot write to standard output: No space left on device",
                          f"'pyvbak {command}'")
    assert "Exception ignored" not in p.stderr


def test_a_name_that_is_not_utf8_is_refused(tmp_path):
    """Typed in a non-UTF-8 locale, a name's bytes were stored as escapes that the same
    name typed in a UTF-8 session never matched (and restore.sh could not match)."""
    img, repo = tmp_path / "d.img", tmp_path / "repo"
    img.write_bytes(random_bytes(MiB, seed=7))
    assert pyvbak("init", repo).returncode == 0
    p = subprocess.run([sys.executable, "-m", "pyvbak", "backup", str(img), "--repo", str(repo), "--vm", b"caf\xe9"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C", "PYTHONUTF8": "0"})
    assert p.returncode == 2 and "not valid UTF-8" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not list((repo / "snapshots").glob("*.json"))


def backed_up_with_a_cache(tmp_path, seed: int):
    """(image, repository, cache dir, the repository's directory in it) after one backup
    and a listing, with their own cache."""
    img, repo, cache = tmp_path / "d.img", tmp_path / "repo", tmp_path / "cache"
    img.write_bytes(random_bytes(MiB, seed=seed))
    assert pyvbak("init", repo).returncode == 0
    assert pyvbak("backup", img, "--repo", repo, "--vm", "v", PYVBAK_CACHE_DIR=str(cache)).returncode == 0
    assert pyvbak("snapshots", "--repo", repo, PYVBAK_CACHE_DIR=str(cache)).returncode == 0
    (repo_dir,) = [d for d in cache.iterdir() if d.is_dir() and len(d.name) == 32]
    return img, repo, cache, repo_dir


def test_the_local_cache_is_private(tmp_path):
    _, _, _, repo_dir = backed_up_with_a_cache(tmp_path, seed=8)
    assert repo_dir.stat().st_mode & 0o777 == 0o700


def test_a_cache_an_earlier_pyvbak_left_open_is_made_private(tmp_path):
    img, repo, cache, repo_dir = backed_up_with_a_cache(tmp_path, seed=9)
    repo_dir.chmod(0o755)  # as an earlier pyvbak made it
    img.write_bytes(random_bytes(MiB, seed=10))
    assert pyvbak("backup", img, "--repo", repo, "--vm", "v", PYVBAK_CACHE_DIR=str(cache)).returncode == 0
    assert repo_dir.stat().st_mode & 0o777 == 0o700


def test_result_lines_show_a_path_holding_a_newline_escaped_on_one_line(tmp_path):
    """Error lines escaped it; the result lines printed it, a second line that read like
    another message ("b (block size 64.0 KiB)")."""
    repo, img = tmp_path / "r\nx", tmp_path / "i\nmages" / "d.img"
    img.parent.mkdir()
    img.write_bytes(random_bytes(MiB, seed=9))
    out = tmp_path / "out\n.img"
    for args in (("init", repo), ("backup", img, "--repo", repo, "--vm", "vm"),
                 ("restore", "vm@latest", out, "--repo", repo)):
        p = pyvbak(*args)
        assert p.returncode == 0, p.stderr
        [line] = p.stdout.splitlines()
        assert args[0] == "backup" or "\\n" in line, line  # (a backup's line names no path)
    assert out.read_bytes() == img.read_bytes()
