import json
from pathlib import Path

import pytest
import torch

from conftest import run_script
from datasets import ForgetSpec, make_split
from methods import Run, saliency_mask
from utils import compute_for, load_model, make_generator

CPU = torch.device("cpu")


def write(tmp_path, experiments, name="exp.json"):
    path = tmp_path / name
    path.write_text(experiments if isinstance(experiments, str) else json.dumps(experiments))
    return path


def base_exp(ckpts, **kw):
    return {"checkpoint": str(ckpts["base"]), "class_to_forget": 0, "epochs": 1, **kw}


@pytest.fixture(scope="module")
def finished_run(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    exps = [base_exp(ckpts, method="rl_split", use_mask=True, mask_thr=0.2, retrained=str(ckpts["gold"])),
            base_exp(ckpts, method="ga_small", lr=0.01, tag="ascent")]
    r = run_script("main.py", "-L", write(out, exps), "--nexp", "2", "-NL", "--out", out)
    assert r.returncode == 0, r.stderr
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, r


def test_main_writes_every_result(finished_run, ckpts):
    run_dir, r = finished_run
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [(x["experiment"], x["run"], x["seed"]) for x in rows] == [(0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1)]
    for row in rows:
        assert set(row["metrics"]) >= {"UA", "RA", "TA", "VA", "MIA", "loss_MIA_AUC", "TA_forgotten"}
        assert row["rte_s"] > 0 and len(row["history"]) == 1
    assert "avg_gap" in rows[0]["gap"] and "gap" not in rows[2]
    assert rows[0]["mask_fraction"] == pytest.approx(0.2, abs=1e-6)
    for name in ("config.json", "summary.csv", "summary.md", "summary.png", "00_rl_split_mask0.2_class-0.pt",
                 "01_ascent.pt", "masks/00_rl_split_mask0.2_class-0.pt"):
        assert (run_dir / name).is_file(), name
    summary = (run_dir / "summary.md").read_text()
    assert "gold standard" in summary and "base (before)" in summary and "01_ascent" in summary
    assert summary.strip().splitlines()[-1] in r.stdout  # the table is printed last


def test_unlearned_checkpoint_has_experiment_and_moves_at_most_mask_thr(finished_run, ckpts):
    run_dir, _ = finished_run
    ck = torch.load(run_dir / "00_rl_split_mask0.2_class-0.pt", weights_only=True)
    base = torch.load(ckpts["base"], weights_only=True)["state_dict"]
    assert ck["config"]["experiment"]["method"] == "rl_split" and ck["config"]["forget"]["class_to_forget"] == 0
    params = {k for k in base if "running" not in k and "num_batches" not in k}
    changed = sum(int((ck["state_dict"][k] != base[k]).sum()) for k in params)
    total = sum(base[k].numel() for k in params)
    assert 0 < changed <= 0.2 * total


def test_saved_mask_is_the_saliency_mask_of_the_base_model(finished_run, ckpts, digits):
    """The last run cut its mask from the gradients the first run computed (main.py computes
    them once per checkpoint, forget set and batch size): the same mask as computed afresh."""
    run_dir, _ = finished_run
    saved = torch.load(run_dir / "masks" / "00_rl_split_mask0.2_class-0.pt", weights_only=True)
    e = saved["config"]["experiment"]
    model, cfg = load_model(ckpts["base"], CPU)
    split = make_split(digits, ForgetSpec(class_to_forget=0), seed=e["seed"], val_idx=cfg["val_idx"])
    compute = compute_for(CPU)
    model = model.to(memory_format=torch.channels_last) if compute.channels_last else model
    mask = saliency_mask(model, Run(digits, split, e["batch_size"], make_generator(1, CPU), compute), 0.2)
    assert saved["state_dict"].keys() == mask.keep.keys()
    assert all(torch.equal(saved["state_dict"][n], keep) for n, keep in mask.keep.items())


def test_resume_of_a_finished_run_does_nothing_more(finished_run):
    run_dir, first = finished_run
    before = (run_dir / "results.jsonl").read_text()
    r = run_script("main.py", "--resume", run_dir, "-NL")
    assert r.returncode == 0, r.stderr
    assert "4 already done" in r.stdout
    assert (run_dir / "results.jsonl").read_text() == before


def test_resume_redoes_only_missing_runs_and_drops_a_torn_line(finished_run, tmp_path):
    run_dir, _ = finished_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json",):
        (copy / name).write_text((run_dir / name).read_text())
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    (copy / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    r = run_script("main.py", "--resume", copy, "-NL")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("ignoring unreadable line") == 1
    redone = [json.loads(x) for x in (copy / "results.jsonl").read_text().splitlines()]
    assert len(redone) == 4
    assert redone[3]["metrics"] == json.loads(lines[3])["metrics"]  # same seed, same numbers


@pytest.mark.parametrize("entry, message", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"epochs": "3"}, "epochs: expected int"),
    ({"use_mask": 1}, "use_mask: expected bool"),
    ({"unlearning_rate": 0.1}, "exactly one"),
    ({"class_to_forget": None}, "exactly one"),
    ({"class_to_forget": 10}, "out of range"),
    ({"checkpoint": "nope.pt"}, "checkpoint: checkpoint nope.pt not found"),
    ({"method": "magic"}, "unknown method 'magic'; known: rl"),
    ({"mask_thr": 0.0}, "mask_thr: 0.0 outside (0, 1]"),
    ({"mask_thr": 1.5}, "outside (0, 1]"),
    ({"lr": -1}, "lr: must be positive"),
    ({"epochs": 0}, "epochs: must be positive"),
])
def test_bad_experiment_is_rejected_before_any_compute(ckpts, tmp_path, entry, message):
    exps = [base_exp(ckpts), {**base_exp(ckpts), **entry}]
    r = run_script("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and "experiment 1" in r.stderr
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_one_line_each(ckpts, tmp_path):
    exps = [{"bogus": 1}, base_exp(ckpts, method="magic", mask_thr=2.0)]
    r = run_script("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 3
    assert "experiment 0" in lines[0] and all("experiment 1" in x for x in lines[1:])


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"), ('{"method": "rl"}', "list of experiment objects"), ("[]", "non-empty list"),
    ("[1, 2]", "list of experiment objects"),
])
def test_malformed_experiment_file(tmp_path, content, message):
    r = run_script("main.py", "-L", write(tmp_path, content), "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_retrained_with_another_forget_set_is_rejected(ckpts, tmp_path):
    exps = [{**base_exp(ckpts), "class_to_forget": 1, "retrained": str(ckpts["gold"])}]
    r = run_script("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and "retrained" in r.stderr and "different forget set" in r.stderr


def test_single_experiment_from_flags_and_nexp_zero(ckpts, tmp_path):
    r = run_script("main.py", "-c", ckpts["base"], "-CF", "0", "-E", "1", "-M", "ft", "--nexp", "0", "-NL",
                   "--out", tmp_path)
    assert r.returncode == 2 and "--nexp" in r.stderr
    r = run_script("main.py", "-c", ckpts["base"], "-CF", "0", "-E", "1", "-M", "ga_small", "-LR", "0.01",
                   "-UM", "-MT", "0.5", "-NL", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = list(tmp_path.iterdir())
    row = json.loads((run_dir / "results.jsonl").read_text())
    assert row["mask_fraction"] == pytest.approx(0.5, abs=1e-6)


def test_shipped_experiment_files_are_well_formed():
    import main
    from conftest import ROOT
    for path in sorted((ROOT / "exp").glob("*.json")):
        entries = json.loads(path.read_text())
        assert isinstance(entries, list) and entries, path
        for entry in entries:
            assert not [k for k in entry if k not in main.KEYS], path
            assert not [k for k, v in entry.items() if main.type_problem(k, v)], path
            e = main.Experiment(**{"seed": 0, "batch_size": 64, **entry})
            assert main.range_problems(e) == [], (path, entry)
            assert e.retrained and Path(e.checkpoint).name.startswith("resnet18_")
