"""Whole runs of main.py: twin runs started in the same second get folders of their
own and the same numbers for the same seed, a killed run resumes to the uninterrupted
result, a diverging experiment is recorded and the list goes on, and wandb with no
network goes offline and says so once. main.py runs as a subprocess (the diverging list
in this process, through its cli() wrapper) with the working directory in a temporary
folder, on conftest's tiny digits checkpoints.
"""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import utils
from conftest import ROOT, run_here
from scripted import FAST, run


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def without_rte(row):
    """A results line without what differs between two identical runs: time and run folder id."""
    return {k: v for k, v in row.items() if k not in ("rte_s", "run_id")}


def summary_numbers(run_dir):
    """summary.csv as {(experiment, forget): {column: value}}, RTE columns left out."""
    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["experiment"], r["forget"]): {k: v for k, v in r.items() if not k.startswith("rte_s")}
            for r in rows}


# ---------------------------------------------------------------- twin runs, interruption, resume

def res_file(folder, ckpts):
    """Two experiments, one run each: a masked ascent with a gold standard, random labels
    on a random 10% (seeded forget set, random relabelling)."""
    exps = [{"checkpoint": str(ckpts["base"]), "class_to_forget": 0, "method": "ga_small", "lr": 0.01,
             "use_mask": True, "epochs": 1, "retrained": str(ckpts["gold"])},
            {"checkpoint": str(ckpts["base"]), "unlearning_rate": 0.1, "method": "rl", "lr": 0.01, "epochs": 1}]
    path = folder / "res.json"
    path.write_text(json.dumps(exps))
    return path


def main_cmd(*args):
    return [sys.executable, str(ROOT / "main.py"), *map(str, args)]


def quiet_env():
    return dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **FAST)


