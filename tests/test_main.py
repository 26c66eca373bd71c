import csv
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import main
import tuning
import utils
from experiments import Experiment, experiment_names, method_problems, overrides, with_overrides
from summary import cell, screen_table
from utils import settings_problems
from conftest import assert_is_top_saliency_mask, plain_forget_gradients, run_here, run_script
from datasets import ForgetSpec, make_split
from models import load_model

CPU = torch.device("cpu")


def write(tmp_path, experiments, name="exp.json"):
    path = tmp_path / name
    path.write_text(experiments if isinstance(experiments, str) else json.dumps(experiments))
    return path


def base_exp(ckpts, **kw):
    return {"checkpoint": str(ckpts["base"]), "class_to_forget": 0, "epochs": 1, **kw}


FIRST = "00_rl_split_mask0.2_class-0_lr0.1"  # the lr differs between the two experiments


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
    config = json.loads((run_dir / "config.json").read_text())
    for row in rows:
        assert set(row["metrics"]) >= {"UA", "RA", "TA", "VA", "MIA", "loss_MIA_AUC", "TA_forgotten", "VA_forgotten"}
        assert row["rte_s"] > 0 and len(row["history"]) == 1
        assert row["run_id"] == config["run_id"] and row["precision"] == config["precision"]
        assert row["device_name"] == config["device_name"] == utils.device_name(CPU)
    assert f"precision: {config['precision']}" in r.stdout
    assert "avg_gap" in rows[0]["gap"] and "gap" not in rows[2]
    assert rows[0]["mask_fraction"] == pytest.approx(0.2, abs=1e-6)
    for name in ("config.json", "summary.csv", "summary.md", "summary.png", f"{FIRST}.pt",
                 "01_ascent.pt", f"masks/{FIRST}.pt", "tradeoff.png", "curves.png"):
        assert (run_dir / name).is_file(), name
    summary = (run_dir / "summary.md").read_text()
    assert "gold standard" in summary and "base (before)" in summary and "01_ascent" in summary
    assert summary.strip().splitlines()[-1] in r.stdout  # the table is printed last
    assert summary.strip().splitlines()[-1].endswith(
        "experiments are closer to the gold standard than the original model: their avg_gap's 95% interval "
        "over runs lies below the base row's (the do-nothing baseline)")


def test_unlearned_checkpoint_has_experiment_and_moves_at_most_mask_thr(finished_run, ckpts):
    run_dir, _ = finished_run
    ck = torch.load(run_dir / f"{FIRST}.pt", weights_only=True)
    base = torch.load(ckpts["base"], weights_only=True)["state_dict"]
    assert ck["config"]["experiment"]["method"] == "rl_split" and ck["config"]["forget"]["class_to_forget"] == 0
    params = {k for k in base if "running" not in k and "num_batches" not in k}
    changed = sum(int((ck["state_dict"][k] != base[k]).sum()) for k in params)
    total = sum(base[k].numel() for k in params)
    assert 0 < changed <= 0.2 * total


def test_saved_mask_is_the_saliency_mask_of_the_base_model(finished_run, ckpts, digits):
    """The mask main.py saved keeps the most salient 20% of the base model's weights, saliency
    computed here directly (main.py computes it once and shares it between runs)."""
    run_dir, _ = finished_run
    keep, config = utils.load_mask(run_dir / "masks" / f"{FIRST}.pt")
    e = config["experiment"]
    model, cfg = load_model(ckpts["base"], CPU)
    split = make_split(digits, ForgetSpec(class_to_forget=0), seed=e["seed"], val_idx=cfg["val_idx"])
    grads = plain_forget_gradients(model, digits, split.forget, e["batch_size"])
    kept = assert_is_top_saliency_mask(keep, grads, 0.2)
    assert config["zero_fraction"] == pytest.approx(float((kept == 0).float().mean()), abs=1e-3)


def summary_rows(run_dir):
    with open(run_dir / "summary.csv", newline="") as f:
        return {r["experiment"]: r for r in csv.DictReader(f)}


