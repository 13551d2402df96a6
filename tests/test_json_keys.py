"""The ``--json`` output of every command has exactly the keys README.md's "Every `--json`
key" table lists: scripts parse these, so a key added, renamed or dropped fails here until
the table says so too (session 27's docs audit found most of them undocumented)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import cli_json
from images import random_bytes, write_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: per command: (keys always there, keys there only in some case), and the nested objects'
#: keys.  A command printing a list is checked item by item.
EXPECTED = {
    "init": ({"repository", "id", "block_size"}, set()),
    "backup": ({"id", "snapshot_id", "vm", "disk", "size", "block_size", "parent", "bytes_scanned", "bytes_read",
                "changed_blocks", "changed_bytes", "new_blocks", "new_bytes", "stored_bytes", "packs_written",
                "duration", "phases", "cbt", "fallback_reason", "cbt_missed_blocks", "warnings", "cleaned_leftovers"},
               {"consistency_group"}),
    "snapshots": ({"id", "vm", "disk", "time", "sequence", "size", "block_size", "parent", "source", "cbt", "stats"},
                  {"consistency_group"}),
    "restore": ({"snapshot", "output", "size", "bytes_written", "blocks", "unique_blocks_read",
                 "blocks_from_other_copies", "flagged_copies", "write_mode", "duration", "phases",
                 "cleaned_leftovers"}, {"consistency_group"}),
    "verify": ({"ok", "error", "snapshots", "blocks_checked", "bytes_checked", "sampled_percent", "duration",
                "problem_count", "problems", "affected_snapshots", "snapshots_damaged", "snapshots_unread",
                "lost_blocks_by_cause", "lost_blocks_not_on_disks", "damaged_copies", "damaged_copy_count",
                "unreadable_copy_count", "unreadable_redundant_copies", "unreadable_redundant_copy_count",
                "damaged_pack_indexes", "damaged_pack_trailers", "orphan_snapshot_indexes", "unindexed_packs",
                "packs_left_alone", "flagged"}, {"repair", "pack_storage_problem"}),
    "forget": ({"forgotten", "dry_run"}, {"prune"}),
    "prune": ({"snapshots", "referenced_blocks", "packs_before", "packs_deleted", "packs_repacked", "packs_written",
               "packs_missing", "blocks_removed", "bytes_freed", "missing_blocks", "adopted",
               "orphan_snapshot_indexes", "temp_objects_removed", "problems", "dry_run", "duration"}, set()),
    "cbt-off": ({"source", "removed"}, set()),
}
NESTED = {
    ("backup", "phases"): {"prepare", "data", "commit"},
    ("restore", "phases"): {"prepare", "data", "sync"},
    ("snapshots", "stats"): {"bytes_scanned", "bytes_read", "changed_blocks", "changed_bytes", "new_blocks",
                             "new_bytes", "stored_bytes", "duration"},
    ("verify", "lost_blocks_by_cause"): {"bad_copy", "unreadable", "not_indexed", "adoptable"},
    ("verify", "unindexed_packs"): {"packs", "blocks"},
    ("verify", "flagged"): {"marker", "copies", "again", "cleared", "error"},
    ("verify", "repair"): {"complete", "adopted", "records_removed", "lost_marker", "packs_taken_for_lost",
                           "trailers_rebuilt", "trailers_not_rebuilt"},
}
#: the keys of each item of a list-valued key
ITEM_KEYS = {("verify", "problems"): {"digest", "reason"}}
#: backquoted words in the table that are values or options, not keys
NOT_KEYS = {"direct", "buffered", "null", "--verify-cbt", "--repair", "--prune"}


def readme_rows() -> dict[str, set[str]]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("#### Every `--json` key", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z-]+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`([^`]+)`", m.group(2)))
    return rows


def test_readme_table_names_every_key_and_no_other():
    rows = readme_rows()
    assert set(rows) == set(EXPECTED)
    for command, (always, sometimes) in EXPECTED.items():
        nested = set().union(*(keys for (c, _), keys in (*NESTED.items(), *ITEM_KEYS.items()) if c == command))
        keys = always | sometimes | nested
        words = rows[command] - NOT_KEYS
        assert keys <= words, f"README's row for {command} lacks {sorted(keys - words)}"
        # (forget's row names prune's keys by reference: "as prune's")
        assert words <= keys, f"README's row for {command} names {sorted(words - keys)}, which it does not print"


def check(command: str, doc) -> None:
    for item in doc if isinstance(doc, list) else [doc]:
        always, sometimes = EXPECTED[command]
        got = set(item)
        assert always <= got, f"{command} --json lacks {sorted(always - got)}"
        assert got <= always | sometimes, f"{command} --json prints undocumented {sorted(got - always - sometimes)}"
        for (c, key), keys in NESTED.items():
            if c == command and item.get(key) is not None:  # (flagged: null when nothing was looked at)
                assert set(item[key]) == keys, (command, key, sorted(item[key]))
        for (c, key), keys in ITEM_KEYS.items():
            if c == command:
                assert all(set(x) == keys for x in item[key]), (command, key, item[key][:3])


@pytest.mark.usefixtures("cli_work_dir")
def test_every_command_prints_the_documented_keys(tmp_path, capsys):
    repo, img, out = tmp_path / "repo", tmp_path / "disk.img", tmp_path / "out.img"
    img.write_bytes(random_bytes(2 << 20, seed=27))
    check("init", cli_json(capsys, ["init", str(repo)]))
    first = cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "vm"])
    check("backup", first)
    write_at(img, 65536, random_bytes(65536, seed=28))
    check("backup", cli_json(capsys, ["backup", str(img), "--repo", str(repo), "--vm", "vm"]))
    check("snapshots", cli_json(capsys, ["snapshots", "--repo", str(repo)]))
    check("restore", cli_json(capsys, ["restore", "vm@latest", str(out), "--repo", str(repo)]))
    check("verify", cli_json(capsys, ["verify", "--repo", str(repo)]))
    repaired = cli_json(capsys, ["verify", "--repair", "--repo", str(repo)])
    assert "repair" in repaired
    check("verify", repaired)
    check("forget", cli_json(capsys, ["forget", first["id"], "--dry-run", "--repo", str(repo)]))
    forgot = cli_json(capsys, ["forget", first["id"], "--prune", "--repo", str(repo)])
    check("forget", forgot)
    check("prune", forgot["prune"])
    check("prune", cli_json(capsys, ["prune", "--repo", str(repo)]))

    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1M"], check=True)
    check("cbt-off", cli_json(capsys, ["cbt-off", str(qcow2)]))

    # verify with the pack storage mark gone: the report says so, in pack_storage_problem
    os.remove(repo / "packs" / "pack-storage.json")
    from pyvbak.cli.main import main

    capsys.readouterr()
    assert main(["verify", "--repo", str(repo), "--json"]) == 6
    import json

    report = json.loads(capsys.readouterr().out)
    assert "pack_storage_problem" in report and report["ok"] is False
    check("verify", report)
