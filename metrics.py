"""Metrics of a model before and after unlearning (all in percent).

    outs = evaluate(model, ds, split, compute)   # per-sample loss, prediction, confidence, phi
    m = report(outs)                              # UA, RA, TA, VA, MIA-efficacy, loss-MIA

`evaluate` is the only evaluation loop in the toolkit: one pass over the training set
and one over the test set, cut into splits afterwards, always in fp32 whatever the
training precision (bf16 moved the loss-MIA AUC of one checkpoint by 6.7 points).
Everything after it is a pure function over per-sample CPU tensors.
"""
import numpy as np
import torch
import torch.nn.functional as F

from datasets import batches

SPLITS = ("train", "retain", "forget", "val", "val_forgotten", "test", "test_forgotten")


@torch.no_grad()
def predict(model, ds, idx, compute, test=False, batch_size=1024):
    """Per-sample loss, prediction, true-class confidence and top-5 hit over idx, in fp32."""
    model.eval()
    parts = []
    for x, y, _ in batches(ds, idx, batch_size, test=test, channels_last=compute.channels_last):
        logits = model(x).float()
        prob = logits.softmax(1)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        parts.append(torch.stack([
            # in float64: a confident fp32 prediction's loss rounds to 0, and the attack
            # would see ties where a member's loss is in fact far below a non-member's
            F.cross_entropy(logits.double(), y, reduction="none").float(),
            logits.argmax(1).float(),
            prob.gather(1, y[:, None]).squeeze(1),
            (top5 == y[:, None]).any(1).float(),
            y.float(),
            logit_confidence(logits, y).float(),
        ]))
    stacked = torch.cat(parts, dim=1).cpu() if parts else torch.zeros(6, 0)
    loss, pred, conf, top5, y, phi = stacked
    return {"loss": loss, "pred": pred.long(), "conf": conf, "top5": top5.bool(), "y": y.long(), "phi": phi}


def logit_confidence(logits, y):
    """phi = log p_y - log(1 - p_y), the logit-scaled confidence of the per-example attacks
    (LiRA, U-LiRA, the NeurIPS 2023 challenge), from the logits: z_y minus the logsumexp of
    the other classes' logits, in float64. Through probabilities it would be inf as soon as
    p_y rounds to 1, which a confident model reaches on most of its training samples."""
    z = logits.double()
    others = z.scatter(1, y[:, None], float("-inf"))
    return z.gather(1, y[:, None]).squeeze(1) - others.logsumexp(1)


def take(out, idx):
    return {k: v[idx] for k, v in out.items()}


def evaluate(model, ds, split, compute, batch_size=1024, sample=None):
    """Per-sample outputs for every split, from one pass over train and one over test.

    For class forgetting, `test` and `val` hold the remaining classes, `test_forgotten`
    and `val_forgotten` the forgotten class, and `test_all` the whole test set. With
    `sample`, each split (and the test set) is at most `sample` samples, drawn once from a
    fixed seed (`sample_indices`): a curve point between epochs, not a result.
    """
    if sample is not None:
        parts = {name: sample_indices(idx, sample) for name, idx in train_parts(split).items()}
        outs = predict_parts(model, ds, parts, compute, batch_size)
        test = predict(model, ds, sample_indices(torch.arange(len(ds.y_test), device=ds.device), sample), compute,
                       test=True, batch_size=batch_size)
        return {**outs, **test_splits(test, split.forget_class)}
    train = predict(model, ds, torch.arange(len(ds.y_train), device=ds.device), compute,
                    batch_size=batch_size)
    test = predict(model, ds, torch.arange(len(ds.y_test), device=ds.device), compute, test=True,
                   batch_size=batch_size)
    outs = {name: take(train, idx.cpu()) for name, idx in train_parts(split).items()}
    outs["train"] = take(train, split.train.cpu())
    outs.update(test_splits(test, split.forget_class))
    return outs


def train_parts(split):
    """The split's named sets of training indices: retain, forget, val (and val_forgotten)."""
    parts = {name: getattr(split, name) for name in ("retain", "forget", "val")}
    if split.forget_class is not None:
        parts["val_forgotten"] = split.val_forgotten
    return parts


def sample_indices(idx, n, seed=0):
    """At most n of the sorted indices `idx`, drawn from `seed` alone, sorted: the same samples
    for every model and every epoch."""
    if n is None or len(idx) <= n:
        return idx
    pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]
    return idx[pick.to(idx.device)].sort().values


