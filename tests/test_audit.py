"""audit.py: the challenge's score by its scorer's rules (google-deepmind/unlearning_evaluation,
metric.py) against a plain implementation of them written here, known answers on hand-made
distributions, the exhaustive rules kept as an opt-in, U-LiRA; then known answers end to end
(retraining cannot be told from the gold standards, no unlearning can), reference models
reused across audits, and bad input refused before any training."""
import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

import audit
import datasets
import metrics
import privacy
import train as train_script
import utils
from conftest import run_here
from scripted import run

DELTA = privacy.DELTA


# ---------------------------------------------------------------- the challenge's rules, written out plainly

def plain_epsilons(tpr, fpr):
    """The scorer's epsilon of each rule from its rates: infinity for a perfect separation,
    NaN for a rule it drops (FPR or FNR 0 alone, or both terms undefined)."""
    fnr = 1 - tpr
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.clip(np.fmax(np.log(1 - DELTA - fpr) - np.log(fnr), np.log(1 - DELTA - fnr) - np.log(fpr)), 0, None)
    eps[(fpr == 0) | (fnr == 0)] = np.nan
    eps[(fpr == 0) & (fnr == 0)] = np.inf
    return eps


def plain_single_epsilons(pos, neg):
    """Every 'positive when phi >= t' rule, t on the scorer's grid (torch.linspace, 100 per unit)."""
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    t = torch.linspace(lo, hi, math.ceil((hi - lo) * 100), dtype=torch.float64).numpy()[None]
    return plain_epsilons((pos[:, None] >= t).mean(0), (neg[:, None] >= t).mean(0))


def plain_interval_epsilons(peaky, other):
    """Every 'positive when l <= phi <= r' rule of the scorer's double-threshold family, the
    side with the smaller range (width w) positive: r from min + w - 2 to max + 2 of it, and
    for each r, l from r - w - 2 to r - w + 2, 100 per unit: about 400 x 400 rules, every
    one compared with every value."""
    w = peaky.max() - peaky.min()
    lo, hi = peaky.min() + w - 2.0, peaky.max() + 2.0
    right = np.linspace(lo, hi, num=math.ceil((hi - lo) * 100))
    left = np.concatenate([np.linspace(r - w - 2.0, r - w + 2.0, num=400) for r in right])[None]
    right = np.repeat(right, 400)[None]

    def inside(x):
        return ((left <= x[:, None]) & (x[:, None] <= right)).mean(0)
    return plain_epsilons(inside(peaky), inside(other))


def plain_points(eps, n):
    """The scorer's buckets: from 0 in steps of 0.5 while the bucket ends by ceil(log(N - 1)),
    worth 1, 1/2, 1/4, ...; an epsilon scores the first bucket it is below the end of, else 0."""
    buckets, start, points = [], 0.0, 1.0
    while start + 0.5 <= math.ceil(math.log(n - 1)):
        buckets.append((start, points))
        start, points = start + 0.5, points / 2
    return next((p for s, p in buckets if eps < s + 0.5), 0.0)


def plain_challenge(unlearned, retrained):
    """Per-sample epsilons and F, sample by sample, as the scorer's definition reads."""
    n, size = unlearned.shape
    epsilons = []
    for i in range(size):
        u, r = unlearned[:, i], retrained[:, i]
        pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
        ranges = (pos.max() - pos.min(), neg.max() - neg.min())
        if min(ranges) / max(ranges) < 0.01:
            epsilons.append(50.0)
            continue
        peaky, other = (pos, neg) if ranges[0] < ranges[1] else (neg, pos)
        epsilons.append(min(np.nanmax(np.r_[plain_single_epsilons(pos, neg), plain_interval_epsilons(peaky, other)]),
                            50.0))
    return np.array(epsilons), float(np.mean([plain_points(e, n) for e in epsilons]))


