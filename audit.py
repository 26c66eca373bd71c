"""Per-example privacy audit of unlearning: the NeurIPS 2023 challenge score and U-LiRA.

    python audit.py -L exp/audit_demo.json --models 32 -NL
    python audit.py -c checkpoints/resnet18_digits_base.pt -CF 3 -M rl -E 2 -LR 0.01 --models 16 -NL
    python audit.py --resume output/20261201-031500_audit_demo -NL
    python audit.py -L exp/audit_demo.json --models 32 -NL --executor ray

Population attacks (MIA-efficacy, loss-MIA) fit one classifier for all samples; these two
look at each forget sample across many models, as Hayes et al. (2024, "Inexact unlearning
needs more careful evaluations to avoid a false sense of privacy") do:

- reference models, trained with train.py's `fit` and the checkpoint's recipe: N gold
  standards on retain and K shadows on retain + a random half of F (each forget sample in
  K/2 of them). Each is a checkpoint under --models-dir named by a hash of what it was
  trained on (recipe, precision, validation set, training indices, seed), so another audit
  that needs the same model loads it instead of training it;
- the challenge's protocol: the audited checkpoint is the one original, unlearned N times by
  the audited method (seeds seed + j), with main.py's `unlearn`; each shadow is unlearned
  once (its half). A method that trains a new model (`retrain`) trains N of them with `fit`,
  train.py's recipe at the experiment's lr, epochs and batch size;
- the signal phi = log p_y - log(1 - p_y) of every forget sample in every model;
- the challenge score (Triantafillou et al., 2024, "Are we making progress in unlearning?
  Findings from the first NeurIPS unlearning competition") as the competition's scorer
  (google-deepmind/unlearning_evaluation, metric.py) computes it. Per forget sample: a side
  whose range of phi is under 1% of the other's has collapsed: epsilon 50. Otherwise the
  largest epsilon, max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR), of
  two rule families on a grid of 100 thresholds per unit of phi: "phi >= t" (the side with
  the larger median positive) and "l <= phi <= r" (the side with the smaller range positive,
  intervals about as wide as it, reaching 2 units past it), rules with FPR or FNR 0 alone
  left out, a perfect separation 50. 2^-b points for epsilon in bucket b of width 0.5 up to
  ceil(log(N - 1)), 0 past it; F = the mean; final score = F x RA ratio x TA ratio
  (unlearned over gold standards). F's chance ceiling (unlearned models distributed as the
  gold standards) depends on phi's scale under these rules, so each audit measures it;
- U-LiRA: per forget sample, Gaussians of phi over the shadows where it was in-and-unlearned
  and where it was out (K >= 4: at least 2 a side); the likelihood ratio scores the N
  unlearned models (members that were unlearned) against the N gold standards; AUC and
  balanced accuracy (50: indistinguishable), TPR at 1% and 0.1% FPR.

Two deviations, opt-in and not the challenge's: --attacks exhaustive scores every single
threshold in both directions, without grid, intervals or collapsed rule, a perfect
separation in a last bucket of its own (this toolkit's earlier rules); --originals N trains
N originals with the checkpoint's recipe and unlearns each once, which adds their training
noise to the unlearned side and costs N trainings. An audit keeps both choices on --resume.

Every audit also scores the originals before unlearning ("no unlearning"): the baseline a
method must beat (with the one original, N identical models: a collapsed side, 0 points).
Results go to output/<time>_<file>/: config.json, results.jsonl (one line per experiment,
written as it ends; --resume skips those), audit.json, audit.md, samples.csv (per forget
sample and experiment), epsilon.png and roc.png.

With --executor ray each reference model to train and each unlearning run is a task on a Ray
worker (ray_audit.py), with the local executor's numbers; this process alone reads and
writes --models-dir and the audit folder either way.
"""
import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
import main
import metrics
from datasets import ForgetSpec
from methods import METHODS
from models import load_model, load_model_checkpoint, model_from_config
from ray_executor import TaskFailed
from train import Recipe, fit
from utils import (Logger, UserError, add_precision_flag, announce_compute, atomic_write_text, check_writable, cli,
                   compute_for, default_precision, get_device, save_checkpoint, timestamp, unique_dir)

# The scorer's constants (google-deepmind/unlearning_evaluation, metric.py).
DELTA = 1e-5
EPSILON_CAP = 50  # a sample's epsilon when one side has collapsed, and the largest any sample gets
COLLAPSED = 0.01  # one side's range below this fraction of the other's: collapsed
GRID = 100  # thresholds per unit of phi
BUFFER = 2.0  # how far the interval rules' thresholds reach past the peaky side
BUCKET = 0.5
# Seeds of the reference models (initialisation and batch order), apart from every
# unlearning run's (experiment seed + j), so no two models of an audit share one.
GOLD_SEED, ORIGINAL_SEED, SHADOW_SEED, FRESH_SEED, FRESH_SHADOW_SEED = 10_000, 20_000, 30_000, 40_000, 50_000
MAX_MODELS = 1000


