"""main.py --executor ray on a local two-worker Ray: the same numbers as the local executor run
for run, a task that raises recorded while the others finish, an interrupted study that
resumes (Ctrl-C prints the command), a worker killed mid-study, --save none and --save all.
audit.py --executor ray: the local audit's numbers and reference models, and a task that
fails twice stops the audit.

Ray starts once for the module (in this process, two CPUs); every main.py joins it with
--ray-address, as it would join a cluster. One thread per worker and per local run, so the
two executors compute the same sums.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import utils
from conftest import ROOT, run_here, run_script
from scripted import FAST, run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as main.py starts Ray: workers not niced
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, _node_ip_address="127.0.0.1")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def experiments(ckpts, failing=False):
    """A masked run with a gold standard, gradient ascent on a random 10% and, when asked, a
    method setting that passes the checks but raises when the run starts (cf_k needs k below the
    model's number of layers)."""
    base = {"checkpoint": str(ckpts["base"]), "epochs": 1}
    exps = [{**base, "class_to_forget": 0, "method": "rl", "lr": 0.03, "use_mask": True,
             "retrained": str(ckpts["gold"])},
            {**base, "unlearning_rate": 0.1, "method": "ga_small", "lr": 0.01}]
    return exps + ([{**base, "class_to_forget": 0, "method": "cf_k", "method_args": {"k": 100}}] if failing else [])


def rows_of(run_dir):
    """results.jsonl as {(experiment, run): line}, without what differs between identical runs."""
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return {(r["experiment"], r["run"]): {k: v for k, v in r.items() if k not in ("rte_s", "run_id")} for r in rows}


def start(tmp, *args, script="main.py"):
    """The script as a terminal starts it, Ctrl-C included: a suite run in the background (`make
    test &`, a CI runner) has SIGINT ignored, which its children would inherit, and Python then
    never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=tmp, text=True,
                            env=dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **FAST),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_after_first_line(proc, results, timeout=240):
    """Ctrl-C as soon as the first run's line is in results.jsonl; (stdout, stderr)."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=120)
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def study(ckpts, ray_address, tmp_path_factory):
    """Two experiments run locally (--save all); the same two and a third, failing one on Ray,
    interrupted with Ctrl-C after the first finished run and resumed on Ray."""
    tmp = tmp_path_factory.mktemp("ray")
    (tmp / "good.json").write_text(json.dumps(experiments(ckpts)))
    (tmp / "failing.json").write_text(json.dumps(experiments(ckpts, failing=True)))
    on_ray = start(tmp, "-L", "failing.json", "-NL", "--out", "out", "--name", "ray", "--executor", "ray",
                   "--ray-address", ray_address, "--representations", "samples=50")
    local = start(tmp, "-L", "good.json", "-NL", "--out", "out", "--name", "local", "--save", "all",
                  "--representations", "samples=50")
    run_dir = tmp / "out" / "ray"
    _, stopped_err = interrupt_after_first_line(on_ray, run_dir / "results.jsonl")
    _, local_err = local.communicate(timeout=300)
    assert local.returncode == 0, local_err
    stopped = {"code": on_ray.returncode, "stderr": stopped_err, "kept": (run_dir / "results.jsonl").read_text()}
    resumed = run("main.py", "--resume", "out/ray", "-NL", "--executor", "ray", "--ray-address", ray_address, cwd=tmp)
    return {"local": tmp / "out" / "local", "ray": run_dir, "stopped": stopped, "resumed": resumed}


def names(run_dir):
    return json.loads((run_dir / "config.json").read_text())["names"]


def test_ray_gives_the_local_numbers_run_for_run(study):
    local, on_ray = rows_of(study["local"]), rows_of(study["ray"])
    assert set(local) == {(0, 0), (1, 0)}
    assert {key: on_ray[key] for key in local} == local  # metrics, history, gaps, mask fractions, representations
    assert all(row["representations"]["cka_base"] > 0 for row in local.values())
    masked, ascent = names(study["local"])
    for name in (masked, ascent, f"masks/{masked}"):
        a = utils.load_checkpoint(study["local"] / f"{name}_run0.pt")["state_dict"]  # --save all
        b = utils.load_checkpoint(study["ray"] / f"{name}.pt")["state_dict"]  # --save last, sent back by a worker
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(p.name for p in study["local"].glob("*.pt")) == [f"{masked}_run0.pt", f"{ascent}_run0.pt"]
    assert not list(study["ray"].glob("*_run*.pt"))


def test_ctrl_c_prints_the_resume_command_and_keeps_whole_lines(study):
    stopped = study["stopped"]
    assert stopped["code"] == 130, stopped["stderr"]
    assert 1 <= stopped["kept"].count("\n") < 3 and stopped["kept"].endswith("\n")
    said = [line for line in stopped["stderr"].replace("\r", "\n").splitlines() if "resume with" in line]
    assert len(said) == 1 and said[0].endswith(f"resume with: python {ROOT / 'main.py'} --resume out/ray -NL")
    assert "Traceback" not in stopped["stderr"]


def test_a_task_that_raises_is_recorded_while_the_others_finish(study):
    r, run_dir = study["resumed"], study["ray"]
    assert r.returncode == 1, r.stderr  # the study finished, with a failed run
    finished = [line for line in study["stopped"]["kept"].splitlines() if '"failed"' not in line]
    assert (run_dir / "results.jsonl").read_text().splitlines()[:len(finished)] == finished  # nothing redone
    rows = rows_of(run_dir)
    assert set(rows) == {(0, 0), (1, 0), (2, 0)}
    failed = rows[2, 0]
    assert failed["failed"].startswith("UserError: k=100, but ResNet has") and failed["attempts"] == 2
    assert failed["metrics"] is None and failed["seed"] == 0
    failing = names(run_dir)[2]
    assert f"{failing} run 0: UserError: k=100" in study["stopped"]["stderr"] + r.stderr
    md = (run_dir / "summary.md").read_text()
    assert f"| {failing} | cf_k | - | class 0 | 0 |" in md and "1/1 failed" in md
    assert f"1 run(s) failed and are in no mean; python {ROOT / 'main.py'} --resume out/ray tries them again" in md
    assert md.strip().splitlines()[-1] in r.stdout
    assert "1/1 failed" in (run_dir / "summary.csv").read_text()


def busy_workers():
    """Processes of Ray workers running a task: Ray titles them ray::<class>.<method>."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::Worker.run"):
                pids.append(int(proc.name))
        except OSError:  # a process that ended meanwhile
            pass
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes in /proc")
def test_a_killed_worker_loses_no_finished_run_and_the_study_completes(ckpts, ray_address, tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(experiments(ckpts)))
    proc = start(tmp_path, "-L", "good.json", "--nexp", "3", "-NL", "--out", "out", "--name", "k",
                 "--executor", "ray", "--ray-address", ray_address, "--cpus-per-run", "1", "--save", "none")
    results = tmp_path / "out" / "k" / "results.jsonl"
    try:
        deadline, killed = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None and killed is None:
            busy = busy_workers()
            if busy and results.exists() and results.read_text().count("\n") >= 1:
                finished = results.read_text()
                os.kill(busy[0], signal.SIGKILL)
                killed = busy[0]
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert killed, "no worker was busy after the first run finished"
    assert proc.returncode == 0, err
    assert results.read_text().startswith(finished)  # nothing finished was lost or redone
    rows = rows_of(tmp_path / "out" / "k")
    assert set(rows) == {(i, k) for i in range(2) for k in range(3)}
    assert not any(r.get("failed") for r in rows.values())
    assert "worker lost" in err and "trying it once more" in err
    assert not list((tmp_path / "out" / "k").rglob("*.pt"))  # --save none


def test_resume_tries_failed_runs_again(tmp_path):
    from study import drop_failed
    path = tmp_path / "results.jsonl"
    rows = [{"experiment": 0, "run": 0, "metrics": {}}, {"experiment": 1, "run": 0, "failed": "UserError: no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert drop_failed(path, rows) == rows[:1]
    assert path.read_text() == json.dumps(rows[0]) + "\n"


@pytest.mark.parametrize("save, kept", [("none", []), ("last", ["exp"]), ("all", ["exp_run0", "exp_run1"])])
def test_save_keeps_what_it_says(tmp_path, save, kept):
    """--save none writes no .pt file, last only the last run's, all every run's under its own name."""
    from study import RunFolder
    folder = RunFolder(tmp_path, "id", ["exp"], 2, save, [])
    for k in (0, 1):
        result = {"seed": k, "metrics": {}, "diverged_at": None}
        folder.record(0, k, result, {}, lambda name: (tmp_path / f"{name}.pt").touch())
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == kept
    assert [json.loads(line)["run"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("flags, message", [
    (("--executor", "ray", "--cpus-per-run", "0"), "--cpus-per-run must be a number above 0, got 0"),
    (("--executor", "ray", "--gpus-per-run", "-1"), "--gpus-per-run must be 0 or more, got -1"),
    (("--ray-address", "auto"), "--ray-address is for --executor ray only"),
    (("--executor", "ray", "--device", "cpu", "--gpus-per-run", "0.5"), "--gpus-per-run 0.5 puts the runs on GPUs"),
])
def test_executor_flags_are_checked_before_anything_runs(ckpts, tmp_path, flags, message):
    import main
    with pytest.raises(utils.UserError, match=message.replace(".", r"\.")):
        main.main(["-c", str(ckpts["base"]), "-CF", "0", "-E", "1", "-NL", "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, flags, runner", [
    ("main.py", ("-CF", "0", "-E", "1"), run),  # as a user runs it
    ("audit.py", ("-CF", "3", "-M", "rl", "--models-dir", "pool"), run_here),  # in this process: the same check
])
def test_an_address_where_no_cluster_answers_fails_at_once(ckpts, tmp_path, script, flags, runner):
    """--ray-address on localhost where nothing listens: one line naming the address, within
    seconds (Ray alone retries for minutes), exit code 2 and nothing written."""
    with socket.socket() as s:  # a port that was free a moment ago, and nothing listens on now
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    start = time.perf_counter()
    r = runner(script, "-c", ckpts["base"], *flags, "-NL", "--out", "out", "--executor", "ray", "--ray-address",
               address, cwd=tmp_path)
    assert time.perf_counter() - start < 30
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"error: no Ray cluster answers at {address} ("), r.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- audit.py

def audit_experiments(base, failing=False):
    """retrain (new models, trained on the workers) and rl with a mask (the base models sent to
    them), or ga_small and, when asked, cf_k with a k that raises when the run starts."""
    common = {"checkpoint": str(base), "class_to_forget": 3, "batch_size": 64, "epochs": 1}
    if failing:
        return [dict(common, method="ga_small", lr=0.05), dict(common, method="cf_k", method_args={"k": 100})]
    return [dict(common, method="retrain", lr=0.2), dict(common, method="rl", lr=0.03, use_mask=True)]


@pytest.fixture(scope="module")
def audits(ray_address, tmp_path_factory):
    """A 1-epoch test_resnet base model on digits audited with N = 3 and K = 4 (the fewest each
    score allows), locally and on Ray at the same time, each with its own --models-dir; then,
    on Ray with the Ray run's models, a list whose second experiment raises on every model."""
    import train as train_script
    d = tmp_path_factory.mktemp("audit_ray")
    train_script.main(["--dataset", "digits", "--model", "test_resnet", "--epochs", "1", "--batch-size", "64",
                       "--lr", "0.2", "-NL", "--save-dir", str(d)])  # here: a process start costs more
    base = d / "test_resnet_digits_base.pt"
    (d / "exp.json").write_text(json.dumps(audit_experiments(base)))
    (d / "failing.json").write_text(json.dumps(audit_experiments(base, failing=True)))
    flags = ("-L", "exp.json", "--models", 3, "--shadows", 4, "--precision", "fp32", "-NL", "--out", "out")
    procs = {"local": start(d, *flags, "--name", "local", "--models-dir", "pool_local", script="audit.py"),
             "ray": start(d, *flags, "--name", "ray", "--models-dir", "pool_ray", "--executor", "ray",
                          "--ray-address", ray_address, script="audit.py")}
    done = {name: (p, *p.communicate(timeout=300)) for name, p in procs.items()}
    for p, _, err in done.values():
        assert p.returncode == 0, err
    pool = sorted(p.name for p in (d / "pool_ray").iterdir())
    failing = run("audit.py", "-L", "failing.json", "--models", 3, "--shadows", 4, "--precision", "fp32", "-NL",
                  "--out", "out", "--name", "failing", "--models-dir", "pool_ray", "--executor", "ray",
                  "--ray-address", ray_address, cwd=d)
    return {"dir": d, "stdout": {name: out for name, (_, out, _) in done.items()},
            "stderr": {name: err for name, (_, _, err) in done.items()}, "pool": pool, "failing": failing}


def timeless(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_audit_on_ray_gives_the_local_numbers_and_saves_its_reference_models(audits):
    d = audits["dir"]
    local, on_ray = (json.loads((d / "out" / name / "audit.json").read_text()) for name in ("local", "ray"))
    assert [r["experiment"] for r in on_ray["experiments"]][0] == "no unlearning (class 3)"
    assert timeless(on_ray["experiments"]) == timeless(local["experiments"])  # F, score, AUC, TPRs, UA/RA/TA/MIA
    assert on_ray["reference_models_trained"] == local["reference_models_trained"] == 7  # gold standards, shadows
    assert "7 reference models trained" in audits["stdout"]["ray"]
    assert audits["pool"] == sorted(p.name for p in (d / "pool_local").iterdir()) and len(audits["pool"]) == 7
    for name in audits["pool"]:  # saved by the driver from the weights a worker sent back
        a, b = (utils.load_checkpoint(d / pool / name) for pool in ("pool_local", "pool_ray"))
        assert a["config"] == b["config"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k])
                                                  for k in a["state_dict"])
    assert "Traceback" not in audits["stderr"]["ray"]