def test_the_official_rules_match_a_plain_implementation_of_the_scorer():
    """N = 8 models a side, 30 samples of shifted and scaled Gaussians at scales from 0.02
    (where the grid of 100 thresholds per unit is coarse) to 5, one of them collapsed."""
    gen = np.random.default_rng(7)
    scale = np.array([0.02, 0.1, 0.5, 1, 2, 5] * 5)
    unlearned = (gen.standard_normal((8, 30)) * gen.uniform(0.3, 1.5, 30) + gen.uniform(-1, 1, 30)) * scale
    retrained = gen.standard_normal((8, 30)) * scale
    unlearned[:, 0] = 0.1 + gen.standard_normal(8) * 1e-4
    eps, f = plain_challenge(unlearned, retrained)
    got_eps, got_points, got_f = privacy.challenge(unlearned, retrained)
    assert got_eps == pytest.approx(eps, abs=1e-5)  # the scorer's float32 against float64 here
    assert got_f == f and got_eps[0] == 50
    assert 0 < f < 1 and len(set(got_points)) > 2  # the cases reach several buckets
    assert audit.challenge is privacy.challenge  # the entry point outside checks call


def test_official_buckets_at_32_models():
    """ceil(log 31) = 4: 8 buckets of width 0.5 from 0, and an epsilon of 4 or more scores 0."""
    assert privacy.n_buckets(32) == 8 and privacy.n_buckets(512) == 14
    eps = [0.0, 0.49, 0.5, 1.2, 3.49, 3.5, 3.99, 4.0, 7.0, 50.0]
    assert list(privacy.official_points(eps, 32)) == [plain_points(e, 32) for e in eps]
    assert list(privacy.official_points(eps, 32)) == [1, 1, 0.5, 0.25, 2 ** -6, 2 ** -7, 2 ** -7, 0, 0, 0]


def test_a_perfect_separation_scores_no_point():
    """A threshold between the sides has FPR = FNR = 0: epsilon infinite, capped at 50, past the last bucket."""
    eps, points, f = privacy.challenge(np.array([[5.0], [6], [7], [8]]), np.array([[1.0], [2], [3], [4]]))
    assert eps[0] == 50 and f == 0


def test_a_constant_unlearned_output_inside_the_retrained_range_is_collapsed():
    """Range 0 against the gold standards' spread: under 1% of it, so epsilon 50 and 0 points,
    although the constant sits at the retrained median. The exhaustive rules see only
    thresholds there, none of which separates, and give it a full point."""
    retrained = np.random.default_rng(0).standard_normal((32, 1))
    unlearned = np.full((32, 1), np.median(retrained))
    eps, points, f = privacy.challenge(unlearned, retrained)
    assert eps[0] == 50 and f == 0
    assert privacy.exhaustive_challenge(unlearned, retrained)[2] == 1.0


def test_a_narrow_unlearned_distribution_is_collapsed():
    """sigma 0.005 against sigma 1 at N = 32: the ranges' ratio is under 0.01, so epsilon 50."""
    gen = np.random.default_rng(1)
    unlearned, retrained = 0.005 * gen.standard_normal((32, 20)), gen.standard_normal((32, 20))
    ratio = np.ptp(unlearned, 0) / np.ptp(retrained, 0)
    assert (ratio < 0.01).all()
    eps, points, f = privacy.challenge(unlearned, retrained)
    assert (eps == 50).all() and f == 0


def test_interval_rules_find_what_no_single_threshold_does():
    """Unlearned values tight around 0 (sigma 0.3), retrained ones split around -3 and +3 (16
    each): the interval [min, max] of the unlearned values holds all of them and no retrained
    value, a perfect separation (epsilon 50, 0 points). A single threshold cuts off one
    retrained mode at most: at best FNR 1/2 with FPR 1/32 (one unlearned value beside it), so
    epsilon log((1/2 - delta) x 32), about log 16, in bucket 5."""
    gen = np.random.default_rng(2)
    unlearned = 0.3 * gen.standard_normal((32, 1))
    retrained = np.r_[-3 + 0.3 * gen.standard_normal((16, 1)), 3 + 0.3 * gen.standard_normal((16, 1))]
    u, r = unlearned[:, 0], retrained[:, 0]
    single = max(np.nanmax(plain_single_epsilons(pos, neg)) for pos, neg in ((u, r), (r, u)))
    assert single == pytest.approx(math.log((0.5 - DELTA) * 32))
    eps, points, f = privacy.challenge(unlearned, retrained)
    assert eps[0] == 50 and f == 0
    assert privacy.exhaustive_challenge(unlearned, retrained)[0][0] == pytest.approx(single)