@pytest.fixture(scope="module")
def twins(ckpts, tmp_path_factory):
    """The same file run twice at once into one --out whose names for the next five
    minutes are already taken: both runs must find folders of their own."""
    tmp = tmp_path_factory.mktemp("twins")
    exp_file, out = res_file(tmp, ckpts), tmp / "out"
    now = time.time()
    taken = {out / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}_res" for s in range(300)}
    for d in taken:
        d.mkdir(parents=True)
        (d / "someone_elses").touch()
    procs = [subprocess.Popen(main_cmd("-L", exp_file, "-NL", "--out", out), cwd=tmp, env=quiet_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    new = sorted(set(d for d in out.iterdir()) - taken)
    return {"file": exp_file, "out": out, "taken": taken, "runs": new}


def test_two_runs_in_the_same_second_get_their_own_folders(twins):
    assert len(twins["runs"]) == 2
    for d in twins["taken"]:
        assert [p.name for p in d.iterdir()] == ["someone_elses"]
    for d in twins["runs"]:
        assert re.fullmatch(r"\d{8}-\d{6}_res-\d+", d.name)
        assert [(r["experiment"], r["run"]) for r in read_rows(d)] == [(0, 0), (1, 0)]


def test_same_seed_same_numbers(twins):
    a, b = twins["runs"]
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert [without_rte(r) for r in rows_a] == [without_rte(r) for r in rows_b]
    assert "avg_gap" in rows_a[0]["gap"] and rows_a[0]["mask_fraction"] == pytest.approx(0.5, abs=1e-6)
    assert summary_numbers(a) == summary_numbers(b)
    for name in ("00_ga_small_mask0.5_class-0.pt", "01_rl_random-0.1.pt", "masks/00_ga_small_mask0.5_class-0.pt"):
        sa, sb = (utils.load_checkpoint(d / name)["state_dict"] for d in (a, b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_killed_run_resumes_to_the_uninterrupted_result(twins, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(main_cmd("-L", twins["file"], "-NL", "--out", out), cwd=tmp_path, env=quiet_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            results = list(out.glob("*/results.jsonl"))
            if results and results[0].read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "main.py ended before it could be killed"
    (run_dir,) = out.iterdir()
    kept = (run_dir / "results.jsonl").read_text()
    assert kept.count("\n") == 1

    r = run("main.py", "--resume", run_dir, "-NL", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 already done" in r.stdout
    assert (run_dir / "results.jsonl").read_text().startswith(kept)  # the finished run is not redone
    reference = twins["runs"][0]
    assert [without_rte(x) for x in read_rows(run_dir)] == [without_rte(x) for x in read_rows(reference)]
    assert summary_numbers(run_dir) == summary_numbers(reference)
    assert (run_dir / "summary.md").read_text().strip().splitlines()[-1] in r.stdout


# ---------------------------------------------------------------- divergence

def test_diverging_run_is_recorded_and_the_list_goes_on(ckpts, tmp_path):
    base = {"checkpoint": str(ckpts["base"]), "class_to_forget": 0}
    exps = [{**base, "method": "ga", "lr": 1e6, "epochs": 3, "retrained": str(ckpts["gold"])},
            {**base, "method": "ft", "lr": 0.01, "epochs": 1}]
    (tmp_path / "div.json").write_text(json.dumps(exps))
    r = run_here("main.py", "-L", "div.json", "-NL", "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    diverged, after = read_rows(run_dir)
    epoch = diverged["diverged_at"]
    assert epoch is not None, "lr 1e6 did not make the loss non-finite"
    assert len(diverged["history"]) == epoch - 1  # every recorded epoch had a finite loss
    assert diverged["metrics"] is None and "gap" not in diverged  # nothing a mean could take in
    assert after["diverged_at"] is None and after["history"]  # the next experiment ran to its end
    ga, ft = "00_ga_class-0_lr1e+06_E3", "01_ft_class-0_lr0.01_E1"  # names say what differs
    assert not (run_dir / f"{ga}.pt").exists()  # no checkpoint full of NaN
    assert f"{ga}: diverged" in r.stderr and (run_dir / f"{ft}.pt").is_file()
    summary = summary_numbers(run_dir)
    row = summary[(ga, "class 0")]
    assert row["diverged"] == f"1/1 diverged (epoch {epoch})"
    assert row["UA"] == row["RA"] == row["avg_gap"] == ""  # not the base model's numbers
    assert summary[(ft, "class 0")]["diverged"] == ""
    md = (run_dir / "summary.md").read_text()
    ga_line = next(line for line in md.splitlines() if ga in line)
    assert f"1/1 diverged (epoch {epoch})" in ga_line and "| n/a | n/a |" in ga_line


# ---------------------------------------------------------------- wandb without network

def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BOGUS_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, like a real one

WANDB_CASES = {  # (environment, .env in the working directory, why offline)
    "no-key": ({}, None, "no API key (set WANDB_SECRET in .env)"),
    "bogus-key-in-env": ({"WANDB_SECRET": BOGUS_KEY}, None, "server not reachable"),
    "bogus-key-in-dotenv": ({}, f'WANDB_SECRET="{BOGUS_KEY}"\n', "server not reachable"),
}


@pytest.fixture(scope="module")
def wandb_runs(ckpts, tmp_path_factory):
    """main.py without -NL and with WANDB_MODE unset, one process per case, all at once."""
    procs = {}
    for name, (extra, dotenv, _) in WANDB_CASES.items():
        cwd = tmp_path_factory.mktemp(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
        # the sandbox has no network; a closed local port keeps it unreachable where there is one
        env.update(FAST, PYTHONWARNINGS="ignore", HOME=str(cwd / "home"), WANDB_DIR=str(cwd),
                   WANDB_CONFIG_DIR=str(cwd / "home"), WANDB_CACHE_DIR=str(cwd / "home"),
                   WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", **extra)
        if dotenv:
            (cwd / ".env").write_text(dotenv)
        streams = [open(cwd / "stdout.txt", "w"), open(cwd / "stderr.txt", "w")]
        proc = subprocess.Popen(main_cmd("-c", ckpts["base"], "-CF", "0", "-E", "1", "-M", "ft", "--out", "out"),
                                cwd=cwd, env=env, stdout=streams[0], stderr=streams[1])
        procs[name] = (proc, cwd, streams, time.time())
    runs = {}
    try:
        for name, (proc, cwd, streams, start) in procs.items():
            proc.wait(timeout=max(1, 300 - (time.time() - start)))  # a hang fails here
            for s in streams:
                s.close()
            runs[name] = (proc.returncode, cwd, (cwd / "stderr.txt").read_text())
    finally:
        for proc, *_ in procs.values():
            proc.kill()
    return runs


@pytest.mark.parametrize("name", WANDB_CASES)
def test_wandb_unreachable_goes_offline_and_says_so_once(wandb_runs, name):
    code, cwd, err = wandb_runs[name]
    assert code == 0, err
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)  # tqdm moves the cursor over its bars
    said = [s for s in re.split(r"[\r\n]", err) if "wandb" in s.lower()]  # and redraws them with \r
    assert said == [f"wandb: logging offline ({WANDB_CASES[name][2]}); use -NL to turn it off"], err
    (run_dir,) = (cwd / "out").iterdir()
    assert len(read_rows(run_dir)) == 1  # the run went on
    assert list((cwd / "wandb").glob("offline-run-*")), "no offline wandb run under WANDB_DIR"