def assert_base_row_has_the_gap_by_hand(rows):
    """The base row's Avg. Gap is the mean of its |UA|, |RA|, |TA|, |MIA| differences from
    the gold row."""
    base, gold = rows["base (before)"], rows["gold standard"]
    gaps = [abs(float(base[k]) - float(gold[k])) for k in ("UA", "RA", "TA", "MIA")]
    for k, g in zip(("UA_gap", "RA_gap", "TA_gap", "MIA_gap"), gaps):
        assert float(base[k]) == pytest.approx(g, abs=1e-3)
    assert float(base["avg_gap"]) == pytest.approx(sum(gaps) / 4, abs=1e-3)
    return float(base["avg_gap"])


def test_do_nothing_row_carries_the_base_models_gap(finished_run):
    rows = summary_rows(finished_run[0])
    do_nothing = assert_base_row_has_the_gap_by_hand(rows)
    masked = rows[FIRST]
    runs = [json.loads(x)["gap"]["avg_gap"] for x in (finished_run[0] / "results.jsonl").read_text().splitlines()
            if json.loads(x)["experiment"] == 0]
    mean, half = sum(runs) / 2, 12.706205 * abs(runs[0] - runs[1]) / 2  # t(0.975, 1) * s / sqrt(2), by hand
    expected = "yes" if mean + half < do_nothing else "no" if mean - half > do_nothing else "no difference"
    assert masked["beats_do_nothing"] == expected
    assert rows["01_ascent"]["beats_do_nothing"] == ""  # no gold standard named