def test_identical_distributions_reach_the_chance_ceiling_and_shifted_ones_score_lower():
    """Identically distributed standard normals score about 0.185 at N = 32 (measured on 4000
    samples, which the scorer's own code scores alike), as chance_f, drawn from the gold
    standards' per-sample normals, says; one standard deviation apart, most samples land in
    later buckets."""
    gen = np.random.default_rng(3)
    retrained = gen.standard_normal((32, 300))
    same = privacy.challenge(gen.standard_normal((32, 300)), retrained)[2]
    assert same == pytest.approx(0.185, abs=0.04)
    assert privacy.chance_f(retrained) == pytest.approx(0.185, abs=0.04)
    shifted = privacy.challenge(gen.standard_normal((32, 300)) + 1, retrained)[2]
    assert shifted < same / 2


def test_the_chance_ceiling_depends_on_the_scale_of_phi_under_the_official_rules():
    """A grid of 100 thresholds per unit cannot split values 0.01 apart: identical
    distributions of phi at sigma 0.01 score higher than at sigma 1. Ranks alone decide the
    exhaustive rules, which do not see the scale."""
    gen = np.random.default_rng(4)
    unit = gen.standard_normal((8, 300))
    assert privacy.chance_f(0.01 * unit) > privacy.chance_f(unit) + 0.05
    assert privacy.chance_f(0.01 * unit, "exhaustive") == privacy.chance_f(unit, "exhaustive")


# ---------------------------------------------------------------- --attacks exhaustive, by hand

def test_exhaustive_epsilon_of_a_perfect_separation_is_infinite_and_scores_the_last_bucket():
    assert privacy.exhaustive_epsilon([5, 6, 7, 8], [1, 2, 3, 4]) == math.inf
    assert privacy.exhaustive_epsilon([1, 2, 3, 4], [5, 6, 7, 8]) == math.inf  # either direction
    assert privacy.exhaustive_buckets(4) == 4 and privacy.exhaustive_buckets(32) == 8
    assert privacy.exhaustive_points(math.inf, 4) == 2 ** -3 and privacy.exhaustive_points(math.inf, 32) == 2 ** -7


def test_exhaustive_epsilon_of_identical_values_is_zero_and_scores_one_point():
    assert privacy.exhaustive_epsilon([1.0] * 4, [1.0] * 4) == 0.0
    assert privacy.exhaustive_points(0.0, 4) == 1.0
    assert privacy.challenge(np.ones((4, 1)), np.ones((4, 1)))[2] == 1.0  # the official rules' choice, too


def test_exhaustive_epsilon_by_hand():
    """Unlearned 0..3, retrained 1..4: the best rule, 'unlearned when phi < 2', has FPR 1/4
    and FNR 2/4, so epsilon = log(1 - delta - 2/4) - log(1/4), log 2 but for delta."""
    eps = privacy.exhaustive_epsilon([0, 1, 2, 3], [1, 2, 3, 4])
    assert eps == pytest.approx(math.log((0.5 - DELTA) / 0.25), abs=1e-12)
    assert privacy.exhaustive_points(eps, 4) == 0.5  # bucket [0.5, 1)
    # symmetric in the two sides, and rules on ranks do not see a monotone transform
    assert privacy.exhaustive_epsilon([1, 2, 3, 4], [0, 1, 2, 3]) == pytest.approx(eps)
    assert privacy.exhaustive_epsilon(np.exp([0, 1, 2, 3]), np.exp([1, 2, 3, 4])) == pytest.approx(eps)


