import json
import math

import pytest
import torch

import datasets
import metrics
from conftest import run_here
from models import load_model
from utils import compute_for


def out(pred, y, loss=None, conf=None):
    n = len(y)
    return {"pred": torch.tensor(pred), "y": torch.tensor(y),
            "loss": torch.tensor(loss if loss is not None else [0.0] * n),
            "conf": torch.tensor(conf if conf is not None else [1.0] * n), "top5": torch.ones(n, dtype=torch.bool)}


def test_accuracy_by_hand():
    assert metrics.accuracy(out([1, 2, 3, 0], [1, 2, 0, 0])) == 75.0
    assert math.isnan(metrics.accuracy(out([], [])))


def test_report_ua_ra_ta_va():
    outs = {"forget": out([0, 1, 1, 1], [1, 1, 1, 1]),  # 75% right -> UA 25
            "retain": out([2, 2], [2, 2]), "test": out([0, 1], [0, 0]), "val": out([3], [4])}
    m = metrics.report(outs, mia=False)
    assert m == {"UA": 25.0, "RA": 100.0, "TA": 50.0, "VA": 0.0}


def test_mia_efficacy_separable_confidences():
    members = torch.full((50,), 0.99)
    nonmembers = torch.full((50,), 0.30)
    # forget samples that look like test samples are all called non-members
    assert metrics.mia_efficacy(members, nonmembers, torch.full((20,), 0.31)) == 100.0
    # forget samples that look like training samples are all called members
    assert metrics.mia_efficacy(members, nonmembers, torch.full((20,), 0.985)) == 0.0


def test_mia_efficacy_uses_the_first_test_sized_retain_samples():
    retain = torch.cat([torch.full((10,), 0.99), torch.full((90,), 0.30)])  # only the first 10 are used
    test = torch.full((10,), 0.30)
    assert metrics.mia_efficacy(retain, test, torch.full((5,), 0.99)) == 0.0


def test_mia_efficacy_counts_each_forget_sample_on_its_side():
    members = torch.linspace(0.90, 1.00, 60)
    nonmembers = torch.linspace(0.10, 0.20, 60)
    forget = torch.tensor([0.95, 0.97, 0.99, 0.15])  # three look trained on, one unseen
    assert metrics.mia_efficacy(members, nonmembers, forget) == 25.0


def test_auc_by_hand():
    assert metrics.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert metrics.auc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert metrics.auc([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert metrics.auc([0.9, 0.1], [0.5]) == 0.5


def test_loss_mia_separates_members_from_nonmembers():
    low, high = torch.linspace(0.01, 0.1, 200), torch.linspace(2.0, 3.0, 100)
    ref = torch.linspace(2.1, 2.9, 30)
    auc, nonmember = metrics.loss_mia(low, high, torch.linspace(0.02, 0.09, 30), ref)
    assert auc == 100.0 and nonmember == 0.0
    # half the forget set looks trained on, the other half is the reference itself: every
    # low one outranks every reference sample (1), an identical one ties on average (1/2)
    forget = torch.cat([torch.linspace(0.02, 0.09, 30), ref])
    auc, nonmember = metrics.loss_mia(low, high, forget, ref)
    assert auc == pytest.approx(75.0) and nonmember == 50.0


def test_loss_mia_is_deterministic_and_balanced():
    g = torch.Generator().manual_seed(0)
    retain, val = torch.rand(900, generator=g), torch.rand(100, generator=g) + 0.5
    forget, ref = torch.rand(50, generator=g) + 0.25, torch.rand(40, generator=g) + 0.25
    first = metrics.loss_mia(retain, val, forget, ref)
    assert first == metrics.loss_mia(retain, val, forget, ref)
    # 900 members against 100 non-members: unweighted, the attack would call almost everything
    # a member; with the classes weighted equally its threshold sits between the two groups
    _, called_nonmember = metrics.loss_mia(retain, val, torch.full((10,), 1.4), ref)
    assert called_nonmember == 100.0


def test_gap_and_avg_gap_by_hand():
    m = {"UA": 90.0, "RA": 95.0, "TA": 90.0, "MIA": 80.0}
    gold = {"UA": 100.0, "RA": 97.0, "TA": 94.0, "MIA": 100.0}
    g = metrics.gap(m, gold)
    assert g == {"UA_gap": 10.0, "RA_gap": 2.0, "TA_gap": 4.0, "MIA_gap": 20.0, "avg_gap": 9.0}


def test_split_table_counts_and_losses():
    t = metrics.split_table({"forget": out([1, 0], [1, 1], loss=[0.5, 1.5])})
    assert t == {"forget": {"n": 2, "acc": 50.0, "loss": 1.0}}


def test_report_of_a_real_model_matches_a_direct_computation(ckpts, digits):
    """UA/RA/TA/VA and the forgotten class's accuracies, recomputed here one split at a time."""
    model, cfg = load_model(ckpts["base"], torch.device("cpu"))
    split = datasets.make_split(digits, datasets.ForgetSpec(class_to_forget=0), val_idx=cfg["val_idx"])
    m = metrics.report(metrics.evaluate(model, digits, split, compute_for(torch.device("cpu"), "fp32")), mia=False)
    model.eval()

    def acc(x, y):
        with torch.no_grad():
            return 100.0 * (model(digits.prepare(x)).argmax(1) == y).float().mean().item()

    train = lambda idx: acc(digits.x_train[idx], digits.y_train[idx])  # noqa: E731
    in_val = torch.zeros(len(digits.y_train), dtype=torch.bool)
    in_val[cfg["val_idx"]] = True
    zero, zero_test = digits.y_train == 0, digits.y_test == 0
    assert m["UA"] == pytest.approx(100 - train(zero & ~in_val), abs=1e-4)
    assert m["RA"] == pytest.approx(train(~zero & ~in_val), abs=1e-4)
    assert m["VA"] == pytest.approx(train(~zero & in_val), abs=1e-4)
    assert m["VA_forgotten"] == pytest.approx(train(zero & in_val), abs=1e-4)
    assert m["TA"] == pytest.approx(acc(digits.x_test[~zero_test], digits.y_test[~zero_test]), abs=1e-4)
    assert m["TA_forgotten"] == pytest.approx(acc(digits.x_test[zero_test], digits.y_test[zero_test]), abs=1e-4)


@pytest.mark.parametrize("gold", ["cf3", "rf"])
def test_gold_standards_forget_set_looks_like_unseen_data_to_the_loss_attack(more_golds, tmp_path, gold):
    """A model that never trained on the forget set cannot tell it from other unseen samples
    of its distribution: the loss attack's AUC reads 50, up to the sampling noise of ~130
    forget samples (a standard error of about 5 points for class 3, 3 for a random 10%)."""
    r = run_here("base_test.py", "-c", more_golds[gold], "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(next(tmp_path.glob("base_test_*.json")).read_text())
    assert 40 <= row["loss_MIA_AUC"] <= 60, row["loss_MIA_AUC"]