def test_do_nothing_baseline_for_random_forgetting(ckpts, more_golds, tmp_path):
    exps = [{"checkpoint": str(ckpts["base"]), "unlearning_rate": 0.1, "method": m, "lr": 0.03, "epochs": 1,
             "retrained": str(more_golds["rf"])} for m in ("ft", "rl")]
    r = run_here("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = summary_rows(run_dir)
    do_nothing = assert_base_row_has_the_gap_by_hand(rows)
    assert [rows[n]["beats_do_nothing"] for n in ("00_ft_random-0.1", "01_rl_random-0.1")] == ["-", "-"]
    assert "one run per experiment: no verdict on doing nothing (it needs --nexp 2 or more)" in r.stdout


def test_base_test_and_main_agree_on_the_gold_standard(finished_run, ckpts, tmp_path):
    run_dir, _ = finished_run
    with open(run_dir / "summary.csv", newline="") as f:
        gold = next(r for r in csv.DictReader(f) if r["experiment"] == "gold standard")
    r = run_script("base_test.py", "-c", ckpts["gold"], "--cf", "0", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(next(tmp_path.glob("base_test_*.json")).read_text())
    for k in ("UA", "RA", "TA", "VA", "MIA", "loss_MIA_AUC"):
        assert row[k] == pytest.approx(float(gold[k]), abs=0.01), k


def test_resume_of_a_finished_run_does_nothing_more(finished_run):
    run_dir, first = finished_run
    before = (run_dir / "results.jsonl").read_text()
    r = run_here("main.py", "--resume", run_dir, "-NL")
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
    r = run_here("main.py", "--resume", copy, "-NL")
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
    ({"checkpoint": "nope.pt"}, "experiment 1: checkpoint nope.pt not found"),
    ({"method": "magic"}, "unknown method 'magic'; known: rl"),
    ({"mask_thr": 0.0}, "mask_thr: 0.0 outside (0, 1]"),
    ({"mask_thr": 1.5}, "outside (0, 1]"),
    ({"lr": -1}, "lr: -1 outside (0, inf)"),
    ({"epochs": 0}, "epochs: 0 outside [1, inf)"),
    ({"lr": float("nan")}, "lr: must be a finite number, got NaN"),
    ({"mask_thr": float("inf")}, "mask_thr: must be a finite number, got Infinity"),
    ({"unlearning_rate": float("nan"), "class_to_forget": None}, "unlearning_rate: must be a finite number"),
])
def test_bad_experiment_is_rejected_before_any_compute(ckpts, tmp_path, entry, message):
    exps = [base_exp(ckpts), {**base_exp(ckpts), **entry}]
    r = run_here("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and "experiment 1" in r.stderr
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_one_line_each(ckpts, tmp_path):
    """An unknown key does not hide the experiment's other problems, of any kind."""
    exps = [{"bogus": 1, **base_exp(ckpts), "epochs": "2", "lr": float("nan"), "checkpoint": "nope.pt"},
            base_exp(ckpts, method="magic", mask_thr=2.0)]
    r = run_here("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path / "out")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 6, r.stderr
    for line, part in zip(lines, ("unknown key 'bogus'", "epochs: expected int", "lr: must be a finite",
                                  "experiment 0: checkpoint nope.pt not found", "mask_thr: 2.0 outside",
                                  "method: unknown method")):
        assert part in line
    assert all("experiment 0" in x for x in lines[:4]) and all("experiment 1" in x for x in lines[4:])


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"), ('{"method": "rl"}', "list of experiment objects"), ("[]", "non-empty list"),
    ("[1, 2]", "list of experiment objects"),
])
def test_malformed_experiment_file(tmp_path, content, message):
    r = run_here("main.py", "-L", write(tmp_path, content), "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_retrained_with_another_forget_set_is_rejected(ckpts, tmp_path):
    exps = [{**base_exp(ckpts), "class_to_forget": 1, "retrained": str(ckpts["gold"])}]
    r = run_here("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and "retrained" in r.stderr
    assert f"{ckpts['gold']} was retrained without 136 samples, not the 127 this experiment forgets (class 1)" \
        in r.stderr


def test_retrained_with_another_validation_set_is_rejected(ckpts, tmp_path):
    gold = utils.load_checkpoint(ckpts["gold"])
    other = tmp_path / "other_seed.pt"
    utils.save_checkpoint(other, gold["state_dict"], dict(gold["config"], val_idx=gold["config"]["val_idx"][1:], seed=9))
    r = run_here("main.py", "-L", write(tmp_path, [base_exp(ckpts, retrained=str(other))]), "-NL",
                 "--out", tmp_path / "out")
    assert r.returncode == 2 and "holds out another validation set" in r.stderr and "train both with one --seed" in r.stderr


def test_single_experiment_from_flags_and_nexp_zero(ckpts, tmp_path):
    r = run_here("main.py", "-c", ckpts["base"], "-CF", "0", "-E", "1", "-M", "ft", "--nexp", "0", "-NL",
                 "--out", tmp_path)
    assert r.returncode == 2 and "--nexp" in r.stderr
    r = run_script("main.py", "-c", ckpts["base"], "-CF", "0", "-E", "1", "-M", "ga_small", "-LR", "0.01",
                   "-UM", "-MT", "0.5", "-NL", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = list(tmp_path.iterdir())
    row = json.loads((run_dir / "results.jsonl").read_text())
    assert row["mask_fraction"] == pytest.approx(0.5, abs=1e-6)


def test_shipped_experiment_files_are_well_formed():
    from conftest import ROOT
    for path in sorted((ROOT / "exp").glob("*.json")):
        entries = json.loads(path.read_text())
        assert isinstance(entries, list) and entries, path
        for entry in entries:
            search = entry.get("search", {})
            if path.name.startswith(("tune", "study")):  # tune.py's files: what each experiment searches, on top
                entry = {k: v for k, v in entry.items() if k not in tuning.FILE_KEYS}
                dims, _, problems = tuning.search_space(Experiment(**entry), search)
                assert dims and not problems, (path, entry, problems)
            assert settings_problems(Experiment, entry) == {}, (path, entry)
            e = Experiment(**entry)
            assert method_problems(e) == [], (path, entry)
            if not path.name.startswith("audit"):  # audit.py trains its own gold standards
                # a checkpoint the Makefile trains
                assert e.retrained and Path(e.checkpoint).name.startswith(("resnet18_", "test_byobnet_fashionmnist_"))


def test_resume_refuses_flags_that_would_change_the_run(finished_run, tmp_path):
    run_dir, _ = finished_run
    before = sorted(p.name for p in run_dir.iterdir())
    for extra in (("-L", "exp/demo.json"), ("--nexp", "5"), ("-LR", "0.5"), ("--seed", "3")):
        r = run_here("main.py", "--resume", run_dir, *extra, "-NL")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"--resume continues {run_dir} exactly as it was configured; {extra[0]} would change it" in r.stderr
    r = run_here("main.py", "--resume", tmp_path / "nope", "-NL")
    assert r.returncode == 2 and f"run folder {tmp_path / 'nope'} not found" in r.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_resume_refuses_results_of_another_run(finished_run, tmp_path):
    run_dir, _ = finished_run
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, run_id="0" * 32)))
    (other / "results.jsonl").write_text((run_dir / "results.jsonl").read_text())
    r = run_here("main.py", "--resume", other, "-NL")
    assert r.returncode == 2 and "holds 4 result line(s) of another run" in r.stderr
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "results.jsonl"]


