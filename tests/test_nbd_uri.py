import pytest

from pyvbak.errors import UsageError
from pyvbak.sources.nbd import parse_nbd_uri


@pytest.mark.parametrize("uri,expected", [
    ("nbd://example.com/disk0", {"transport": "tcp", "host": "example.com", "port": 10809, "socket": None, "export": "disk0"}),
    ("nbd://127.0.0.1:12345/", {"transport": "tcp", "host": "127.0.0.1", "port": 12345, "socket": None, "export": ""}),
    ("nbd://h", {"transport": "tcp", "host": "h", "port": 10809, "socket": None, "export": ""}),
    ("nbd://[::1]:99/a%20b/c", {"transport": "tcp", "host": "::1", "port": 99, "socket": None, "export": "a b/c"}),
    ("nbd+unix:///disk0?socket=/run/x.sock", {"transport": "unix", "host": None, "port": None, "socket": "/run/x.sock", "export": "disk0"}),
    ("nbd+unix://?socket=/s", {"transport": "unix", "host": None, "port": None, "socket": "/s", "export": ""}),
])
def test_parse(uri, expected):
    assert parse_nbd_uri(uri) == expected


@pytest.mark.parametrize("uri", [
    "disk.img", "http://h/x", "nbd:///x", "nbd://h:notaport/x", "nbd://h:70000/x", "nbd://h/x?socket=/s",
    "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd+unix:///x?socket=/a&socket=/b", "nbds://h/x",
    "nbd+unix:///x?socket=", "nbd://h/x#frag",
])
def test_malformed(uri):
    with pytest.raises(UsageError):
        parse_nbd_uri(uri)


@pytest.mark.parametrize("spec,disk", [
    ("/var/lib/vm/web-disk0.qcow2", "web-disk0"),
    ("/var/lib/vm/web01.data.img", "web01.data"),  # not "web01", the root disk's name too
    ("/var/lib/vm/noext", "noext"),
    ("/dev/vg/vm-disk", "vm-disk"),
    ("nbd://host/exp", "exp"),
    ("nbd://host/vms/web/disk0", "vms-web-disk0"),  # '/' is not allowed in disk names
    ("nbd+unix:///?socket=/run/x.sock", "disk0"),
    ("qemu:///run/qmp.sock?node=drive-virtio0", "drive-virtio0"),
    ("qemu:///run/qmp.sock?device=virtio-disk0", "virtio-disk0"),
])
def test_default_disk_names_are_valid_names(spec, disk):
    from pyvbak.hypervisors import disk_names
    from pyvbak.repo.snapshots import check_vm_disk_names

    assert disk_names(spec) == [disk]
    check_vm_disk_names("vm", disk)


def test_file_source_read_ranges_into(tmp_path):
    """The engine's batched read of an image file: ranges back to back, clipped at the
    end; a file that shrank under a range inside its recorded size is an error."""
    import os

    from pyvbak.errors import SourceError
    from pyvbak.sources.file import FileSource

    data = os.urandom(300_000)
    img = tmp_path / "disk.img"
    img.write_bytes(data)
    with FileSource(str(img)) as src:
        ranges = [(0, 4096), (65536, 70_000), (299_000, 4096)]
        buf = bytearray(sum(n for _, n in ranges))
        n = src.read_ranges_into(ranges, buf)
        assert n == 4096 + 70_000 + 1000 and bytes(buf[:n]) == data[:4096] + data[65536:135_536] + data[299_000:]
        os.truncate(img, 100_000)
        with pytest.raises(SourceError, match="shrank while being read"):
            src.read_ranges_into([(90_000, 20_000)], bytearray(20_000))


def test_an_unknown_nbd_unix_parameter_is_named():
    """It was blamed on the socket parameter."""
    for uri in ("nbd+unix:///x?socket=/s&foo=1", "nbd+unix:///x?foo=1&socket=/s"):
        with pytest.raises(UsageError, match="unknown query parameter 'foo'"):
            parse_nbd_uri(uri)