def predict_parts(model, ds, parts, compute, batch_size=1024):
    """Per-sample outputs for named sets of training indices, from one pass over their union."""
    idx = torch.unique(torch.cat([p.to(ds.device) for p in parts.values()]))  # sorted
    out = predict(model, ds, idx, compute, batch_size=batch_size)
    position = torch.full((len(ds.y_train),), -1, dtype=torch.long)
    position[idx.cpu()] = torch.arange(len(idx))
    return {name: take(out, position[p.cpu()]) for name, p in parts.items()}


def test_splits(test, forget_class=None):
    """{"test": ...}, or for class forgetting the remaining classes as "test", the
    forgotten class as "test_forgotten" and both as "test_all"."""
    if forget_class is None:
        return {"test": test}
    forgotten = test["y"] == forget_class
    return {"test": take(test, ~forgotten), "test_forgotten": take(test, forgotten), "test_all": test}


# ---------------------------------------------------------------- pure metrics

def accuracy(out):
    """Top-1 accuracy in percent; NaN for an empty split."""
    if len(out["y"]) == 0:
        return float("nan")
    return 100.0 * (out["pred"] == out["y"]).float().mean().item()


def top5_accuracy(out):
    return 100.0 * out["top5"].float().mean().item() if len(out["y"]) else float("nan")


def mean_loss(out):
    return out["loss"].mean().item() if len(out["y"]) else float("nan")


def mia_efficacy(conf_retain, conf_test, conf_forget):
    """SalUn's MIA-efficacy: % of forget samples an RBF SVC calls non-members.

    The SVC (C=3, gamma="auto") learns from the true-class confidence of the first
    |test| retain samples (members, 1) and of the test samples (non-members, 0).
    """
    if len(conf_forget) == 0 or len(conf_test) == 0:
        return float("nan")
    from sklearn.svm import SVC
    members = conf_retain[:len(conf_test)]
    x = torch.cat([members, conf_test]).numpy().reshape(-1, 1)
    y = np.r_[np.ones(len(members)), np.zeros(len(conf_test))]
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return 100.0 * float((clf.predict(conf_forget.numpy().reshape(-1, 1)) == 0).mean())


def auc(scores_pos, scores_neg):
    """Area under the ROC curve: P(positive scores above negative), ties counting half."""
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.ones(len(scores_pos)), np.zeros(len(scores_neg))]
    return float(roc_auc_score(y, np.r_[np.asarray(scores_pos), np.asarray(scores_neg)]))


def loss_mia(loss_retain, loss_val, loss_forget, loss_ref):
    """The DeepDive attack: a logistic regression on the log of per-sample losses.

    Fitted on retain (members, 1) against validation (non-members, 0), the two classes
    weighted equally, then scored on forget samples (1) against `loss_ref`, non-members
    of the forget set's own distribution (see `reference_losses`). Returns (AUC in
    percent, % of forget samples predicted non-members). The fit is deterministic (no
    sampling, no seed). Its decision function is linear in the log-loss, so the AUC is the
    rank statistic of forget against reference losses in the direction the attack learnt;
    it is taken on the decision function, not on probabilities, which round to exactly 1
    for the smallest losses and would tie.
    """
    if min(len(loss_val), len(loss_forget), len(loss_ref), len(loss_retain)) == 0:
        return float("nan"), float("nan")
    from sklearn.linear_model import LogisticRegression

    def feature(loss):  # a loss below float32's smallest positive value counts as that value
        return np.log(np.maximum(loss.double().numpy(), 1e-45)).reshape(-1, 1)

    x = np.r_[feature(loss_retain), feature(loss_val)]
    y = np.r_[np.ones(len(loss_retain)), np.zeros(len(loss_val))]
    clf = LogisticRegression(class_weight="balanced").fit(x, y)
    s_forget = clf.decision_function(feature(loss_forget))
    s_ref = clf.decision_function(feature(loss_ref))
    return 100.0 * auc(s_forget, s_ref), 100.0 * float((s_forget < 0).mean())


def reference_losses(outs):
    """Non-members of the forget set's own distribution, which no model trained on: for
    class forgetting the forgotten class's test and validation samples (the attack is fitted
    on the other classes' validation samples, so these are new to it), otherwise the test set."""
    if "test_forgotten" in outs:
        return torch.cat([outs["test_forgotten"]["loss"], outs["val_forgotten"]["loss"]])
    return outs["test"]["loss"]


