"""Atomic writes: a checkpoint save killed midway leaves the previous version whole,
the next write tidies a killed writer's temporary, and unique_dir finds a folder of its
own when another run takes the name first.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import utils
from conftest import ROOT
from scripted import FAST


SAVER = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from utils import save_checkpoint
path, version = sys.argv[1], int(sys.argv[2])
w = torch.empty(12_500_000)  # 50 MB
while True:
    save_checkpoint(path, {"w": w.fill_(version)}, {"version": version})
    print(version, flush=True)
    version += 1
"""


def kill_once_written(child, tmp, size, timeout=120):
    """SIGKILL `child` as soon as its temporary file holds `size` bytes: in mid-write."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if tmp.stat().st_size >= size:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    child.kill()
    child.wait(timeout=60)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    """A 50 MB checkpoint saved over and over, killed after 1 byte, 25 MB and 49 MB of
    the next version: each time the file is one complete version (the last announced one,
    or one renamed into place just before the kill)."""
    path, interrupted = tmp_path / "big.pt", []
    for k, size in enumerate((1, 25_000_000, 49_000_000)):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(1000 * k), str(ROOT)],
                                 stdout=subprocess.PIPE, text=True, env=dict(os.environ, **FAST))
        try:
            announced = [int(child.stdout.readline())]
        finally:
            kill_once_written(child, tmp_path / f".big.pt.{child.pid}.tmp", size)
        announced += [int(x) for x in child.stdout.read().split()]
        temps = list(tmp_path.glob(".big.pt.*.tmp"))
        interrupted.append(bool(temps))
        ck = utils.load_checkpoint(path)
        version = ck["config"]["version"]
        assert version in (announced[-1], announced[-1] + 1)
        assert ck["state_dict"]["w"].shape == (12_500_000,) and bool((ck["state_dict"]["w"] == version).all())
        for t in temps:
            t.unlink()
    assert any(interrupted), "no kill landed in the middle of a write"


def test_the_next_write_removes_a_killed_writers_temporary(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = int(finished.stdout)
    stale = tmp_path / f".m.json.{dead}.tmp"  # left by a writer killed mid-write
    live = tmp_path / f".m.json.{os.getppid()}.tmp"  # a writer still at work
    other = tmp_path / f".n.json.{dead}.tmp"  # another file's: tidied on that file's next write
    for t in (stale, live, other):
        t.write_text("half")
    utils.atomic_write_text(tmp_path / "m.json", "{}")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "m.json").read_text() == "{}"


def test_unique_dir_survives_another_run_starting_in_the_same_second(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def other_run_wins(self, *args, **kwargs):
        if self == tmp_path / "run" and not self.exists():
            real_mkdir(self)  # another process created it between our look and our mkdir
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_run_wins)
    mine = utils.unique_dir(tmp_path, "run")
    assert mine == tmp_path / "run-2" and mine.is_dir()