def build_parser():
    p = argparse.ArgumentParser(description="Per-example privacy audit of unlearning methods: the NeurIPS "
                                            "2023 unlearning-challenge score and U-LiRA.",
                                epilog=main.methods_help(), formatter_class=Formatter)
    p.add_argument("-L", "--load", default=None, help="JSON list of experiments to audit (main.py's format); "
                                                      "None: one experiment from the flags")
    p.add_argument("--models", type=int, default=32,
                   help="N: gold standards (trained on retain), and unlearned models per method")
    p.add_argument("--attacks", choices=tuple(ATTACKS), default="official",
                   help="official: the challenge's scorer (single thresholds and intervals on a grid of 100 per "
                        "unit of phi, epsilon 50 for a collapsed side, 0 points past the last bucket); "
                        "exhaustive, not the challenge's: every single threshold in both directions, no "
                        "intervals, a perfect separation scored in a last bucket of its own")
    p.add_argument("--originals", type=int, default=1,
                   help="1: the checkpoint itself is the original, unlearned N times with seeds seed + j (the "
                        "challenge's protocol); N (= --models), not the challenge's: N originals trained with "
                        "the checkpoint's recipe, each unlearned once, which adds their training noise to the "
                        "unlearned side and costs N trainings")
    p.add_argument("--shadows", type=int, default=16,
                   help="K >= 4: shadow models for U-LiRA, each trained on retain and a random half of the "
                        "forget set (every sample in K/2 of them)")
    p.add_argument("--per-sample-variance", action="store_true",
                   help="fit U-LiRA's variances per sample instead of one per side shared by all samples")
    p.add_argument("--models-dir", default="checkpoints/audit",
                   help="where reference models are kept and looked up, named by what they were trained on")
    main.add_experiment_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    add_precision_flag(p)
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR, help="where datasets are found")
    p.add_argument("--out", default="output", help="folder the script writes under: <out>/<time>_<file>/")
    p.add_argument("--name", default=None, help="run folder name; None: <time>_<experiment file>")
    p.add_argument("--resume", default=None, help="an interrupted audit folder: audit the experiments "
                                                  "missing from its results")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
    main.add_executor_flags(p, "each reference model to train and each unlearning run is a task on a Ray worker")
    return p


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in -h, and the methods epilog kept as written. The experiment flags are None
    unless given (the file's value stands) and say their own default."""

    def _get_help_string(self, action):
        if action.default is None and "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.changed = [a.option_strings[0] for a in p._actions
                    if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default]
    return args


# ---------------------------------------------------------------- the challenge's score (pure functions)

