"""`pyvbak backup` processes killed with SIGKILL at random instants, between random
changes to the image, forgets, prunes and restores (with pyvbak and with restore.sh):
after every step the repository verifies, every snapshot that completed restores to the
bytes it was made from, and the next backup leaves no temp object behind.  Real
processes, real kills: what test_randomized_operations.py does in-process with injected
crashes.  PYVBAK_FUZZ_SEEDS=20 searches longer outside CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_tool
from pyvbak.repo.repository import Repository
from pyvbak.repo.verify import verify_repository

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SIZE_MIB = 32


def _image(path: Path, rng: random.Random) -> None:
    with open(path, "wb") as f:
        for i in range(SIZE_MIB):
            k = rng.random()
            text = ((b"log line %d " % i) * 100_000)[:MiB]
            f.write(rng.randbytes(MiB) if k < 0.4 else bytes(MiB) if k < 0.7 else text)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("seed", range(int(os.environ.get("PYVBAK_FUZZ_SEEDS", "2"))))
def test_random_kills_of_real_backups_keep_every_promise(tmp_path, seed):
    require_tool("zstd", "zstd")
    rng = random.Random(seed)
    img, repo = tmp_path / "disk.img", str(tmp_path / "repo")
    _image(img, rng)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def cli(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "pyvbak", *args], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, f"pyvbak {' '.join(args)}: {p.stderr}"
        return p.stdout

    cli("init", repo)
    made: dict[str, str] = {}  # snapshot id -> sha256 of the image it was made from
    for step in range(6):
        with open(img, "r+b") as f:  # the VM writes
            for _ in range(rng.randint(1, 20)):
                off = rng.randrange(0, SIZE_MIB * MiB)
                f.seek(off)
                f.write(rng.randbytes(min(rng.choice([4096, 65536, MiB]), SIZE_MIB * MiB - off)))
        if rng.random() < 0.7:  # a backup killed at an arbitrary instant
            p = subprocess.Popen([sys.executable, "-m", "pyvbak", "backup", str(img), "--repo", repo, "--vm", "v",
                                  "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            if rng.random() < 0.75:
                # while it works on the repository: an arbitrary instant of 0.05-0.5 s fell
                # there only 12-17 % of the time (the interpreter's start-up and imports
                # come first)
                locks = Path(repo) / "locks"
                deadline = time.monotonic() + 60
                while p.poll() is None and time.monotonic() < deadline and not (
                        locks.is_dir() and any(n.endswith(".json") for n in os.listdir(locks))):
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.08))
            else:
                time.sleep(rng.uniform(0.05, 0.5))  # an arbitrary instant, on purpose (start-up too)
            p.kill()
            p.wait(30)
        digest = _sha(img)
        made[json.loads(cli("backup", str(img), "--repo", repo, "--vm", "v", "--json"))["id"]] = digest
        r = Repository.open(repo)
        report = verify_repository(r).report
        assert report["ok"], report
        assert not [f for dp, _, fs in os.walk(repo) for f in fs if f.startswith(".pyvbak-tmp")]
        listed = {s.id for s in r.snapshots()}
        assert set(made) <= listed  # a killed run never shows up half made, a finished one is there
        sid = rng.choice(sorted(made))
        out = tmp_path / f"out-{step}.img"
        if rng.random() < 0.4:
            subprocess.run(["sh", f"{repo}/restore.sh", sid, str(out)], check=True, capture_output=True, timeout=300)
        else:
            cli("restore", sid, str(out), "--repo", repo)
        assert _sha(out) == made[sid], f"step {step}: snapshot {sid} does not restore to its image"
        out.unlink()
        if rng.random() < 0.3:
            cli("forget", "--keep-last", "2", "--vm", "v", "--repo", repo, "--json")
            made = {k: v for k, v in made.items() if k in {s.id for s in Repository.open(repo).snapshots()}}
            cli("prune", "--repo", repo)
