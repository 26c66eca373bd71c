"""tune.py: searches from the settings' declarations, an objective that never reads the test set,
a tuning that resumes to the same trials, bad input refused before any compute, and the
verdicts main.py's summary now states over runs."""
import json
import math
import re
from unittest import mock

import numpy as np
import pytest
import torch

import metrics
import summary
import tuning
from conftest import ROOT, run_here
from experiments import Experiment, resolve
from methods import METHODS

TRIALS = 4


def tuning_file(tmp_path, ckpts, **extra):
    """ga_small on class 0 of the tiny fixture, one epoch, lr searched in [1e-3, 0.3]."""
    entry = {"checkpoint": str(ckpts["base"]), "class_to_forget": 0, "retrained": str(ckpts["gold"]),
             "method": "ga_small", "lr": 0.01, "epochs": 1, "search": {"lr": [1e-3, 0.3], "epochs": 1}, **extra}
    path = tmp_path / "tune.json"
    path.write_text(json.dumps([entry]))
    return path


def trials_of(run_dir, name="00_ga_small_class-0"):
    """(params, value, state) of every trial that counts, in the order they were asked."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(run_dir / "optuna.log"))))
    return [(t.params, t.value, t.user_attrs.get("state")) for t in study.trials
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


class CountTestReads:
    """metrics.predict wrapped: every call that reads test samples is counted."""

    def __init__(self):
        self.count, self.real = 0, metrics.predict

    def __call__(self, model, ds, idx, compute, test=False, **kw):
        self.count += bool(test)
        return self.real(model, ds, idx, compute, test=test, **kw)


@pytest.fixture(scope="module")
def tuned(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    reads = CountTestReads()
    with mock.patch.object(metrics, "predict", reads):
        r = run_here("tune.py", "-L", tuning_file(tmp, ckpts), "--trials", TRIALS, "-NL", "--out", tmp,
                     "--name", "t")
    return {"tmp": tmp, "run": tmp / "t", "result": r, "test_reads": reads.count}


def test_a_tuning_writes_what_it_says_and_never_reads_the_test_set(tuned):
    r, run_dir = tuned["result"], tuned["run"]
    assert r.returncode == 0, r.stderr
    assert tuned["test_reads"] == 0
    for name in ("config.json", "optuna.log", "tuned.json", "tuning.md", "tuning.csv",
                 "tuning/00_ga_small_class-0.png"):
        assert (run_dir / name).is_file(), name
    trials = trials_of(run_dir)
    assert len(trials) == TRIALS and {s for _, _, s in trials} == {"complete"}
    assert trials[0][0] == {"lr": 0.01}  # the experiment's own settings come first
    assert all(1e-3 <= p["lr"] <= 0.3 for p, _, _ in trials)
    assert "the test set was not read" in (run_dir / "tuning.md").read_text()


def test_the_best_trial_is_no_worse_than_the_default_measured_afresh(tuned, ckpts):
    """The objective of the experiment's own settings, computed here in a fresh trial, is not
    below the tuned best (and equals the first trial's: a trial is deterministic)."""
    best = min(v for _, v, _ in trials_of(tuned["run"]))
    e = Experiment(checkpoint=str(ckpts["base"]), class_to_forget=0, retrained=str(ckpts["gold"]),
                   method="ga_small", lr=0.01, epochs=1)
    import utils
    precision = json.loads((tuned["run"] / "config.json").read_text())["precision"]
    compute = utils.compute_for(torch.device("cpu"), precision)
    task = {"experiment": vars(e), "params": {}, "weights": tuning.DEFAULT_WEIGHTS,
            "retain_sample": tuning.RETAIN_SAMPLE, "history": None}
    out = tuning.run_trial(task, compute, {"data_dir": "data"}, utils.Logger(False, "", "", {}))
    assert out["state"] == "complete"
    assert best <= out["value"] + 1e-9
    assert out["value"] == pytest.approx(trials_of(tuned["run"])[0][1], abs=1e-6)


def test_tuned_json_runs_in_main_on_fresh_seeds(tuned):
    run_dir = tuned["run"]
    (entry,) = json.loads((run_dir / "tuned.json").read_text())
    best = min(trials_of(run_dir), key=lambda t: t[1])
    assert entry["lr"] == best[0]["lr"] and entry["epochs"] == 1 and "search" not in entry
    reads = CountTestReads()
    with mock.patch.object(metrics, "predict", reads):
        r = run_here("main.py", "-L", run_dir / "tuned.json", "--nexp", "2", "--seed", "100", "-NL", "--out",
                     tuned["tmp"], "--name", "report")
    assert r.returncode == 0, r.stderr
    assert reads.count > 0  # the instrument sees test reads where there are some
    rows = [json.loads(x) for x in (tuned["tmp"] / "report" / "results.jsonl").read_text().splitlines()]
    assert sorted(x["seed"] for x in rows) == [100, 101]


def test_report_runs_the_tuned_settings_in_main_on_fresh_seeds(tuned):
    """--resume of a finished tuning asks no trial; --report 1 runs tuned.json in main.py, here with
    the representations measured (--representations without --report is refused)."""
    r = run_here("tune.py", "--resume", tuned["run"], "-NL", "--representations")
    assert r.returncode == 2 and "give --report N too" in r.stderr
    r = run_here("tune.py", "--resume", tuned["run"], "-NL", "--report", "1", "--representations", "samples=100")
    assert r.returncode == 0, r.stderr
    assert len(trials_of(tuned["run"])) == TRIALS
    (row,) = [json.loads(x) for x in (tuned["run"] / "report" / "results.jsonl").read_text().splitlines()]
    assert row["seed"] == 100 and row["metrics"]["UA"] >= 0
    assert row["representations"]["cka_base"] > 0 and (tuned["run"] / "report" / "layers.png").is_file()
    assert not list((tuned["run"] / "report").glob("*.pt"))  # --save none
    r = run_here("tune.py", "--resume", tuned["run"], "-NL", "--report", "1")
    assert r.returncode == 2 and "ran already" in r.stderr


def test_interrupted_tuning_resumes_to_the_same_trials_and_more_trials_add_to_it(tuned, ckpts, tmp_path):
    """Ctrl-C during the third trial; --resume runs the rest: the trials are those of the tuning
    that was never interrupted (same seed, same machine); a larger --trials adds trials."""
    real, calls = tuning.run_trial, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    with mock.patch.object(tuning, "run_trial", interrupted):
        r = run_here("tune.py", "-L", tuning_file(tmp_path, ckpts), "--trials", TRIALS, "-NL", "--out", tmp_path,
                     "--name", "i")
    assert r.returncode == 130 and "resume with: python" in r.stderr and "--resume" in r.stderr
    assert len(trials_of(tmp_path / "i")) == 2
    r = run_here("tune.py", "--resume", tmp_path / "i", "-NL")
    assert r.returncode == 0, r.stderr
    assert trials_of(tmp_path / "i") == trials_of(tuned["run"])
    r = run_here("tune.py", "--resume", tmp_path / "i", "-NL", "--trials", TRIALS + 2)
    assert r.returncode == 0, r.stderr
    more = trials_of(tmp_path / "i")
    assert len(more) == TRIALS + 2 and more[:TRIALS] == trials_of(tuned["run"])


BAD_SEARCH = [
    ({"search": {"momentum": [0.1, 0.9]}}, "ga_small has no setting 'momentum' to search"),
    ({"search": {"lr": [0.1, 0.01]}}, "empty or inverted range [0.1, 0.01]"),
    ({"search": {"lr": [0.1, 0.1]}}, "empty or inverted range"),
    ({"search": {"mask_thr": [0.1, 1.5]}}, "reaches outside mask_thr's own interval (0, 1]"),
    ({"search": {"lr": "fast"}}, "expected float"),
    ({"search": {"lr": [1e-3, 0.3], "epochs": [1, 2.5]}}, "epochs is an integer"),
    ({"method": "scrub", "search": {"alpha": [0, 1]}}, "alpha is searched on a log scale, which must start above 0"),
    ({"objective": {"TA": 1}}, "unknown metric 'TA'"),
    ({"objective": {"UA": 0, "RA": 0, "VA": 0, "val_MIA": 0}}, "every weight is 0"),
    ({"retrained": None}, "tuning needs the gold standard"),
]


@pytest.mark.parametrize("extra, message", BAD_SEARCH, ids=[m.split(" (")[0][:30] for _, m in BAD_SEARCH])
def test_bad_search_is_one_line_exit_2_before_any_compute(ckpts, tmp_path, extra, message):
    path = tuning_file(tmp_path, ckpts, **extra)
    if extra.get("retrained", "") is None:
        entries = json.loads(path.read_text())
        del entries[0]["retrained"]
        path.write_text(json.dumps(entries))
    with mock.patch.object(tuning, "run_trial", side_effect=AssertionError("computed")):
        r = run_here("tune.py", "-L", path, "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_trials_zero_is_refused(ckpts, tmp_path):
    r = run_here("tune.py", "-L", tuning_file(tmp_path, ckpts), "--trials", "0", "-NL", "--out", tmp_path / "out")
    assert r.returncode == 2 and "--trials must be at least 1" in r.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- what a search covers

def test_searches_come_from_the_settings_declarations():
    def space(method, search=None, **kw):
        dims, fixed, problems = tuning.search_space(Experiment(method=method, **kw), search or {})
        assert not problems
        return {d.key: (d.low, d.high, d.log, d.integer) for d in dims}, fixed
    assert space("rl")[0] == {"lr": (1e-4, 1.0, True, False), "epochs": (1, 10, False, True)}
    assert space("ssd")[0] == {"method_args.alpha": (1.0, 100.0, True, False),
                               "method_args.lam": (0.1, 10.0, True, False)}
    assert space("bad_teacher")[0]["lr"] == (1e-5, 1e-2, True, False)  # the method's own range for Adam
    assert space("scrub")[0]["method_args.msteps"] == (1, 5, False, True)
    dims, fixed = space("rl", {"lr": [0.01, 0.1], "epochs": 2, "mask_thr": [0.2, 0.8]})
    assert dims == {"lr": (0.01, 0.1, True, False), "mask_thr": (0.2, 0.8, False, False)} and fixed == {"epochs": 2}
    assert space("neggrad_plus", {"alpha": None})[0].keys() == {"lr", "epochs"}


def test_a_trials_settings_land_in_the_experiment():
    e = tuning.with_params(Experiment(method="scrub", method_args={"gamma": 0.5}),
                           {"lr": 0.02, "method_args.alpha": 0.3, "method_args.msteps": 1})
    assert e.lr == 0.02 and e.method_args == {"gamma": 0.5, "alpha": 0.3, "msteps": 1}


# ---------------------------------------------------------------- the objective, by hand

def test_val_mia_reads_100_on_separable_losses_and_about_50_on_one_distribution():
    rng = np.random.default_rng(0)
    assert metrics.val_mia(torch.tensor(rng.uniform(0, 1, 200)), torch.tensor(rng.uniform(5, 6, 300))) == 100.0
    same = [metrics.val_mia(torch.tensor(rng.exponential(size=400)), torch.tensor(rng.exponential(size=400)))
            for _ in range(5)]
    assert abs(np.mean(same) - 50) < 6
    a, b = torch.tensor(rng.uniform(size=50)), torch.tensor(rng.uniform(size=80))
    assert metrics.val_mia(a, b) == metrics.val_mia(a, b)  # seeded: no global random state
    assert math.isnan(metrics.val_mia(torch.rand(9), torch.rand(100)))


def test_the_objective_is_the_weighted_mean_gap():
    m = {"UA": 90.0, "RA": 99.0, "VA": 95.0, "val_MIA": 60.0}
    gold = {"UA": 100.0, "RA": 98.0, "VA": 96.0, "val_MIA": 50.0}
    assert metrics.selection_objective(m, gold, {"UA": 1, "RA": 1, "VA": 1, "val_MIA": 1}) == (10 + 1 + 1 + 10) / 4
    assert metrics.selection_objective(m, gold, {"UA": 3, "RA": 1, "VA": 0, "val_MIA": 0}) == (30 + 1) / 4


def test_a_trial_evaluates_forget_val_and_a_fixed_retain_sample(digits):
    from datasets import ForgetSpec, make_split
    split = make_split(digits, ForgetSpec(3, None, None), seed=0)
    parts = metrics.selection_parts(split, 100)
    assert torch.equal(parts["forget"], split.forget) and torch.equal(parts["val"], split.val)
    assert len(parts["retain"]) == 100 and set(parts["retain"].tolist()) <= set(split.retain.tolist())
    assert torch.equal(parts["retain"], metrics.selection_parts(split, 100)["retain"])
    assert torch.equal(parts["val_forgotten"], split.val_forgotten)


def test_a_sampled_curve_point_holds_the_full_evaluations_outputs_for_its_samples(digits):
    from datasets import ForgetSpec, make_split
    from models import create_model
    import utils
    model = create_model("test_resnet", 10, digits.x_train.shape[1], digits.x_train.shape[2])[0].eval()
    split = make_split(digits, ForgetSpec(3, None, None), seed=0)
    compute = utils.compute_for(torch.device("cpu"), "fp32")
    full = metrics.evaluate(model, digits, split, compute)
    part = metrics.evaluate(model, digits, split, compute, sample=50)
    for name in ("retain", "val", "test_all"):  # test_all: the sampled test set, both sides of the class
        assert len(part[name]["y"]) == 50
    idx = metrics.sample_indices(split.retain, 50)
    position = {v: k for k, v in enumerate(split.retain.tolist())}
    expected = full["retain"]["loss"][[position[i] for i in idx.tolist()]]
    assert torch.allclose(part["retain"]["loss"], expected, atol=1e-5)


# ---------------------------------------------------------------- verdicts over runs

def test_interval_is_students_t_by_hand():
    mean, low, high = summary.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert summary.interval([5.0])[1:] == (None, None)


def test_a_verdict_needs_the_interval_on_one_side():
    words = ("yes", "no difference", "no")
    assert summary.verdict([1.0, 1.1, 0.9], 2.0, words) == "yes"
    assert summary.verdict([1.0, 3.0, 2.0], 2.0, words) == "no difference"
    assert summary.verdict([3.0, 3.1, 2.9], 2.0, words) == "no"
    assert summary.verdict([1.0], 2.0, words) == summary.NO_VERDICT


def test_mask_pairs_match_experiments_that_differ_only_in_the_mask_or_were_tuned_apart():
    plain = dict(checkpoint="a.pt", class_to_forget=3, method="rl")
    exps = [Experiment(**plain, lr=0.1), Experiment(**plain, lr=0.1, use_mask=True),
            Experiment(**plain, lr=0.1, use_mask=True, mask_thr=0.2),
            Experiment(**dict(plain, method="ft"), lr=0.1), Experiment(**dict(plain, method="ft"), lr=0.02,
                                                                       use_mask=True),
            Experiment(**dict(plain, method="ga"), lr=0.1), Experiment(**dict(plain, method="ga"), lr=0.2),
            Experiment(**dict(plain, method="ga"), lr=0.3, use_mask=True)]
    assert summary.mask_pairs(exps) == [(1, 0), (2, 0), (4, 3)]  # two unmasked ga: no pair


def gap_row(i, k, gap):
    """Run k of experiment i, with only its Avg. Gap set."""
    return {"experiment": i, "run": k, "diverged_at": None, "rte_s": 1.0, "mask_fraction": 1.0,
            "metrics": {"UA": 0.0, "RA": 0.0, "TA": 0.0, "MIA": 0.0}, "gap": {"avg_gap": gap}}


def test_mask_effect_is_paired_by_run():
    exps = [Experiment(class_to_forget=3), Experiment(class_to_forget=3, use_mask=True)]
    rows = [gap_row(0, k, g) for k, g in enumerate((5.0, 6.0, 7.0))] + \
        [gap_row(1, k, g) for k, g in enumerate((4.0, 5.1, 5.9))]
    (effect,) = summary.mask_effects(["a", "b"], exps, rows)
    mean, low, high = effect["effect"]["avg_gap"]
    diffs = [-1.0, -0.9, -1.1]
    assert mean == pytest.approx(-1.0) and high == pytest.approx(-1.0 + 4.302653 * np.std(diffs, ddof=1) / math.sqrt(3))
    assert effect["verdict"] == "mask better" and effect["runs"] == 3


def test_method_table_puts_each_method_and_its_mask_on_one_line():
    exps = [Experiment(class_to_forget=3, method=m, use_mask=mask) for m in ("rl", "ga") for mask in (False, True)]
    gaps = {0: (5.0, 6.0, 7.0), 1: (4.0, 5.1, 5.9), 2: (2.0, 2.0, 2.0), 3: (2.0, 2.5, 1.5)}
    rows = [gap_row(i, k, g) for i, gs in gaps.items() for k, g in enumerate(gs)]
    names = ["rl", "rl_m", "ga", "ga_m"]
    refs = {i: {"before": {"UA": 0.0, "RA": 0.0, "TA": 0.0, "MIA": 0.0}, "gold": {"UA": 100.0, "RA": 0.0, "TA": 0.0,
                                                                             "MIA": 100.0}} for i in range(4)}
    table = summary.summarize(names, exps, rows, refs)
    text = summary.method_table(table, summary.mask_effects(names, exps, rows))
    lines = text.splitlines()
    assert lines[2] == "| method | class 3 | + mask | mask − no mask |"
    assert lines[4] == "| do nothing (base model) | 50.00 |  |  |"
    assert lines[5] == "| rl | 6.00 ± 1.00 | 5.00 ± 0.95 | -1.00 [-1.25, -0.75] mask better |"
    assert lines[6] == "| ga | 2.00 ± 0.00 | 2.00 ± 0.50 | +0.00 [-1.24, +1.24] no difference |"


def test_a_fresh_seed_keeps_the_random_forget_set_it_was_tuned_on(ckpts, more_golds):
    e = {"checkpoint": str(ckpts["base"]), "unlearning_rate": 0.1, "retrained": str(more_golds["rf"]), "method": "ft"}
    resolve([dict(e, seed=100, forget_seed=0)], "test", "data")
    with pytest.raises(Exception, match="was retrained without"):
        resolve([dict(e, seed=100)], "test", "data")


def test_val_mia_on_too_few_validation_samples_of_the_class_is_refused_up_front(ckpts, tmp_path):
    with mock.patch.object(metrics, "VAL_MIA_MIN", 1000):
        r = run_here("tune.py", "-L", tuning_file(tmp_path, ckpts), "-NL", "--out", tmp_path / "out")
        assert r.returncode == 2 and "val_MIA needs at least 1000 validation samples" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()
        entries = json.loads(tuning_file(tmp_path, ckpts, objective={"val_MIA": 0}).read_text())
        tuning.resolve_tuning(entries, "test", "data")  # without val_MIA in the objective: fine


def test_the_fmnist_study_list_on_digits(ckpts, more_golds, tmp_path):
    """make study-fmnist's list with the suite's digits checkpoints in place of Fashion-MNIST's:
    all 60 experiments and their searches resolve; four of them (a method with and without the
    mask, on class 0 and on a random 10%) tune for one trial and report with the representations."""
    recipe = re.search(r"^study-fmnist:.*\n(\t.*\n)+", (ROOT / "Makefile").read_text(), re.M).group(0)
    assert "exp/study_fmnist.json" in recipe and "--report 3 --representations" in recipe
    swap = {"base": str(ckpts["base"]), "cf0": str(ckpts["gold"]), "rf0.1": str(more_golds["rf"])}
    entries = json.loads((ROOT / "exp" / "study_fmnist.json").read_text())
    for e in entries:
        for key in ("checkpoint", "retrained"):
            e[key] = swap[re.search(r"_(base|cf0|rf0\.1)\.pt$", e[key]).group(1)]
    experiments, spaces, _ = tuning.resolve_tuning(entries, "study_fmnist.json", "data")
    assert len(experiments) == 60 and all(spaces)
    assert {(e.method, e.use_mask, e.class_to_forget) for e in experiments} == {
        (m, mask, c) for m in METHODS for mask in (False, True) for c in (0, None)}
    picked = [e for e in entries if e["method"] == "ga_small"]
    assert len(picked) == 4
    (tmp_path / "study.json").write_text(json.dumps(picked))
    r = run_here("tune.py", "-L", tmp_path / "study.json", "--trials", "1", "-NL", "--out", tmp_path, "--name", "s",
                 "--report", "1", "--representations", "samples=100")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "s" / "report" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["representations"]["cka_base"] > 0 for row in rows)
    assert (tmp_path / "s" / "report" / "mask_effect.csv").is_file()
    assert (tmp_path / "s" / "report" / "layers.png").is_file()