def rule_epsilons(n, delta=DELTA):
    """Epsilon of a rule that flags tp of n positive and fp of n negative models, as a
    (n + 1, n + 1) table indexed [tp, fp], by the scorer's definition and in its float32:
    max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR), at least 0;
    infinity for a perfect separation (FPR = FNR = 0); -infinity (never the largest) for a
    rule the scorer drops: FPR = 0 or FNR = 0 alone, which N models cannot estimate, or
    both terms undefined."""
    tp, fp = np.ogrid[:n + 1, :n + 1]
    fpr, fnr = fp.astype(np.float32) / np.float32(n), (n - tp).astype(np.float32) / np.float32(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.fmax(np.log(np.float32(1 - delta) - fpr) - np.log(fnr),
                      np.log(np.float32(1 - delta) - fnr) - np.log(fpr)).clip(0, None)
    eps = np.where((fpr * fnr == 0) | np.isnan(eps), -np.inf, eps)
    return np.where((fp == 0) & (tp == n), np.inf, eps)


def torch_linspace(start, stop, num):
    """torch.linspace's points (each half counted from its own end), which the scorer's
    single thresholds are: np.linspace's can differ in the last bit."""
    i, step = np.arange(num), (stop - start) / max(num - 1, 1)
    return np.where((i < num // 2) | (num == 1), start + step * i, stop - step * (num - 1 - i))


def single_threshold_counts(pos, neg):
    """(tp, fp) of every rule 'positive when phi >= t', t on the scorer's grid: GRID points per
    unit of phi from the smallest value to the largest. pos, neg: sorted 1-D arrays."""
    lo, hi = min(pos[0], neg[0]), max(pos[-1], neg[-1])
    t = torch_linspace(lo, hi, int(math.ceil((hi - lo) * GRID)))
    return len(pos) - np.searchsorted(pos, t), len(neg) - np.searchsorted(neg, t)


def interval_counts(peaky, other):
    """(tp, fp) of every rule 'positive when l <= phi <= r' of the scorer's double-threshold
    family, the peaky side (smaller range, width w) positive: right thresholds r from
    min + w - BUFFER to max + BUFFER of the peaky side, and for each r, left ones l from
    r - w - BUFFER to r - w + BUFFER, GRID per unit (about 400 x 400 rules). Exact without
    an N x rules array: per row of left thresholds only the 2N + 1 gaps between the sorted
    values matter, so the rows are searched for the values and each gap that holds a left
    threshold gives one rule's counts. peaky, other: sorted 1-D arrays."""
    width = peaky[-1] - peaky[0]
    lo, hi = peaky[0] + width - BUFFER, peaky[-1] + BUFFER
    right = np.linspace(lo, hi, int(np.ceil((hi - lo) * GRID)))
    left = np.linspace(right - width - BUFFER, right - width + BUFFER, int(np.ceil(2 * BUFFER * GRID)), axis=1)
    values = np.r_[peaky, other]
    order = np.argsort(values, kind="stable")
    values, is_peaky = values[order], order < len(peaky)
    below_p, below_o = np.r_[0, np.cumsum(is_peaky)], np.r_[0, np.cumsum(~is_peaky)]  # counts below each gap
    upto = np.searchsorted(values, right, side="right")  # values <= r
    # first left threshold above each value, per row: gap g (g values below l) holds thresholds
    # [first[g - 1], first[g]) of its row
    first = torch.searchsorted(torch.from_numpy(np.ascontiguousarray(left)),
                               torch.from_numpy(np.tile(values, (len(right), 1))), right=True).numpy()
    ends = np.c_[np.zeros(len(right), int), first, np.full(len(right), left.shape[1])]
    row, gap = np.nonzero(ends[:, 1:] > ends[:, :-1])
    return (np.maximum(below_p[upto[row]] - below_p[gap], 0),  # l > r: an empty interval
            np.maximum(below_o[upto[row]] - below_o[gap], 0))


def official_epsilon(unlearned, retrained, table):
    """One forget sample's epsilon under the scorer's rules, from its N unlearned and N
    retrained values of phi and rule_epsilons(N). The side with the larger median is the
    single thresholds' positive (the unlearned one on a tie), the side with the smaller range
    the intervals' (the other one on a tie). A side whose range is below COLLAPSED of the
    other's has collapsed, which no grid of thresholds may resolve: EPSILON_CAP, as the scorer
    rules. Both ranges 0, where the scorer stops on an error: 0 for one constant on both
    sides (one distribution), EPSILON_CAP for two (a perfect separation)."""
    pos, neg = (retrained, unlearned) if np.median(retrained) > np.median(unlearned) else (unlearned, retrained)
    pos, neg = np.sort(pos), np.sort(neg)
    pos_range, neg_range = pos[-1] - pos[0], neg[-1] - neg[0]
    smallest, largest = min(pos_range, neg_range), max(pos_range, neg_range)
    if largest == 0:
        return 0.0 if pos[0] == neg[0] else float(EPSILON_CAP)
    if smallest / largest < COLLAPSED:
        return float(EPSILON_CAP)
    peaky, other = (neg, pos) if pos_range >= neg_range else (pos, neg)
    best = max(table[single_threshold_counts(pos, neg)].max(), table[interval_counts(peaky, other)].max())
    return float(np.clip(best, 0, EPSILON_CAP))


def n_buckets(n_models):
    """The scorer's buckets of width 0.5 up to its largest epsilon, ceil(log(N - 1)):
    8 for N = 32, 14 for 512, none for N = 2."""
    return int(math.ceil(math.log(n_models - 1)) / BUCKET)


def official_points(eps, n_models):
    """2^-b for an epsilon in bucket b = floor(epsilon / 0.5); 0 past the last bucket, which a
    perfect separation and a collapsed distribution (epsilon 50) always are."""
    b = np.floor(np.asarray(eps, float) / BUCKET)
    return np.where(b < n_buckets(n_models), 2.0 ** -b, 0.0)


def challenge(phi_unlearned, phi_retrained):
    """The NeurIPS 2023 challenge's forget-quality score as its scorer computes it:
    (per-sample epsilons, per-sample points, F) from (N, |F|) arrays of phi."""
    u, r = np.asarray(phi_unlearned, float), np.asarray(phi_retrained, float)
    table = rule_epsilons(u.shape[0])
    eps = np.array([official_epsilon(u[:, i], r[:, i], table) for i in range(u.shape[1])])
    points = official_points(eps, u.shape[0])
    return eps, points, float(points.mean())


# ---------------------------------------------------------------- --attacks exhaustive (not the challenge's)

def exhaustive_epsilon(unlearned, retrained, delta=DELTA):
    """The largest epsilon over every single-threshold rule on phi, both directions, between
    `unlearned` and `retrained` values (1-D arrays): no grid, no interval rules, no collapsed
    rule, and a perfect separation is infinity. Per rule, the challenge's
    max(log(1 - delta - FPR) - log FNR, log(1 - delta - FNR) - log FPR); a rule with FPR = 0
    or FNR = 0 alone is left out. 0 when no rule counts."""
    pos, neg = np.asarray(unlearned, float), np.asarray(retrained, float)
    t = np.unique(np.r_[pos, neg])[:, None]
    fpr = (neg[None] >= t).mean(1)  # rule "unlearned when phi >= t"
    fnr = (pos[None] < t).mean(1)
    fpr, fnr = np.r_[fpr, 1 - fpr], np.r_[fnr, 1 - fnr]  # and its reverse, "unlearned when phi < t"
    if np.any((fpr == 0) & (fnr == 0)):
        return math.inf
    ok = (fpr > 0) & (fnr > 0)
    if not ok.any():
        return 0.0
    fpr, fnr = fpr[ok], fnr[ok]
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = np.fmax(np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr))
    return float(max(np.nanmax(eps), 0.0)) if not np.all(np.isnan(eps)) else 0.0


def exhaustive_buckets(n_models, delta=DELTA):
    """Buckets that N models per side resolve: every finite epsilon (at most
    log(N - 1 - N delta), from FPR = 1/N) has its own bucket of width 0.5, and a perfect
    separation (epsilon = inf) the next one. 8 buckets for N = 32, 10 for 64, 14 for 512."""
    return int(max(math.log(n_models - 1 - n_models * delta), 0.0) // BUCKET) + 2


def exhaustive_points(eps, n_models):
    """2^-b for an epsilon in bucket b = floor(epsilon / 0.5), capped at the last bucket:
    1 point for epsilon < 0.5, 1/2 below 1, ..., 2^-(B-1) for a perfect separation."""
    last = exhaustive_buckets(n_models) - 1
    b = last if math.isinf(eps) else min(int(max(eps, 0.0) // BUCKET), last)
    return 2.0 ** -b


def exhaustive_challenge(phi_unlearned, phi_retrained):
    """(per-sample epsilons, per-sample points, F) under the exhaustive rules."""
    n = phi_unlearned.shape[0]
    eps = np.array([exhaustive_epsilon(phi_unlearned[:, i], phi_retrained[:, i])
                    for i in range(phi_unlearned.shape[1])])
    points = np.array([exhaustive_points(e, n) for e in eps])
    return eps, points, float(points.mean())


ATTACKS = {"official": (challenge, n_buckets), "exhaustive": (exhaustive_challenge, exhaustive_buckets)}


def chance_f(phi_retrained, attacks="official", seed=0):
    """F when unlearned and retrained models are identically distributed: the ceiling that
    retraining itself reaches with N models per side. Not 1: the best of many rules, chosen
    on the very models they are scored on, finds some epsilon by chance. The official rules
    see phi's scale (a grid of GRID thresholds per unit, intervals reaching BUFFER beyond),
    so the ceiling is measured on this audit's: two (N, |F|) draws from normals with the
    gold standards' per-sample mean and standard deviation, scored with the rules in use."""
    mean, std = phi_retrained.mean(0), phi_retrained.std(0, ddof=1)
    gen = np.random.default_rng(seed)
    unlearned, retrained = (mean + std * gen.standard_normal(phi_retrained.shape) for _ in range(2))
    return ATTACKS[attacks][0](unlearned, retrained)[2]


# ---------------------------------------------------------------- U-LiRA (pure functions)

def gaussians(phi, is_in, per_sample):
    """Per-sample means and standard deviations of phi over the shadows where each sample
    was in (is_in) and out, from (K, |F|) arrays. Shared: one standard deviation per side
    over all samples (the residuals pooled), steadier with few shadows; a per-sample one
    where a side has fewer than 2 shadows falls back to it."""
    out = {}
    for side, mask in (("in", is_in), ("out", ~is_in)):
        count = mask.sum(0)
        mean = np.where(mask, phi, 0).sum(0) / np.maximum(count, 1)
        resid = np.where(mask, phi - mean, 0.0)
        shared = math.sqrt((resid ** 2).sum() / max(mask.sum() - mask.shape[1], 1))
        std = np.full(phi.shape[1], shared)
        if per_sample:
            own = np.sqrt((resid ** 2).sum(0) / np.maximum(count - 1, 1))
            std = np.where(count >= 2, own, shared)
        out[side] = (mean, np.maximum(std, 1e-6))
    return out


def log_likelihood_ratio(phi, fitted):
    """log N(phi; in) - log N(phi; out) per target model and sample, from (M, |F|) phi."""
    def logpdf(x, mean, std):
        return -0.5 * ((x - mean) / std) ** 2 - np.log(std)
    return logpdf(phi, *fitted["in"]) - logpdf(phi, *fitted["out"])


def ulira(shadow_phi, shadow_in, phi_unlearned, phi_retrained, per_sample=False):
    """U-LiRA's scores of the unlearned (positives) and retrained (negatives) targets, and
    the attack's AUC, balanced accuracy and TPR at 1% and 0.1% FPR, in percent."""
    fitted = gaussians(shadow_phi, shadow_in, per_sample)
    pos, neg = log_likelihood_ratio(phi_unlearned, fitted), log_likelihood_ratio(phi_retrained, fitted)
    fpr, tpr = roc(pos.ravel(), neg.ravel())
    return pos, neg, {"AUC": 100 * metrics.auc(pos.ravel(), neg.ravel()),
                      "balanced_accuracy": balanced_accuracy(fpr, tpr),
                      "TPR@1%FPR": 100 * tpr_at(fpr, tpr, 0.01), "TPR@0.1%FPR": 100 * tpr_at(fpr, tpr, 0.001),
                      "roc": (fpr, tpr)}


def roc(pos, neg):
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    return fpr, tpr


def balanced_accuracy(fpr, tpr):
    """The attack's accuracy at its best threshold with positives and negatives weighted
    equally, max (TPR + 1 - FPR) / 2, in percent: 50 is chance. An ROC curve's dropped
    (collinear) points never hold the maximum of a linear function, so roc() is enough."""
    return float(100 * np.max((tpr + 1 - fpr) / 2))


def tpr_at(fpr, tpr, at):
    """The highest TPR of a threshold whose FPR is at most `at`."""
    return float(tpr[fpr <= at].max())


def shadow_halves(n_forget, n_shadows, seed):
    """(K, |F|) bool: each forget sample in exactly K/2 shadows (rounded down), drawn from
    `seed`, so every sample has as many in- as out-models (Carlini et al.'s LiRA design)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(n_shadows, n_forget, generator=gen).argsort(0)
    return (order < n_shadows // 2).numpy()


# ---------------------------------------------------------------- reference models

def recipe_of(cfg):
    return Recipe(cfg["model"], cfg["lr"], cfg["epochs"], cfg["batch_size"], cfg.get("pretrained", False))


def model_key(recipe, compute, val_idx, train_idx, seed):
    """What a model was trained on and how, as a hash: its file name under --models-dir."""
    what = {**asdict(recipe), "precision": compute.precision, "seed": seed,
            "val": hashlib.sha256(np.asarray(val_idx, np.int64).tobytes()).hexdigest(),
            "train": hashlib.sha256(train_idx.cpu().numpy().astype(np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16], what


def train_reference(ds, compute, recipe, train_idx, val_idx, seed, label):
    """A reference model trained with train.py's `fit`, and what its checkpoint records of the
    training: the same whether it trained here or on a Ray worker."""
    start = time.perf_counter()
    model, stem, result = fit(ds, train_idx, val_idx, recipe, seed, compute, name=label, verbose=False)
    return model, {"stem": stem, "metrics": {k: v for k, v in result.items() if k != "history"},
                   "seconds": time.perf_counter() - start, "compute": compute.describe()}


class Pool:
    """Trained models, looked up by what they were trained on, trained and saved when missing."""

    def __init__(self, folder, ds, compute, base_config):
        self.folder, self.ds, self.compute, self.base = Path(folder), ds, compute, base_config
        self.seconds = []  # of each model trained for it

    def path(self, recipe, train_idx, seed):
        """(the model's file, what it was trained on)."""
        key, what = model_key(recipe, self.compute, self.base["val_idx"], train_idx, seed)
        return self.folder / f"{recipe.model}_{self.base['dataset']}_{key}.pt", what

    def load(self, recipe, train_idx, seed):
        """The model from the folder, or None when it has not been trained."""
        path, what = self.path(recipe, train_idx, seed)
        if path.is_file():
            ckpt = load_model_checkpoint(path)
            if ckpt["config"].get("trained_on") == what:
                return self.model(ckpt["state_dict"])
        return None

    def model(self, state_dict):
        model = model_from_config(self.base, self.ds.device)
        model.load_state_dict(state_dict)
        return model

    def save(self, recipe, train_idx, seed, label, state_dict, trained):
        """A model that `train_reference` trained, into the folder."""
        path, what = self.path(recipe, train_idx, seed)
        self.seconds.append(trained["seconds"])
        left_out = ~datasets.as_flags(self.base["val_idx"], self.base["n_train"])
        left_out[train_idx.cpu()] = False
        config = dict(self.base, **asdict(recipe), seed=seed, stem=trained["stem"], method="audit reference",
                      trained_on=what, metrics=trained["metrics"], audit_label=label,
                      forget=ForgetSpec().to_config(), forget_idx=torch.nonzero(left_out).flatten().tolist(),
                      **trained["compute"])
        save_checkpoint(path, state_dict, config)

    def get(self, recipe, train_idx, val_idx, seed, label):
        model = self.load(recipe, train_idx, seed)
        if model is None:
            model, trained = train_reference(self.ds, self.compute, recipe, train_idx, val_idx, seed, label)
            self.save(recipe, train_idx, seed, label, model.state_dict(), trained)
        return model


def shadow_split(ds, split, is_in):
    """The split a shadow model is unlearned on: its in-half is the forget set, and its
    out-half is held out beside the validation set, so no method (rl and ga pass over
    `train`) ever sees a sample the shadow never trained on."""
    forget = split.forget.cpu()
    held_out = torch.cat([torch.nonzero(split.in_val.cpu()).flatten(), forget[~torch.as_tensor(is_in)]])
    return datasets.make_split(ds, ForgetSpec(), val_idx=held_out.sort().values, forget_idx=forget[is_in])


# ---------------------------------------------------------------- one audit

class Scope:
    """What every model of an audit is measured on (the audit's split of a dataset) and how
    it is unlearned: the same here and on a Ray worker."""

    def __init__(self, ds, split, cfg, compute):
        self.ds, self.split, self.cfg, self.compute = ds, split, cfg, compute

    def phi(self, model):
        return metrics.predict(model, self.ds, self.split.forget, self.compute)["phi"].numpy()

    def evaluate(self, model):
        """RA, TA, UA and MIA-efficacy on the audit's split."""
        return metrics.report(metrics.evaluate(model, self.ds, self.split, self.compute))

    def unlearned(self, e, base, split, run_seed, fresh_seed, with_metrics):
        """`base` unlearned by experiment e on `split`: (phi on the audit's forget set, its
        metrics on the audit's split when asked), or None when the run diverged."""
        if METHODS[e.method].fresh_model:
            recipe = Recipe(self.cfg["model"], e.lr, e.epochs, e.batch_size, self.cfg.get("pretrained", False))
            model = fit(self.ds, split.retain, self.split.val, recipe, fresh_seed, self.compute, verbose=False)[0]
            return self.phi(model), self.evaluate(model) if with_metrics else None
        ctx = main.Context(self.ds, split, self.cfg, base, None, None, self.compute, main.timed_gradients)
        model, _, result = main.unlearn(e, ctx, run_seed, Logger(False, "", "", {}))
        if result["diverged_at"] is not None:
            return None
        return self.phi(model), result["metrics"]  # main.unlearn's metrics are on `split`: the audit's for targets


@dataclass
class Reference:
    """A reference model of an audit: trained with the checkpoint's recipe on `train_idx` from `seed`."""
    group: str  # for the progress bar: gold standards, originals or shadows
    label: str  # "gold 3": kept in its checkpoint's config
    train_idx: torch.Tensor
    seed: int


@dataclass
class Unlearning:
    """One unlearning run of an audited experiment: its j-th of an original, or of shadow j."""
    kind: str  # original or shadow
    j: int
    base: int  # which original or shadow it unlearns
    run_seed: int
    fresh_seed: int  # what a method that trains a new model (retrain) trains it from

    @property
    def label(self):
        return f"{self.kind} {self.j}"

    @property
    def with_metrics(self):  # only the originals' unlearned models are scored on UA, RA, TA and MIA
        return self.kind == "original"


class Local:
    """The audit's models trained and unlearned one after another in this process."""

    def references(self, pool, recipe, val, references, bar):
        """The models of `references`, from the pool or trained into it."""
        models = []
        for r in references:
            bar.set_description(f"reference models: {r.group}")
            models.append(pool.get(recipe, r.train_idx, val, r.seed, r.label))
            bar.update()
        return models

    def unlearned(self, audit, e, name, runs, bar):
        """Scope.unlearned's answer for each of `runs`."""
        outs = []
        for r in runs:
            bar.set_description(f"{name}: unlearning {r.kind}s")
            outs.append(audit.scope.unlearned(e, audit.base(r), audit.split_of(r), r.run_seed, r.fresh_seed,
                                              r.with_metrics))
            bar.update()
        return outs

    def close(self):
        pass


def trained_originals(config):
    """How many originals an audit trains: none when the checkpoint itself is the original."""
    return config["originals"] if config["originals"] > 1 else 0


class Audit:
    """The reference models of one checkpoint and forget set, their signals, and the audits on them."""

    def __init__(self, e, cfg, ds, compute, config, executor, bar):
        self.n, self.attacks, self.per_sample = config["models"], config["attacks"], config["per_sample_variance"]
        self.executor, self.bar = executor, bar
        split = datasets.make_split(ds, e.spec, seed=e.seed, val_idx=cfg["val_idx"])
        self.scope, self.forget = Scope(ds, split, cfg, compute), split.forget
        self.pool = Pool(config["models_dir"], ds, compute, cfg)
        self.halves = shadow_halves(len(self.forget), config["shadows"], SHADOW_SEED + e.seed)
        self.shadow_splits = [shadow_split(ds, split, half) for half in self.halves]
        n, m = self.n, trained_originals(config)
        references = ([Reference("gold standards", f"gold {j}", split.retain, GOLD_SEED + j) for j in range(n)] +
                      [Reference("originals", f"original {j}", split.train, ORIGINAL_SEED + j) for j in range(m)] +
                      [Reference("shadows", f"shadow {i}", torch.cat([split.retain, self.forget[half]]).sort().values,
                                 SHADOW_SEED + i) for i, half in enumerate(self.halves)])
        models = executor.references(self.pool, recipe_of(cfg), split.val, references, bar)
        self.golds, self.originals, self.shadows = models[:n], models[n:n + m], models[n + m:]
        if not self.originals:  # the challenge's protocol: the audited checkpoint is the one original
            self.originals = [load_model(e.checkpoint, ds.device)[0].eval()]
        self.gold_signals = [(self.scope.phi(g), self.scope.evaluate(g)) for g in self.golds]
        self.f_identical = chance_f(np.stack([g[0] for g in self.gold_signals]), self.attacks)

    def base(self, run):
        return (self.originals if run.kind == "original" else self.shadows)[run.base]

    def split_of(self, run):
        """An original forgets the audit's forget set; a shadow its in-half of it."""
        return self.scope.split if run.kind == "original" else self.shadow_splits[run.base]

    def run(self, e, name):
        """Audit experiment e: its unlearned models (N of the originals, one of each shadow), then both scores."""
        start = time.perf_counter()
        n = self.n
        runs = ([Unlearning("original", j, j % len(self.originals), e.seed + j, FRESH_SEED + e.seed + j)
                 for j in range(n)] +  # the one original N times, or each of N originals once
                [Unlearning("shadow", i, i, e.seed + MAX_MODELS + i, FRESH_SHADOW_SEED + e.seed + i)
                 for i in range(len(self.shadows))])
        outs = self.executor.unlearned(self, e, name, runs, self.bar)
        if any(out is None for out in outs):
            return {"diverged": True, "seconds": time.perf_counter() - start}
        targets, shadows = outs[:n], outs[n:]
        return dict(self.score([t[0] for t in targets], [s[0] for s in shadows], [t[1] for t in targets]),
                    seconds=time.perf_counter() - start)

    def baseline(self):
        """The originals and shadows as trained: what no unlearning scores. One original
        stands for N identical models, which the challenge's rules call collapsed."""
        start = time.perf_counter()
        targets = [(self.scope.phi(m), self.scope.evaluate(m)) for m in self.originals]
        targets *= self.n // len(targets)
        shadows = [self.scope.phi(m) for m in self.shadows]
        return dict(self.score([t[0] for t in targets], shadows, [t[1] for t in targets]),
                    seconds=time.perf_counter() - start)

    def score(self, phi_targets, phi_shadows, target_metrics):
        phi_u, phi_r = np.stack(phi_targets), np.stack([g[0] for g in self.gold_signals])
        eps, points, f = ATTACKS[self.attacks][0](phi_u, phi_r)
        pos, neg, lira = ulira(np.stack(phi_shadows), self.halves, phi_u, phi_r, self.per_sample)
        keys = ("UA", "RA", "TA", "MIA")
        mean = {k: float(np.mean([m[k] for m in target_metrics])) for k in keys}
        gold = {k: float(np.mean([g[1][k] for g in self.gold_signals])) for k in keys}
        fpr, tpr = lira.pop("roc")
        return {"F": f, "F_identical": self.f_identical,
                "score": f * mean["RA"] / gold["RA"] * mean["TA"] / gold["TA"], **lira,
                **mean, **{f"{k}_retrained": v for k, v in gold.items()},
                "samples": {"index": self.forget.tolist(), "epsilon": eps.tolist(), "points": points.tolist(),
                            "phi_unlearned": phi_u.mean(0).tolist(), "phi_retrained": phi_r.mean(0).tolist(),
                            "lira_unlearned": pos.mean(0).tolist(), "lira_retrained": neg.mean(0).tolist()},
                "roc": thin_roc(fpr, tpr)}


def thin_roc(fpr, tpr, n=400):
    """The ROC at about n points spaced evenly on a log FPR axis (the plot's), plus its ends."""
    keep = np.unique(np.r_[0, np.searchsorted(fpr, np.geomspace(1e-5, 1, n)).clip(0, len(fpr) - 1), len(fpr) - 1])
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}


# ---------------------------------------------------------------- planning, outputs, main

def pool_key(e):
    return (e.checkpoint, repr(e.spec), e.seed)


def check_counts(n, k, originals):
    if not 3 <= n <= MAX_MODELS:
        raise UserError(f"--models must be between 3 and {MAX_MODELS} (the challenge's buckets reach "
                        f"ceil(log(N - 1)), none at N = 2; it used 512), got {n}")
    if not 4 <= k <= MAX_MODELS:
        raise UserError(f"--shadows must be between 4 and {MAX_MODELS} (U-LiRA fits a variance to the shadows "
                        f"with and to those without each sample: at least 2 of each), got {k}")
    if originals not in (1, n):
        raise UserError(f"--originals must be 1 (the checkpoint itself, the challenge's protocol) or --models "
                        f"({n}), got {originals}")


# What --resume may change: where the models compute and whether it logs, not what is audited.
RESUME_MAY_CHANGE = ("--resume", "--device", "-NL", *main.EXECUTOR_FLAGS)


def plan(args):
    """(experiments, config, run folder): everything checked before any training."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise UserError(f"audit folder {run_dir} not found" if not run_dir.is_dir()
                            else f"{run_dir} is not an audit folder (no config.json)")
        fixed = [f for f in args.changed if f not in RESUME_MAY_CHANGE]
        if fixed:
            raise UserError(f"--resume continues {run_dir} as it was configured; {', '.join(fixed)} would change "
                            f"it (only --device, -NL and the executor flags may be given)")
        config = json.loads((run_dir / "config.json").read_text())
        config.setdefault("attacks", "exhaustive")  # an audit from before the challenge's rules and protocol
        config.setdefault("originals", config["models"])
        check_writable(run_dir, "audit folder")
        experiments = main.resolve(config["experiments"], run_dir / "config.json", config["data_dir"])
        return experiments, config, run_dir
    check_counts(args.models, args.shadows, args.originals)
    given = main.overrides(args)
    if args.load:
        entries = main.load_list(args.load)
        if isinstance(entries, list):
            entries = [main.with_overrides(x, given) if isinstance(x, dict) else x for x in entries]
        where = args.load
    else:
        entries, where = [given], "command line"
    experiments = main.resolve(entries, where, args.data_dir)
    problems = [p for i, e in enumerate(experiments) if e.spec.is_empty
                for p in [f"{where}: experiment {i}: forget spec: an audit needs a forget set"]]
    if problems:
        raise UserError("\n".join(problems))
    check_writable(args.out, "--out")
    check_writable(args.models_dir, "--models-dir")
    label = Path(args.load).stem if args.load else "audit"
    run_dir = unique_dir(args.out, args.name or f"{timestamp()}_{label}")
    config = {"experiments": [asdict(e) for e in experiments], "names": main.experiment_names(experiments),
              "models": args.models, "originals": args.originals, "shadows": args.shadows,
              "attacks": args.attacks, "per_sample_variance": args.per_sample_variance,
              "models_dir": args.models_dir, "data_dir": args.data_dir,
              "precision": args.precision or default_precision(), "run_id": uuid.uuid4().hex, "command": sys.argv}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    return experiments, config, run_dir


def read_rows(path, run_id):
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("run_id") == run_id]


COLUMNS = (("experiment", "experiment"), ("F", "F"), ("score", "final score"), ("AUC", "U-LiRA AUC"),
           ("balanced_accuracy", "U-LiRA balanced accuracy"), ("TPR@1%FPR", "TPR@1%FPR"),
           ("TPR@0.1%FPR", "TPR@0.1%FPR"), ("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA", "MIA-efficacy"),
           ("seconds", "seconds"))


def table(rows):
    md = ["| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["experiment"]] + [("diverged" if r.get("diverged") else
                                      f"{r[k]:.3f}" if k in ("F", "score") else f"{r[k]:.1f}") if k in r else ""
                                     for k, _ in COLUMNS[1:]]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md)


def write_outputs(run_dir, config, rows, reference):
    done = [r for r in rows if not r.get("diverged")]
    summary = [{k: v for k, v in r.items() if k not in ("samples", "roc", "run_id")} for r in rows]
    n, attacks = config["models"], config["attacks"]
    buckets = ATTACKS[attacks][1](n)
    ceilings = sorted({r["F_identical"] for r in done if "F_identical" in r})  # one per checkpoint and forget set
    head = {"models": n, "originals": config["originals"], "shadows": config["shadows"], "attacks": attacks,
            "per_sample_variance": config["per_sample_variance"], "buckets": buckets,
            "F_identical": ceilings[0] if len(ceilings) == 1 else None, **reference}
    atomic_write_text(run_dir / "audit.json", json.dumps({**head, "experiments": summary}, indent=2))
    lines = [f"Per-example audit, {attacks} rules: N = {n} gold standards and N unlearned models per "
             f"experiment ({protocol(config)}), K = {config['shadows']} shadows. A forget sample scores 2^-b "
             f"for an epsilon in bucket b of width {BUCKET} ({buckets} buckets at N = {n}; "
             + ("0 points past the last" if attacks == "official" else "the last one a perfect separation")
             + f"); F is their mean. Models distributed as the gold standards score F = "
             f"{' or '.join(f'{c:.3f}' for c in ceilings) or 'n/a'} here (chance finds some epsilon; from the "
             f"gold standards' phi). U-LiRA AUC and balanced accuracy 50: unlearned models indistinguishable "
             f"from retrained ones.", "",
             table(rows)]
    atomic_write_text(run_dir / "audit.md", "\n".join(lines) + "\n")
    csv = ["experiment,index,epsilon,points,phi_unlearned,phi_retrained,lira_unlearned,lira_retrained"]
    for r in done:
        s = r["samples"]
        csv += [f"{r['experiment']},{i},{e},{p},{a:.4f},{b:.4f},{c:.4f},{d:.4f}" for i, e, p, a, b, c, d in
                zip(s["index"], s["epsilon"], s["points"], s["phi_unlearned"], s["phi_retrained"],
                    s["lira_unlearned"], s["lira_retrained"])]
    atomic_write_text(run_dir / "samples.csv", "\n".join(csv) + "\n")
    if done:
        plot_epsilons(run_dir / "epsilon.png", done, n, attacks)
        plot_rocs(run_dir / "roc.png", done)
    return "\n".join(lines)


def protocol(config):
    if config["originals"] == 1:
        return "the checkpoint unlearned N times"
    return "N originals trained with the checkpoint's recipe, each unlearned once"


def plot_epsilons(path, rows, n, attacks):
    """A bar per bucket; the official rules' last bar holds what scores 0 (epsilon past the
    last bucket, up to 50), the exhaustive rules' the perfect separations (infinity)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    buckets = ATTACKS[attacks][1](n)
    bars = buckets + 1 if attacks == "official" else buckets
    edges = np.arange(bars + 1) * BUCKET
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 1.3 * len(rows) + 0.8), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        eps = np.minimum(np.array(r["samples"]["epsilon"], float), (bars - 0.5) * BUCKET)
        ax.hist(eps, bins=edges, color="tab:blue")
        ax.set_ylabel("samples", fontsize=8)
        ax.set_title(f"{r['experiment']}: F = {r['F']:.3f}", fontsize=9, loc="left")
    ticks = [f"{e:g}" for e in edges[:-1]]
    ticks[-1] = f">={buckets * BUCKET:g}" if attacks == "official" else "inf"
    axes[-1, 0].set_xticks(edges[:-1] + BUCKET / 2, ticks, fontsize=8)
    axes[-1, 0].set_xlabel("per-sample epsilon (bucket start; " +
                           ("the last bar scores 0" if attacks == "official" else
                            f"'inf': perfect separation by N = {n} models") + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rocs(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for r in rows:
        fpr, tpr = np.array(r["roc"]["fpr"]), np.array(r["roc"]["tpr"])
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=f"{r['experiment']} (AUC {r['AUC']:.1f})")
    ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false positive rate",
           ylabel="true positive rate", title="U-LiRA: unlearned (positive) vs retrained (negative)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_audits(experiments, config, run_dir, args, device):
    """Audit every experiment not yet in results.jsonl; rows in file order, each group of
    experiments on one checkpoint and forget set after its no-unlearning row."""
    compute = compute_for(device, config["precision"])
    announce_compute(compute, config["precision"])
    results_path = run_dir / "results.jsonl"
    rows = {r["index"]: r for r in read_rows(results_path, config["run_id"])}
    names, n, k, m = config["names"], config["models"], config["shadows"], trained_originals(config)
    print(f"audit folder: {run_dir} ({len(experiments)} experiments, {len(rows)} already done)")
    groups = {}
    for i, e in enumerate(experiments):
        groups.setdefault(pool_key(e), []).append(i)
    logger = Logger(not args.no_log, "salun-deepdive", run_dir.name, config)
    if args.executor == "ray":
        import ray_audit  # Ray is imported only when asked for
        executor = ray_audit.Executor(args, config["data_dir"], config["precision"], compute, n + m + k)
    else:
        executor = Local()
    ordered, seconds, loaded = [], [], {}
    with contextlib.closing(executor):
        for members in groups.values():
            e0 = experiments[members[0]]
            cfg = load_model_checkpoint(e0.checkpoint)["config"]
            if cfg["dataset"] not in loaded:
                loaded[cfg["dataset"]] = datasets.load_dataset(cfg["dataset"], config["data_dir"], device)
            todo = [i for i in members if i not in rows]
            with tqdm(total=n + m + k + len(todo) * (n + k), unit="model") as bar:
                audit = Audit(e0, cfg, loaded[cfg["dataset"]], compute, config, executor, bar)
                seconds += audit.pool.seconds
                ordered.append(dict(audit.baseline(), experiment=f"no unlearning ({e0.spec.describe()})"))
                for i in todo:
                    row = dict(audit.run(experiments[i], names[i]), experiment=names[i], index=i,
                               run_id=config["run_id"])
                    with open(results_path, "a") as f:  # one line per experiment, flushed as it ends
                        f.write(json.dumps(row) + "\n")
                    rows[i] = row
                    if not row.get("diverged"):
                        logger.log({f"{names[i]}/{m}": row[m] for m in ("F", "score", "AUC", "TPR@1%FPR")})
            ordered += [rows[i] for i in members]
    logger.finish()
    reference = {"reference_models_trained": len(seconds),
                 "seconds_per_reference_model": float(np.mean(seconds)) if seconds else None}
    return ordered, reference


def main_(argv=None):
    args = parse_args(argv)
    start = time.time()
    device = get_device(args.device)
    main.check_executor(args, device)
    experiments, config, run_dir = plan(args)
    kept = (f"finished experiments are in {run_dir / 'results.jsonl'}, reference models in "
            f"{config['models_dir']}; continue with: python audit.py --resume {run_dir}")
    try:
        rows, reference = run_audits(experiments, config, run_dir, args, device)
    except KeyboardInterrupt:
        print(kept, file=sys.stderr)
        raise
    except TaskFailed as err:  # an audit cannot be scored without every model
        print(f"error: {err}; {kept}", file=sys.stderr)
        sys.exit(1)
    text = write_outputs(run_dir, config, rows, reference)
    print(text)
    trained = reference["reference_models_trained"]
    each = f", {reference['seconds_per_reference_model']:.1f} s each" if trained else ""
    print(f"{trained} reference models trained{each}; {time.time() - start:.0f} s in all; results: {run_dir}")


if __name__ == "__main__":
    cli(main_)