def test_exhaustive_one_outlier_among_32_is_the_largest_epsilon_32_models_resolve():
    """31 of 32 unlearned values above every retrained one, one below them all: the rule
    'unlearned when phi >= the highest retrained value' has FPR 1/32 and FNR 1/32, so
    epsilon = log(1 - delta - 1/32) + log 32 (about log 31), the largest finite one."""
    unlearned = np.r_[-10.0, np.arange(31) + 100.0]
    retrained = np.arange(32, dtype=float)
    eps = privacy.exhaustive_epsilon(unlearned, retrained)
    assert eps == pytest.approx(math.log((1 - DELTA - 1 / 32) * 32))
    assert privacy.exhaustive_points(eps, 32) == 2.0 ** -6  # bucket [3, 3.5), the last finite one at N = 32


def test_exhaustive_bucket_points():
    assert [privacy.exhaustive_points(e, 512) for e in (0.49, 0.5, 1.2, 6.1, math.inf)] == [1, 0.5, 0.25, 2 ** -12,
                                                                                           2 ** -13]
    assert privacy.exhaustive_points(-0.1, 8) == 1.0


# ---------------------------------------------------------------- U-LiRA

def test_ulira_on_gaussians_of_known_separation():
    """In ~ N(2, 1), out ~ N(0, 1): the likelihood ratio is linear in phi, so its AUC is
    Phi(2 / sqrt 2) = 92.1% and its best balanced accuracy, at phi = 1, Phi(1) = 84.1%;
    identical sides give 50."""
    gen = np.random.default_rng(0)
    k, n = 40, 500
    is_in = privacy.shadow_halves(n, k, seed=0)
    shadows = gen.standard_normal((k, n)) + 2 * is_in
    _, _, r = privacy.ulira(shadows, is_in, gen.standard_normal((20, n)) + 2, gen.standard_normal((20, n)))
    assert r["AUC"] == pytest.approx(92.1, abs=1.5)
    assert r["balanced_accuracy"] == pytest.approx(84.1, abs=1.5)
    assert 0 < r["TPR@0.1%FPR"] <= r["TPR@1%FPR"] < 100
    same = gen.standard_normal((k, n))
    _, _, r = privacy.ulira(same, is_in, gen.standard_normal((20, n)), gen.standard_normal((20, n)), per_sample=True)
    assert r["AUC"] == pytest.approx(50, abs=3) and r["balanced_accuracy"] == pytest.approx(50, abs=3)


def test_balanced_accuracy_by_hand():
    """Positives 2 and 3, negatives 0, 1 and 2.5: 'positive when score >= 2' takes both
    positives and one negative, (1 + 2/3) / 2 = 83.3%; '>= 3' only reaches (1/2 + 1) / 2 = 75%."""
    fpr, tpr = privacy.roc(np.array([2.0, 3.0]), np.array([0.0, 1.0, 2.5]))
    assert privacy.balanced_accuracy(fpr, tpr) == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_shadow_halves_put_every_sample_in_half_the_shadows():
    halves = privacy.shadow_halves(100, 6, seed=3)
    assert halves.shape == (6, 100) and (halves.sum(0) == 3).all()
    assert 30 < halves.sum(1).min() and halves.sum(1).max() < 70
    assert (halves == privacy.shadow_halves(100, 6, seed=3)).all()


def test_logit_confidence_is_stable_where_probabilities_round_to_one():
    logits = torch.tensor([[2.0, 0.5, -1.0], [100.0, 0.0, 0.0], [0.0, 0.0, 300.0]])
    y = torch.tensor([0, 0, 0])
    phi = metrics.logit_confidence(logits, y)
    p = logits.double().softmax(1)[:, 0]
    assert phi[0].item() == pytest.approx(math.log(p[0] / (1 - p[0])), rel=1e-12)
    assert phi[1].item() == pytest.approx(100 - math.log(2), rel=1e-12)  # p_y = 1.0 in float64 already
    assert phi[2].item() == pytest.approx(-300 + math.log(1 + 2 * math.exp(-300)), rel=1e-12)