@pytest.mark.parametrize("spec, code, says", [
    # schemes are case-insensitive (RFC 3986): these reach QEMU's and the NBD client's checks
    ("QEMU:///nonexistent/qmp.sock?node=disk0", 4, "/nonexistent/qmp.sock does not exist"),
    ("Nbd+Unix:///disk0?socket=/nonexistent/nbd.sock", 4, "/nonexistent/nbd.sock"),
    # QEMU's own spellings, which were taken for image file names that did not exist
    ("qemu:vm/qmp.sock?node=disk0", 2, "qemu:///ABSOLUTE/PATH/QMP.SOCK"),
    ("nbd:unix:/run/nbd.sock:exportname=disk0", 2, "nbd+unix:///EXPORT?socket=PATH"),
    # a socket path with a trailing slash was said not to exist ("is the VM running?")
    ("qemu:///run/vm/qmp.sock/?node=disk0", 2, "ends in '/'"),
    ("qemu:////", 2, "has no QMP socket path"),  # (not "name the socket itself, qemu://")
    # RFC 8089: file://HOST/PATH - "file://x.img" was read as ./x.img
    ("file://x.img", 2, "file:///ABSOLUTE/PATH"),
    ("file://", 2, "has no path"),
    ("file://localhost/nonexistent/x.img", 4, "/nonexistent/x.img does not exist"),  # this host
])
def test_source_spellings_get_an_error_that_points_the_right_way(tmp_path, capsys, spec, code, says):
    from pyvbak.cli.main import main

    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    capsys.readouterr()
    assert main(["backup", spec, "--repo", repo, "--vm", "v"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "unsupported source" not in err, err


def test_a_file_named_like_a_qemu_spelling_is_still_a_file(tmp_path, capsys, monkeypatch):
    from pyvbak.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "qemu:disk.img").write_bytes(b"\x01" * 65536)
    (tmp_path / "File:").mkdir()
    (tmp_path / "File:" / "x.img").write_bytes(b"\x02" * 65536)
    (tmp_path / "x.img").write_bytes(b"\x03" * 65536)  # what "File://x.img" was read as
    assert main(["init", "repo"]) == 0
    assert main(["backup", "qemu:disk.img", "--repo", "repo", "--vm", "v"]) == 0
    assert main(["backup", "File://x.img", "--repo", "repo", "--vm", "w", "--disk", "d"]) == 0
    assert main(["restore", "w/d@latest", str(tmp_path / "out.img"), "--repo", "repo"]) == 0
    assert (tmp_path / "out.img").read_bytes() == b"\x02" * 65536
    (tmp_path / "file:").mkdir()  # the lower-case spelling too
    (tmp_path / "file:" / "x.img").write_bytes(b"\x04" * 65536)
    assert main(["backup", "file://x.img", "--repo", "repo", "--vm", "u", "--disk", "d"]) == 0
    assert main(["restore", "u/d@latest", str(tmp_path / "out2.img"), "--repo", "repo"]) == 0
    assert (tmp_path / "out2.img").read_bytes() == b"\x04" * 65536


def test_library_callers_get_the_same_reading_of_a_source_as_the_cli(tmp_path):
    """backup_source and open_source are the library's entry points: "FILE:///..." and
    "file://localhost/..." were refused there as unsupported sources (only the CLI read
    them through source_spec)."""
    from pyvbak.cli.backup_cmd import backup_source
    from pyvbak.hypervisors import open_source
    from pyvbak.repo.repository import Repository

    img = tmp_path / "d.img"
    img.write_bytes(b"\x05" * 65536 * 3)
    for spec in (f"FILE://{img}", f"file://LocalHost{img}", f"file:{img}"):
        with open_source(spec) as (src, session):
            assert session is None and src.read(0, 4) == b"\x05" * 4
    repo = Repository.init(str(tmp_path / "repo"))
    results, _ = backup_source(repo, f"File://localhost{img}", vm="v", disk="d", show_progress=False)
    assert [r.new_blocks for r in results] == [1] and repo.latest("v", "d") is not None


def test_a_file_uri_source_is_percent_decoded(tmp_path, capsys):
    """file:///a%20b.img (Path.as_uri, file managers) said "does not exist"."""
    from pathlib import Path

    from pyvbak.cli.main import main

    img = tmp_path / "my disk.img"
    img.write_bytes(b"\x06" * 65536)
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    assert main(["backup", Path(img).as_uri(), "--repo", repo, "--vm", "v", "--disk", "d"]) == 0
    assert main(["restore", "v/d@latest", str(tmp_path / "out.img"), "--repo", repo]) == 0
    assert (tmp_path / "out.img").read_bytes() == b"\x06" * 65536
    capsys.readouterr()
    assert main(["backup", f"file://{img}?x", "--repo", repo, "--vm", "v", "--disk", "d"]) == 2
    assert "source" in capsys.readouterr().err


def test_a_file_uri_source_is_the_absolute_path_even_where_a_relative_one_of_that_spelling_exists(tmp_path, capsys,
                                                                                                 monkeypatch):
    """file:///ABS read ./file:/ABS when the current directory held a "file:" directory with
    such a path in it - another disk, backed up without a word.  A repository
    location was read as the absolute path; both are now."""
    from pyvbak.cli.main import main

    cwd = tmp_path / "cwd"
    meant = tmp_path / "meant.img"
    meant.write_bytes(b"\x07" * 65536)
    decoy = cwd / f"file:{meant}"
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(b"\x08" * 65536)
    monkeypatch.chdir(cwd)
    repo = str(tmp_path / "repo")
    assert main(["init", repo]) == 0
    for i, spec in enumerate((f"file://{meant}", f"FILE://localhost{meant}")):
        assert main(["backup", spec, "--repo", repo, "--vm", "v", "--disk", f"d{i}"]) == 0
        assert main(["restore", f"v/d{i}@latest", str(tmp_path / f"out{i}.img"), "--repo", repo]) == 0
        assert (tmp_path / f"out{i}.img").read_bytes() == b"\x07" * 65536


@pytest.mark.parametrize("socket_path", ["/tmp/w?x#y%20/s.sock", "/tmp/wp%41/s.sock", "/tmp/a+b/s.sock",
                                         "/tmp/w d\nx/s.sock", "/tmp/ü &=;/s.sock", "relative/s.sock"])
@pytest.mark.parametrize("export", ["pyvbak", "pyvbak-1-2", "a b/c#d?e%f"])
def test_an_nbd_unix_uri_made_here_gives_back_its_socket_and_export(socket_path, export):
    # (the URI of the frozen view pyvbak serves from its work dir: whatever the path holds)
    from pyvbak.sources.nbd import nbd_unix_uri

    parsed = parse_nbd_uri(nbd_unix_uri(export, socket_path))
    assert (parsed["transport"], parsed["socket"], parsed["export"]) == ("unix", socket_path, export)


@pytest.mark.parametrize("spec", ["ftp://host/disk.img", "http://nohost/y.qcow2", "nbds://h/e.vmdk", "HTTP://h/x"])
def test_an_unsupported_uri_is_refused_before_any_repository_is_opened_or_made(tmp_path, capsys, monkeypatch, spec):
    """A URI no kind of source reads is refused as one, with the other checks of the
    arguments: it was refused only when its disk was opened - after the default
    repository was created - and one ending in an image suffix was taken for a missing
    image file (exit 4, "does not exist"; session 25)."""
    from pyvbak.cli.main import main

    monkeypatch.delenv("PYVBAK_REPO", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("PYVBAK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["backup", spec, "--vm", "v"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unsupported source '{spec.split('://')[0]}://'" in err, err
    assert not (tmp_path / "data").exists()