def report(outs, mia=True):
    """The headline numbers of one model on one split."""
    m = {"UA": 100.0 - accuracy(outs["forget"]), "RA": accuracy(outs["retain"]),
         "TA": accuracy(outs["test"]), "VA": accuracy(outs["val"])}
    if "test_forgotten" in outs:
        m["TA_forgotten"] = accuracy(outs["test_forgotten"])
        m["VA_forgotten"] = accuracy(outs["val_forgotten"])
    if mia:
        # MIA-efficacy keeps SalUn's definition: its non-members are the whole test set,
        # the forgotten class included. The loss attack is scored against non-members of
        # the forget set's own distribution, so that it measures membership, not class shift.
        m["MIA"] = mia_efficacy(outs["retain"]["conf"], outs.get("test_all", outs["test"])["conf"],
                                outs["forget"]["conf"])
        m["loss_MIA_AUC"], m["loss_MIA_forget"] = loss_mia(
            outs["retain"]["loss"], outs["val"]["loss"], outs["forget"]["loss"], reference_losses(outs))
    return m


def split_table(outs):
    """Accuracy and mean loss per split, as base_test.py prints them."""
    return {name: {"n": len(outs[name]["y"]), "acc": accuracy(outs[name]), "loss": mean_loss(outs[name])}
            for name in SPLITS if name in outs}


GAP_KEYS = ("UA", "RA", "TA", "MIA")


def gap(m, gold):
    """|metric - gold standard's| for UA, RA, TA and MIA, and their mean (Avg. Gap)."""
    g = {f"{k}_gap": abs(m[k] - gold[k]) for k in GAP_KEYS}
    g["avg_gap"] = sum(g.values()) / len(GAP_KEYS)
    return g



# ---------------------------------------------------------------- what model selection may read

SELECTION_KEYS = ("UA", "RA", "VA", "val_MIA")
VAL_MIA_SEED = 123  # deepunlearn's random_state
VAL_MIA_MIN = 10  # samples a side, below which a 10% test fold may hold none of one side


def val_mia(loss_forget, loss_val, seed=VAL_MIA_SEED, splits=10):
    """deepunlearn's attack on validation data (`simple_mia`), in percent: as many forget as
    validation samples (the larger side cut at random to the smaller), a logistic regression
    on the per-sample loss, its accuracy at telling forget (1) from validation (0) averaged
    over `splits` stratified 90/10 shuffles. 50 is a model that cannot tell them apart. NaN
    below VAL_MIA_MIN samples a side, where a 10% test fold could hold no sample of one side."""
    n = min(len(loss_forget), len(loss_val))
    if n < VAL_MIA_MIN:
        return float("nan")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
    rng = np.random.default_rng(seed)
    forget = rng.permutation(loss_forget.double().numpy())[:n]
    val = rng.permutation(loss_val.double().numpy())[:n]
    x, y = np.r_[val, forget].reshape(-1, 1), np.r_[np.zeros(n), np.ones(n)]
    cv = StratifiedShuffleSplit(n_splits=splits, random_state=seed)
    return 100.0 * float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def selection_parts(split, retain_sample, seed=0):
    """What a tuning trial evaluates: the forget set, the validation set and `retain_sample`
    retain samples drawn once from `seed`; never a test sample."""
    parts = {"forget": split.forget, "retain": sample_indices(split.retain, retain_sample, seed), "val": split.val}
    if split.forget_class is not None:
        parts["val_forgotten"] = split.val_forgotten
    return parts


def selection_report(outs):
    """UA, RA (on the retain sample), VA and val_MIA: forget samples against validation samples
    of their own distribution (the forgotten class's, for class forgetting)."""
    nonmembers = outs.get("val_forgotten", outs["val"])
    return {"UA": 100.0 - accuracy(outs["forget"]), "RA": accuracy(outs["retain"]), "VA": accuracy(outs["val"]),
            "val_MIA": val_mia(outs["forget"]["loss"], nonmembers["loss"])}


def selection_objective(m, gold, weights):
    """The weighted mean of |metric - gold standard's| over SELECTION_KEYS (weights: {key: w})."""
    total = sum(weights.values())
    return sum(w * abs(m[k] - gold[k]) for k, w in weights.items() if w) / total