# ---------------------------------------------------------------- end to end, known answers

N, K = 6, 6


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A 3-epoch test_resnet base model on digits, audited for retraining (train.py's recipe,
    new seeds) and ga_small on class 3, with N = K = 6, in the suite's precision. Three epochs:
    the one original is the checkpoint itself, and after one epoch in bf16 it may not know
    class 3 at all (UA 98), leaving no unlearning nothing for U-LiRA to find."""
    d = tmp_path_factory.mktemp("audit")
    train_script.main(["--dataset", "digits", "--model", "test_resnet", "--epochs", "3", "--batch-size", "64",
                       "--lr", "0.2", "-NL", "--save-dir", str(d)])  # here: a process start costs more
    base = {"checkpoint": str(d / "test_resnet_digits_base.pt"), "class_to_forget": 3, "batch_size": 64}
    exps = [dict(base, method="retrain", lr=0.2, epochs=3), dict(base, method="ga_small", lr=0.05, epochs=1)]
    (d / "exp.json").write_text(json.dumps(exps))
    r = run("audit.py", "-L", d / "exp.json", "--models", N, "--shadows", K, "-NL", "--out", d / "out",
            "--name", "a", "--models-dir", d / "pool", cwd=d)
    assert r.returncode == 0, r.stderr
    out = d / "out" / "a"
    return {"dir": d, "out": out, "stdout": r.stdout, "base": base,
            "rows": {row["experiment"].split("_")[1] if row["experiment"][0].isdigit() else "none": row
                     for row in json.loads((out / "audit.json").read_text())["experiments"]}}


def test_retraining_cannot_be_told_from_the_gold_standards_and_no_unlearning_can(audited):
    """The challenge's protocol: the checkpoint is the one original. Retraining's N models are
    drawn as the gold standards are, so its F is the chance ceiling measured from the gold
    standards' phi; no unlearning is N copies of the checkpoint, a collapsed side on every
    forget sample: epsilon 50, 0 points."""
    rows = audited["rows"]
    ceiling = rows["none"]["F_identical"]
    assert rows["retrain"]["F_identical"] == ceiling and 0.1 < ceiling < 0.5
    assert rows["retrain"]["F"] == pytest.approx(ceiling, abs=0.1)
    assert rows["none"]["F"] == 0
    assert 40 <= rows["retrain"]["AUC"] <= 60 and rows["retrain"]["balanced_accuracy"] < 60  # 50 at best
    # U-LiRA's shadows saw half of class 3 and know the class, so both its Gaussians sit far
    # above the gold standards' phi (README, "What the audit says"), whose likelihood ratio then
    # rests on the two variances alone: the AUC of one original against them came out 86 in
    # fp32 and 46 in bf16. Its best threshold still tells them apart in both (90 and 68).
    assert rows["none"]["balanced_accuracy"] > rows["retrain"]["balanced_accuracy"] + 8
    assert rows["retrain"]["score"] == pytest.approx(
        rows["retrain"]["F"] * rows["retrain"]["RA"] / rows["retrain"]["RA_retrained"]
        * rows["retrain"]["TA"] / rows["retrain"]["TA_retrained"])
    assert f"{N + K} reference models trained" in audited["stdout"]  # gold standards and shadows


def test_outputs_hold_every_forget_sample(audited):
    out = audited["out"]
    for name in ("audit.json", "audit.md", "samples.csv", "epsilon.png", "roc.png", "config.json", "results.jsonl"):
        assert (out / name).is_file(), name
    with open(out / "samples.csv") as f:
        samples = list(csv.DictReader(f))
    cfg = utils.load_checkpoint(audited["base"]["checkpoint"])["config"]
    ds = datasets.load_dataset("digits")
    forget = datasets.make_split(ds, datasets.ForgetSpec(class_to_forget=3), val_idx=cfg["val_idx"]).forget.tolist()
    assert len(samples) == 3 * len(forget)  # no unlearning, retrain and ga_small
    assert sorted({int(s["index"]) for s in samples}) == forget
    assert "| no unlearning (class 3) |" in (out / "audit.md").read_text()


def test_resume_audits_only_what_is_missing_and_trains_no_reference_model(audited):
    """A new process, as a second audit of the same forget set would be: every reference
    model comes from --models-dir, which gains no file."""
    out, d = audited["out"], audited["dir"]
    pool = sorted(p.name for p in (d / "pool").iterdir())
    assert len(pool) == N + K  # gold standards and shadows (retrain's models are not kept)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n")  # as if interrupted after the first experiment
    r = run("audit.py", "--resume", out, "-NL", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "1 already done" in r.stdout and "0 reference models trained" in r.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (d / "pool").iterdir()) == pool


@pytest.mark.parametrize("flags", [("--attacks", "exhaustive"), ("--originals", str(N))])
def test_resume_keeps_the_audits_rules_and_protocol(audited, flags, capsys):
    out = audited["out"]
    config = json.loads((out / "config.json").read_text())
    assert (config["attacks"], config["originals"]) == ("official", 1)
    with pytest.raises(SystemExit) as e:
        utils.cli(lambda: audit.main_(["--resume", str(out), "-NL", *flags]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and flags[0] in err and len(err.strip().splitlines()) == 1, err


def test_the_opt_in_deviations_train_n_originals_and_score_every_threshold(audited, tmp_path):
    """--originals N --attacks exhaustive, this toolkit's earlier audit: N originals trained
    with the checkpoint's recipe (the gold standards and shadows come from the pool), each
    unlearned once, and every single threshold scored, a perfect separation in the last
    bucket. The originals knew class 3, so with no unlearning most samples separate."""
    shutil.copytree(audited["dir"] / "pool", tmp_path / "pool")
    r = run_here("audit.py", "-c", audited["base"]["checkpoint"], "-CF", 3, "-M", "ga_small", "-LR", 0.05, "-E", 1,
                 "--batch-size", 64, "--models", N, "--shadows", K, "--originals", N, "--attacks", "exhaustive",
                 "-NL", "--out", tmp_path / "out", "--name", "b", "--models-dir", tmp_path / "pool", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{N} reference models trained" in r.stdout  # the originals alone
    result = json.loads((tmp_path / "out" / "b" / "audit.json").read_text())
    assert (result["attacks"], result["originals"]) == ("exhaustive", N)
    assert result["buckets"] == privacy.exhaustive_buckets(N)
    none = result["experiments"][0]
    assert none["F"] < none["F_identical"] / 2


@pytest.mark.parametrize("args, message", [
    (("--models", "2"), "--models must be between 3"),
    (("--shadows", "3"), "--shadows must be between 4"),  # U-LiRA: a side with one shadow has no variance
    (("--models", "8", "--originals", "4"), "--originals must be 1 (the checkpoint itself"),
    (("-M", "nope"), "unknown method 'nope'"),
    (("-M", "scrub", "-MA", "nope=1"), "scrub has no setting 'nope'"),
    (("-CF", "12"), "class 12 out of range 0..9"),
    (("-CF", "3", "-UL", "0.1"), "exactly one"),
])
def test_bad_input_ends_in_one_line_before_any_training(audited, tmp_path, args, message, capsys):
    flags = {"-c": audited["base"]["checkpoint"], "-CF": "3"}
    flags.update(dict(zip(args[::2], args[1::2])))
    argv = [x for kv in flags.items() for x in kv] + ["-NL", "--out", str(tmp_path / "out"),
                                                      "--models-dir", str(tmp_path / "pool")]
    with pytest.raises(SystemExit) as e:
        utils.cli(lambda: audit.main_(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pool").exists() and not (tmp_path / "out").exists()
