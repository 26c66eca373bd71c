"""audit.py: the challenge's epsilon and points and U-LiRA on hand-made distributions, then
known answers end to end (retraining cannot be told from the gold standards, no unlearning
can), reference models reused across audits, and bad input refused before any training."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import audit
import datasets
import metrics
import train as train_script
import utils
from scripted import run

DELTA = audit.DELTA


# ---------------------------------------------------------------- the scores, by hand

def test_epsilon_of_a_perfect_separation_is_infinite_and_scores_the_last_bucket():
    assert audit.epsilon([5, 6, 7, 8], [1, 2, 3, 4]) == math.inf
    assert audit.epsilon([1, 2, 3, 4], [5, 6, 7, 8]) == math.inf  # either direction
    assert audit.n_buckets(4) == 4 and audit.n_buckets(32) == 8
    assert audit.bucket_points(math.inf, 4) == 2 ** -3 and audit.bucket_points(math.inf, 32) == 2 ** -7


def test_epsilon_of_identical_values_is_zero_and_scores_one_point():
    assert audit.epsilon([1.0] * 4, [1.0] * 4) == 0.0
    assert audit.bucket_points(0.0, 4) == 1.0


def test_epsilon_by_hand():
    """Unlearned 0..3, retrained 1..4: the best rule, 'unlearned when phi < 2', has FPR 1/4
    and FNR 2/4, so epsilon = log(1 - delta - 2/4) - log(1/4), log 2 but for delta."""
    eps = audit.epsilon([0, 1, 2, 3], [1, 2, 3, 4])
    assert eps == pytest.approx(math.log((0.5 - DELTA) / 0.25), abs=1e-12)
    assert audit.bucket_points(eps, 4) == 0.5  # bucket [0.5, 1)
    # symmetric in the two sides, and rules on ranks do not see a monotone transform
    assert audit.epsilon([1, 2, 3, 4], [0, 1, 2, 3]) == pytest.approx(eps)
    assert audit.epsilon(np.exp([0, 1, 2, 3]), np.exp([1, 2, 3, 4])) == pytest.approx(eps)


def test_one_outlier_among_32_is_the_largest_epsilon_32_models_resolve():
    """31 of 32 unlearned values above every retrained one, one below them all: the rule
    'unlearned when phi >= the highest retrained value' has FPR 1/32 and FNR 1/32, so
    epsilon = log(1 - delta - 1/32) + log 32 (about log 31), the largest finite one."""
    unlearned = np.r_[-10.0, np.arange(31) + 100.0]
    retrained = np.arange(32, dtype=float)
    eps = audit.epsilon(unlearned, retrained)
    assert eps == pytest.approx(math.log((1 - DELTA - 1 / 32) * 32))
    assert audit.bucket_points(eps, 32) == 2.0 ** -6  # bucket [3, 3.5), the last finite one at N = 32


def test_bucket_points():
    assert [audit.bucket_points(e, 512) for e in (0.49, 0.5, 1.2, 6.1, math.inf)] == [1, 0.5, 0.25, 2 ** -12,
                                                                                       2 ** -13]
    assert audit.bucket_points(-0.1, 8) == 1.0


def test_f_of_identical_distributions_is_the_chance_ceiling_and_shifted_ones_score_lower():
    gen = np.random.default_rng(1)
    same = audit.challenge(gen.standard_normal((8, 300)), gen.standard_normal((8, 300)))[2]
    assert same == pytest.approx(audit.chance_f(8), abs=0.03)
    shifted = audit.challenge(gen.standard_normal((8, 300)) + 3, gen.standard_normal((8, 300)))[2]
    assert shifted < same / 2


def test_ulira_on_gaussians_of_known_separation():
    """In ~ N(2, 1), out ~ N(0, 1): the likelihood ratio is linear in phi, so its AUC is
    Phi(2 / sqrt 2) = 92.1%; identical sides give 50."""
    gen = np.random.default_rng(0)
    k, n = 40, 500
    is_in = audit.shadow_halves(n, k, seed=0)
    shadows = gen.standard_normal((k, n)) + 2 * is_in
    _, _, r = audit.ulira(shadows, is_in, gen.standard_normal((20, n)) + 2, gen.standard_normal((20, n)))
    assert r["AUC"] == pytest.approx(92.1, abs=1.5)
    assert 0 < r["TPR@0.1%FPR"] <= r["TPR@1%FPR"] < 100
    same = gen.standard_normal((k, n))
    _, _, r = audit.ulira(same, is_in, gen.standard_normal((20, n)), gen.standard_normal((20, n)), per_sample=True)
    assert r["AUC"] == pytest.approx(50, abs=3)


def test_shadow_halves_put_every_sample_in_half_the_shadows():
    halves = audit.shadow_halves(100, 6, seed=3)
    assert halves.shape == (6, 100) and (halves.sum(0) == 3).all()
    assert 30 < halves.sum(1).min() and halves.sum(1).max() < 70
    assert (halves == audit.shadow_halves(100, 6, seed=3)).all()


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
    """A 1-epoch test_resnet base model on digits, audited for retraining (train.py's recipe,
    new seeds) and ga_small on class 3, with N = K = 6."""
    d = tmp_path_factory.mktemp("audit")
    # fp32 on every machine: with N = K = 6 one-epoch models the margins below are a few AUC
    # points, and bf16 training (auto on CPUs with native bf16) moves them by as much
    train_script.main(["--dataset", "digits", "--model", "test_resnet", "--epochs", "1", "--batch-size", "64",
                       "--lr", "0.2", "-NL", "--precision", "fp32", "--save-dir", str(d)])  # a process start costs more
    base = {"checkpoint": str(d / "test_resnet_digits_base.pt"), "class_to_forget": 3, "batch_size": 64}
    exps = [dict(base, method="retrain", lr=0.2, epochs=1), dict(base, method="ga_small", lr=0.05, epochs=1)]
    (d / "exp.json").write_text(json.dumps(exps))
    r = run("audit.py", "-L", d / "exp.json", "--models", N, "--shadows", K, "-NL", "--out", d / "out",
            "--name", "a", "--models-dir", d / "pool", "--precision", "fp32", cwd=d)
    assert r.returncode == 0, r.stderr
    out = d / "out" / "a"
    return {"dir": d, "out": out, "stdout": r.stdout, "base": base,
            "rows": {row["experiment"].split("_")[1] if row["experiment"][0].isdigit() else "none": row
                     for row in json.loads((out / "audit.json").read_text())["experiments"]}}


def test_retraining_cannot_be_told_from_the_gold_standards_and_no_unlearning_can(audited):
    rows = audited["rows"]
    ceiling = audit.chance_f(N)
    assert rows["retrain"]["F"] == pytest.approx(ceiling, abs=0.1)
    assert 40 <= rows["retrain"]["AUC"] <= 60
    assert rows["none"]["F"] < ceiling / 2  # the originals knew class 3: most samples separate
    # U-LiRA's shadows saw half of class 3 and know the class, so its "out" Gaussians sit far
    # from the gold standards' phi (README, "What the audit says"): weaker, but still above chance
    assert rows["none"]["AUC"] > rows["retrain"]["AUC"] + 8
    assert rows["retrain"]["score"] == pytest.approx(
        rows["retrain"]["F"] * rows["retrain"]["RA"] / rows["retrain"]["RA_retrained"]
        * rows["retrain"]["TA"] / rows["retrain"]["TA_retrained"])
    assert f"{2 * N + K} reference models trained" in audited["stdout"]


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
    assert len(pool) == 2 * N + K  # gold standards, originals, shadows (retrain's models are not kept)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n")  # as if interrupted after the first experiment
    r = run("audit.py", "--resume", out, "-NL", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "1 already done" in r.stdout and "0 reference models trained" in r.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (d / "pool").iterdir()) == pool


@pytest.mark.parametrize("args, message", [
    (("--models", "1"), "--models must be between 2"),
    (("--shadows", "1"), "--shadows must be between 2"),
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