def test_every_method_runs_through_main_with_and_without_the_mask(ckpts, tmp_path):
    """One main.py process, one epoch of every method; every other one with a 0.5 mask."""
    import methods
    names = list(methods.METHODS)
    exps = [base_exp(ckpts, method=m, lr=0.01, **({"use_mask": True, "mask_thr": 0.5} if k % 2 else {}))
            for k, m in enumerate(names)]
    r = run_script("main.py", "-L", write(tmp_path, exps), "-NL", "--out", tmp_path, "--name", "all",
                   env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "all" / "results.jsonl").read_text().splitlines()]
    assert [row["name"].split("_", 1)[1].startswith(m) for row, m in zip(rows, names)] == [True] * len(names)
    for k, row in enumerate(rows):
        assert row["metrics"] and row["diverged_at"] is None, row["name"]
        assert row["mask_fraction"] == (pytest.approx(0.5, abs=1e-6) if k % 2 else 1.0)


def test_flags_come_from_the_experiment_fields(capsys):
    import main
    short = main.parse_args(["-CF", "3", "-UL", "0.1", "-IF", "f.json", "-E", "2", "-MA", "alpha=0.5", "-MA", "k=3",
                             "-MA", "name=x"])
    long = main.parse_args(["--cf", "3", "--unlr", "0.1", "--itf", "f.json", "--epochs", "2",
                            "--method-arg", "alpha=0.5", "--method-arg", "k=3", "--method-arg", "name=x"])
    assert overrides(short) == overrides(long) == {
        "class_to_forget": 3, "unlearning_rate": 0.1, "idxs_to_forget": "f.json", "epochs": 2,
        "method_args": {"alpha": 0.5, "k": 3, "name": "x"}}  # values read as JSON when they are JSON
    assert overrides(main.parse_args([])) == {}  # nothing typed, nothing overridden
    # -MA adds to a file's method_args; other keys replace the file's
    assert with_overrides({"lr": 0.1, "method_args": {"alpha": 0.9, "msteps": 1}},
                          {"lr": 0.2, "method_args": {"alpha": 0.5}}) == {
        "lr": 0.2, "method_args": {"alpha": 0.5, "msteps": 1}}
    with pytest.raises(SystemExit):
        main.parse_args(["-h"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in fields(Experiment):
        assert f.metadata["doc"].split()[0] in shown and f.metadata["flags"][0] in shown, f.name
    assert "(in [1, inf); default: 10)" in shown and "(in (0, 1]; default: 0.5)" in shown
    import methods
    for name, m in methods.METHODS.items():  # every method, with its settings and their defaults
        settings = ", ".join(f"{f.name}={f.default}" for f in fields(m.settings)) or "no settings"
        assert f"{name}: " in shown and f"[{settings}]" in shown, name


# ---------------------------------------------------------------- names and tables

def test_names_say_what_differs_between_experiments():
    sweep = [Experiment(method="rl", lr=lr, epochs=e, batch_size=b, use_mask=True, class_to_forget=0)
             for lr, e, b in ((0.03, 1, 64), (0.03, 2, 64), (0.05, 2, 128))]
    sweep.append(Experiment(method="scrub", lr=1e6, class_to_forget=0, method_args={"msteps": 1}))
    sweep.append(Experiment(method="scrub", lr=1e6, class_to_forget=0, method_args={"msteps": 3}, tag="my run"))
    assert experiment_names(sweep) == [
        "00_rl_mask0.5_class-0_lr0.03_E1_bs64", "01_rl_mask0.5_class-0_lr0.03_E2_bs64",
        "02_rl_mask0.5_class-0_lr0.05_E2_bs128", "03_scrub_class-0_lr1e+06_E10_bs64_msteps1", "04_my-run"]
    same = [Experiment(method="ga", class_to_forget=c) for c in (0, 3)]
    assert experiment_names(same) == ["00_ga_class-0", "01_ga_class-3"]  # nothing else differs


def table_row(name, runs, **metrics):
    return {"experiment": name, "method": "rl", "mask": "-", "forget": "class 0", "runs": runs, **metrics}


def test_terminal_table_fits_120_columns_and_single_runs_have_no_std():
    long = "07_rl_split_mask0.5_class-0_lr0.03_E2_bs128_msteps1_temperature4_seed3"
    table = [table_row(long, 3, UA=(99.5, 0.25), RA=(98.0, 1.5), TA=(97.0, 2.0), MIA=(100.0, 0.0),
                       avg_gap=(12.25, 10.5), rte_s=(123.456, 12.345)),
             table_row("08_ga_class-0", 3, UA=(5.0, 1.0), RA=(90.0, 1.0), TA=(89.0, 1.0), MIA=(50.0, 1.0),
                       rte_s=(1.0, 0.1))]
    lines = screen_table(table).splitlines()
    assert max(map(len, lines)) <= 120 and len({len(x) for x in lines[:4]}) == 1
    assert "| 07_rl_split_mask0…temperature4_seed3 |" in lines[2]  # cut in the middle
    assert "99.50±0.25" in lines[2] and "123.5±12.3" in lines[2] and "n/a" in lines[3]
    assert lines[4].startswith("mean ± std over 3 runs")
    single = screen_table([table_row("00_rl_class-0", 1, UA=(99.5, 0.0), RA=(98.0, 0.0))])
    assert "99.50 " in single and "±" not in single
    assert cell((99.5, 0.0), "UA", runs=1) == "99.50" and cell((99.5, 0.25), "UA", runs=2) == "99.50 ± 0.25"


def test_figures_of_thirty_experiments_stay_within_1600_px(tmp_path):
    """Thirty experiments over two forget sets: every figure at most 1600 px wide, the
    per-metric panel one row per experiment, curves wrapping after ten experiments."""
    from PIL import Image
    import plots
    table, results = [], []
    for spec in ("class 0", "random 0.1"):
        table += [{"experiment": label, "method": "-", "mask": "-", "forget": spec, "runs": 1,
                   "UA": (1.0, 0.0), "RA": (99.0, 0.0), "TA": (98.0, 0.0), "MIA": (90.0, 0.0)}
                  for label in ("base (before)", "gold standard")]
        for k in range(15):
            name = f"{len(results):02d}_{['rl', 'ga', 'scrub'][k % 3]}_mask0.5_{spec.replace(' ', '-')}_lr0.0{k}"
            table.append(table_row(name, 3, UA=(k * 6.0, 1.0), RA=(95.0, 1.0), TA=(94.0, 2.0), MIA=(50.0, 5.0),
                                   avg_gap=(3.0, 1.0), rte_s=(2.0, 0.1)) | {"forget": spec, "mask": "0.5"})
            results.append({"name": name, "history": [{"UA": 1.0 * e, "RA": 90.0 + e, "TA": 89.0 + e} for e in (1, 2)]})
    plots.plot_summary(tmp_path / "summary.png", table)
    plots.plot_tradeoff(tmp_path / "tradeoff.png", table)
    plots.plot_curves(tmp_path / "curves.png", table, results)
    sizes = {name: Image.open(tmp_path / f"{name}.png").size for name in ("summary", "tradeoff", "curves")}
    assert all(w <= 1600 for w, _ in sizes.values()), sizes
    assert sizes["summary"][1] >= 34 * 25  # room for every one of the 34 rows' labels
    assert sizes["curves"][1] > 4 * 300  # two rows of panels per forget set
