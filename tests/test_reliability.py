"""Reliability: what goes wrong in practice, through the scripts as a user runs them.

Bad input at every entry point (one table), unsafe and torn checkpoints, a process
killed in the middle of a save or of an experiment list, a diverging method, wandb
with no network, run folders, and determinism. Scripts run as subprocesses with the
working directory in a temporary folder, on conftest's tiny digits checkpoints.
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
from pathlib import Path

import pytest
import torch

import utils
from conftest import ROOT, run_script

# One thread per process: on a shared 2-core machine, torch's default of two threads
# per process was measured 2.5x slower (main.py: 37 s against 15 s).
FAST = {"OMP_NUM_THREADS": "1"}


def run(script, *args, cwd, timeout=300, env=None):
    return run_script(script, *args, cwd=cwd, timeout=timeout, env={**FAST, **(env or {})})


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


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


# ---------------------------------------------------------------- files the table builds

class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil(path, tmp, ckpts):
    torch.save({"state_dict": {}, "config": {}, "x": Payload(tmp / "MARKER")}, path)


def truncated(path, tmp, ckpts):
    data = ckpts["base"].read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garbled(path, tmp, ckpts):
    data = bytearray(ckpts["base"].read_bytes())
    data[:64] = bytes(64)  # the zip header gone: torch falls back to reading it as a pickle
    path.write_bytes(bytes(data))


def other_dataset(path, tmp, ckpts):
    ck = utils.load_checkpoint(ckpts["gold"])
    utils.save_checkpoint(path, ck["state_dict"], dict(ck["config"], dataset="fashionmnist"))


def old_format(path, tmp, ckpts):
    """A checkpoint as the toolkit wrote them before validation sets were drawn first."""
    ck = utils.load_checkpoint(ckpts["base"])
    utils.save_checkpoint(path, ck["state_dict"], {k: v for k, v in ck["config"].items() if k != "format"})


def nan_lr(path, tmp, ckpts):
    path.write_text(f'[{{"checkpoint": "{ckpts["base"]}", "class_to_forget": 0, "lr": NaN}}]')


DIR = "<dir>"
DROP = object()


def exp(**kw):
    """One experiment of a file: a valid class-0 forgetting of the base model, then `kw`."""
    entry = {"checkpoint": "{base}", "class_to_forget": 0, "epochs": 1, "method": "ft", **kw}
    return [{k: v for k, v in entry.items() if v is not DROP}]


def fill(obj, subs):
    if isinstance(obj, str):
        for key, value in subs.items():
            obj = obj.replace("{" + key + "}", str(value))
        return obj
    if isinstance(obj, list):
        return [fill(x, subs) for x in obj]
    if isinstance(obj, dict):
        return {k: fill(v, subs) for k, v in obj.items()}
    return obj


def make_files(tmp, files, ckpts, subs):
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == DIR:
            path.mkdir(exist_ok=True)
        elif callable(content):
            content(path, tmp, ckpts)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(fill(content, subs)))


# ---------------------------------------------------------------- 1. bad input, every entry point

MAIN_FILE = ("-L", "{tmp}/exp.json", "-NL", "--out", "{tmp}/out")
MAIN_FLAGS = ("-E", "1", "-M", "ft", "-NL", "--out", "{tmp}/out")
TRAIN = ("--dataset", "digits", "--model", "test_resnet", "--epochs", "1", "-NL", "--save-dir", "{tmp}/ckpt")
BASE_TEST = ("--out", "{tmp}/bt.json", "--no-mia")
IDX = "{tmp}/idx.json"

BAD_INDEX_FILES = [  # (id, content, message): each through main.py
    ("not-a-list", {"0": 1}, "must hold a list of indices, got dict"),
    ("non-integers", [1, 2.5], "holds non-integers, e.g. 2.5"),
    ("duplicates", [3, 7, 3], "index 3 appears more than once"),
    ("out-of-range", [0, 1437], "index 1437 out of range 0..1436"),
    ("empty", [], "is empty: nothing to forget"),
]


def case(id, script, args, files, message):
    return pytest.param(script, args, files, message, id=id)


BAD_INPUT = [
    # main.py, experiment files (test_main.py covers the file's shape, unknown keys, wrong
    # bool/int types, two specs, class 10, a missing checkpoint, mask_thr, lr < 0, epochs 0)
    case("main-unlearning-rate-1", "main.py", MAIN_FILE,
         {"exp.json": exp(class_to_forget=DROP, unlearning_rate=1.0)},
         "experiment 0: unlearning_rate: 1.0 outside (0, 1)"),
    case("main-lr-0", "main.py", MAIN_FILE, {"exp.json": exp(lr=0)}, "experiment 0: lr: must be positive, got 0"),
    case("main-epochs-negative", "main.py", MAIN_FILE, {"exp.json": exp(epochs=-2)},
         "experiment 0: epochs: must be positive, got -2"),
    case("main-lr-string", "main.py", MAIN_FILE, {"exp.json": exp(lr="0.1")},
         'experiment 0: lr: expected float, got "0.1"'),
    case("main-no-forget-spec", "main.py", MAIN_FILE, {"exp.json": exp(class_to_forget=DROP)},
         "give exactly one of class_to_forget, unlearning_rate, idxs_to_forget (got none)"),
    case("main-retrained-other-dataset", "main.py", MAIN_FILE,
         {"other.pt": other_dataset, "exp.json": exp(retrained="{tmp}/other.pt")},
         "experiment 0: retrained: {tmp}/other.pt was trained on fashionmnist, the checkpoint on digits"),
    case("main-idx-missing", "main.py", MAIN_FILE, {"exp.json": exp(class_to_forget=DROP, idxs_to_forget=IDX)},
         "experiment 0: idxs_to_forget: index file {tmp}/idx.json not found"),
    *[case(f"main-idx-{id}", "main.py", MAIN_FILE,
           {"idx.json": content, "exp.json": exp(class_to_forget=DROP, idxs_to_forget=IDX)},
           ("experiment 0: idxs_to_forget: index file {tmp}/idx.json", message))
      for id, content, message in BAD_INDEX_FILES],
    # main.py, flags and unsafe or damaged checkpoints
    case("main-nexp-0", "main.py", ("-c", "{base}", "-CF", "0", "--nexp", "0", *MAIN_FLAGS), {},
         "--nexp must be at least 1, got 0"),
    case("main-flags-class-out-of-range", "main.py", ("-c", "{base}", "-CF", "10", *MAIN_FLAGS), {},
         "command line: experiment 0: class_to_forget: class 10 out of range 0..9"),
    case("main-resume-not-a-run", "main.py", ("--resume", "{tmp}", "-NL"), {}, "is not a run folder (no config.json)"),
    case("main-evil-checkpoint", "main.py", ("-c", "{tmp}/evil.pt", "-CF", "0", *MAIN_FLAGS), {"evil.pt": evil},
         "checkpoint: checkpoint {tmp}/evil.pt refused: it holds objects other than tensors"),
    case("main-evil-retrained", "main.py", MAIN_FILE, {"evil.pt": evil, "exp.json": exp(retrained="{tmp}/evil.pt")},
         "experiment 0: retrained: checkpoint {tmp}/evil.pt refused"),
    case("main-truncated-checkpoint", "main.py", ("-c", "{tmp}/half.pt", "-CF", "0", *MAIN_FLAGS),
         {"half.pt": truncated}, "checkpoint: checkpoint {tmp}/half.pt is truncated or corrupted"),
    case("main-lr-nan", "main.py", MAIN_FILE, {"exp.json": nan_lr},
         "experiment 0: lr: must be a finite number, got NaN"),
    case("main-flag-lr-inf", "main.py", ("-c", "{base}", "-CF", "0", "-LR", "inf", "-NL", "--out", "{tmp}/out"), {},
         "command line: experiment 0: lr: must be a finite number, got Infinity"),
    case("main-out-not-writable", "main.py", ("-c", "{base}", "-CF", "0", "-E", "1", "-NL", "--out", "/proc/salun"),
         {}, "--out /proc/salun is not writable"),
    case("main-old-format", "main.py", ("-c", "{tmp}/old.pt", "-CF", "0", *MAIN_FLAGS), {"old.pt": old_format},
         "checkpoint: checkpoint {tmp}/old.pt has the old split format 1"),
    case("main-idx-names-validation", "main.py", MAIN_FILE,
         {"idx.json": [5, 59], "exp.json": exp(class_to_forget=DROP, idxs_to_forget=IDX)},
         "experiment 0: idxs_to_forget: index file {tmp}/idx.json names 1 validation sample(s) of this model "
         "(e.g. index 59)"),
    case("main-resume-other-flags", "main.py", ("--resume", "{tmp}/run", "--nexp", "3", "-NL"),
         {"run/config.json": {"experiments": [], "names": [], "nexp": 1}},
         "--resume continues {tmp}/run exactly as it was configured; --nexp would change it"),
    case("main-resume-older-folder", "main.py", ("--resume", "{tmp}/run", "-NL"),
         {"run/config.json": {"experiments": [], "names": [], "nexp": 1, "data_dir": "data"}},
         "{tmp}/run was written by an older version of main.py"),
    # train.py (test_train.py covers --cf 10, --unlr 1.5, two specs, a missing --itf,
    # an unknown dataset, a misspelt model, --epochs 0, and --overwrite)
    case("train-itf-duplicates", "train.py", (*TRAIN, "--itf", IDX), {"idx.json": [3, 7, 3]},
         "index 3 appears more than once"),  # the other index-file cases share main.py's reader
    case("train-itf-names-validation", "train.py", (*TRAIN, "--itf", IDX), {"idx.json": [59]},
         "index file {tmp}/idx.json names 1 validation sample(s) of this model (e.g. index 59)"),
    case("train-save-dir-not-writable", "train.py", (*TRAIN[:-1], "/proc/salun"), {},
         "--save-dir /proc/salun is not writable"),
    case("train-unknown-model", "train.py", (*TRAIN, "--model", "no_such_net"),
         {}, "unknown model 'no_such_net'; see timm.list_models() (e.g. resnet18"),
    case("train-unknown-dataset", "train.py", (*TRAIN, "--dataset", "mnist2"),
         {}, "unknown dataset 'mnist2'; known: cifar10, cifar100, svhn, mnist, fashionmnist, digits"),
    # base_test.py
    case("base-test-evil", "base_test.py", ("-c", "{base}", "{tmp}/evil.pt", *BASE_TEST), {"evil.pt": evil},
         "checkpoint {tmp}/evil.pt refused"),
    case("base-test-garbled", "base_test.py", ("-c", "{tmp}/garbled.pt", *BASE_TEST), {"garbled.pt": garbled},
         "checkpoint {tmp}/garbled.pt is truncated or corrupted"),
    case("base-test-class-out-of-range", "base_test.py", ("-c", "{base}", "--cf", "10", *BASE_TEST), {},
         "class_to_forget: class 10 out of range 0..9"),
    case("base-test-unlr", "base_test.py", ("-c", "{base}", "--unlr", "1.5", *BASE_TEST), {},
         "unlearning_rate: 1.5 outside (0, 1)"),
    case("base-test-out-not-writable", "base_test.py", ("-c", "{base}", "--out", "/proc/salun/bt.json"), {},
         "--out folder /proc/salun is not writable"),
    case("base-test-old-format", "base_test.py", ("-c", "{tmp}/old.pt", *BASE_TEST), {"old.pt": old_format},
         "checkpoint {tmp}/old.pt has the old split format 1 (its validation set depends on its forget set); "
         "retrain it with train.py"),
    case("base-test-itf-duplicates", "base_test.py", ("-c", "{base}", "--itf", IDX, *BASE_TEST),
         {"idx.json": [5, 5]}, "index 5 appears more than once"),
    # the latent-space scripts
    case("features-empty-folder", "feature_extraction.py", ("-D", "{tmp}/ck", "-S", "10", "--out", "{tmp}/feat"),
         {"ck": DIR}, "no checkpoints (*.pt) in {tmp}/ck"),
    case("features-wrong-file", "feature_extraction.py", ("-D", "{tmp}/ck", "-S", "10", "--out", "{tmp}/feat"),
         {"ck/notes.pt": b"not a checkpoint\n"}, "checkpoint {tmp}/ck/notes.pt is truncated or corrupted"),
    case("features-evil-file", "feature_extraction.py", ("-D", "{tmp}/ck", "-S", "10", "--out", "{tmp}/feat"),
         {"ck/evil.pt": evil}, "checkpoint {tmp}/ck/evil.pt refused"),
    case("wasserstein-empty-folder", "wasserstein.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft": DIR}, "no features files (*.json) in {tmp}/ft"),
    case("wasserstein-wrong-file", "wasserstein.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft/a.json": {"all_features": [[1, 2]]}}, "{tmp}/ft/a.json is not a features file (no all_labels, proto)"),
    case("tsne-empty-folder", "tsne_vis.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft": DIR}, "no features files (*.json) in {tmp}/ft"),
    case("tsne-wrong-file", "tsne_vis.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft/a.json": b"[1, 2"}, "{tmp}/ft/a.json is not valid JSON"),
]


@pytest.mark.parametrize("script, args, files, message", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ckpts, tmp_path, script, args, files, message):
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} is not written yet")
    subs = {"tmp": tmp_path, "base": ckpts["base"], "gold": ckpts["gold"]}
    make_files(tmp_path, files, ckpts, subs)
    before = tree(tmp_path)
    r = run(script, *fill(list(args), subs), cwd=tmp_path, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in (message,) if isinstance(message, str) else message:
        assert fill(part, subs) in lines[0]
    assert tree(tmp_path) == before  # no output/, checkpoints/, features/, images/, --out
    assert not (tmp_path / "MARKER").exists()  # an unsafe checkpoint never ran its code


# ---------------------------------------------------------------- 3. atomic writes

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


# ---------------------------------------------------------------- 4, 7, 8: twin runs, interruption, resume

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


# ---------------------------------------------------------------- 5. divergence

def test_diverging_run_is_recorded_and_the_list_goes_on(ckpts, tmp_path):
    base = {"checkpoint": str(ckpts["base"]), "class_to_forget": 0}
    exps = [{**base, "method": "ga", "lr": 1e6, "epochs": 3, "retrained": str(ckpts["gold"])},
            {**base, "method": "ft", "lr": 0.01, "epochs": 1}]
    (tmp_path / "div.json").write_text(json.dumps(exps))
    r = run("main.py", "-L", "div.json", "-NL", "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    diverged, after = read_rows(run_dir)
    epoch = diverged["diverged_at"]
    assert epoch is not None, "lr 1e6 did not make the loss non-finite"
    assert len(diverged["history"]) == epoch - 1  # every recorded epoch had a finite loss
    assert diverged["metrics"] is None and "gap" not in diverged  # nothing a mean could take in
    assert after["diverged_at"] is None and after["history"]  # the next experiment ran to its end
    assert not (run_dir / "00_ga_class-0.pt").exists()  # no checkpoint full of NaN
    assert "00_ga_class-0: diverged" in r.stderr and (run_dir / "01_ft_class-0.pt").is_file()
    summary = summary_numbers(run_dir)
    row = summary[("00_ga_class-0", "class 0")]
    assert row["diverged"] == f"1/1 diverged (epoch {epoch})"
    assert row["UA"] == row["RA"] == row["avg_gap"] == ""  # not the base model's numbers
    assert summary[("01_ft_class-0", "class 0")]["diverged"] == ""
    md = (run_dir / "summary.md").read_text()
    ga_line = next(line for line in md.splitlines() if "00_ga_class-0" in line)
    assert f"1/1 diverged (epoch {epoch})" in ga_line and "| n/a | n/a |" in ga_line


# ---------------------------------------------------------------- 6. wandb without network

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
    said = [s for s in re.split(r"[\r\n]", err) if "wandb" in s.lower()]  # tqdm redraws with \r
    assert said == [f"wandb: logging offline ({WANDB_CASES[name][2]}); use -NL to turn it off"], err
    (run_dir,) = (cwd / "out").iterdir()
    assert len(read_rows(run_dir)) == 1  # the run went on
    assert list((cwd / "wandb").glob("offline-run-*")), "no offline wandb run under WANDB_DIR"