def test_an_audit_task_that_fails_twice_stops_the_audit_in_one_line(audits):
    r, d = audits["failing"], audits["dir"]
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    finished, failing = names(d / "out" / "failing")
    assert errors[0].startswith(f"error: {failing}: unlearning original ")
    assert "failed (2 attempts): UserError: k=100, but ResNet has" in errors[0]
    assert errors[0].endswith("continue with: python audit.py --resume out/failing")
    rows = (d / "out" / "failing" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["experiment"] for line in rows] == [finished]  # kept
    assert sorted(p.name for p in (d / "pool_ray").iterdir()) == audits["pool"]  # every model came from the pool


# ---------------------------------------------------------------- tune.py

def tune_trials(run_dir):
    from test_tune import trials_of
    return trials_of(run_dir)


def test_tuning_on_one_ray_worker_gives_the_local_trials(ckpts, ray_address, tmp_path):
    """Four trials one at a time on one two-CPU worker, and locally with two threads: the same
    settings asked, the same objectives, the same best trial."""
    from test_tune import tuning_file
    path = tuning_file(tmp_path, ckpts)
    flags = ("-L", path, "--trials", 4, "--precision", "fp32", "-NL", "--out", tmp_path)
    local = run_script("tune.py", *flags, "--name", "local", env={"OMP_NUM_THREADS": "2"})
    on_ray = run("tune.py", *flags, "--name", "ray", "--executor", "ray", "--ray-address", ray_address,
                 "--cpus-per-run", 2, cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert on_ray.returncode == 0, on_ray.stderr
    a, b = tune_trials(tmp_path / "local"), tune_trials(tmp_path / "ray")
    assert [p for p, _, _ in a] == [p for p, _, _ in b] and len(a) == 4
    assert [v for _, v, _ in a] == pytest.approx([v for _, v, _ in b], abs=1e-9)
    assert json.loads((tmp_path / "local" / "tuned.json").read_text()) == \
        json.loads((tmp_path / "ray" / "tuned.json").read_text())
