import math

import pytest
import torch

import metrics


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


def test_mia_efficacy_identical_sets_give_every_forget_sample_one_answer():
    same = torch.full((40,), 0.5)
    # members and non-members are the same point: the SVC cannot split them, so all
    # forget samples (that same point again) get one label, all members or all non-members
    assert metrics.mia_efficacy(same, same.clone(), same[:7].clone()) in (0.0, 100.0)


def test_auc_by_hand():
    assert metrics.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert metrics.auc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert metrics.auc([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert metrics.auc([0.9, 0.1], [0.5]) == 0.5


def test_loss_mia_separates_members_from_nonmembers():
    low, high = torch.linspace(0.0, 0.1, 200), torch.linspace(2.0, 3.0, 100)
    auc, nonmember = metrics.loss_mia(low, high, torch.linspace(0.01, 0.09, 30), torch.linspace(2.1, 2.9, 30))
    assert auc == 100.0 and nonmember == 0.0
    auc, nonmember = metrics.loss_mia(low, high, torch.linspace(2.1, 2.9, 30), torch.linspace(2.1, 2.9, 30))
    assert nonmember == 100.0 and 40.0 <= auc <= 60.0


def test_gap_and_avg_gap_by_hand():
    m = {"UA": 90.0, "RA": 95.0, "TA": 90.0, "MIA": 80.0}
    gold = {"UA": 100.0, "RA": 97.0, "TA": 94.0, "MIA": 100.0}
    g = metrics.gap(m, gold)
    assert g == {"UA_gap": 10.0, "RA_gap": 2.0, "TA_gap": 4.0, "MIA_gap": 20.0, "avg_gap": 9.0}


def test_split_table_counts_and_losses():
    t = metrics.split_table({"forget": out([1, 0], [1, 1], loss=[0.5, 1.5])})
    assert t == {"forget": {"n": 2, "acc": 50.0, "loss": 1.0}}
