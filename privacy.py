"""Per-example privacy scores of unlearning: the NeurIPS 2023 challenge score and U-LiRA (pure functions).

    eps, points, f = privacy.challenge(phi_unlearned, phi_retrained)      # (N, |F|) arrays of phi
    pos, neg, lira = privacy.ulira(phi_shadows, shadow_in, phi_unlearned, phi_retrained)

Population attacks (MIA-efficacy, loss-MIA, metrics.py) fit one classifier for all samples;
these look at each forget sample across many models, as Hayes et al. (2024, "Inexact
unlearning needs more careful evaluations to avoid a false sense of privacy") do, from the
signal phi = log p_y - log(1 - p_y) of every forget sample in every model:

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
- the exhaustive rules (audit.py --attacks exhaustive, not the challenge's): every single
  threshold in both directions, without grid, intervals or collapsed rule, a perfect
  separation in a last bucket of its own (this toolkit's earlier rules);
- U-LiRA: per forget sample, Gaussians of phi over the shadows where it was in-and-unlearned
  and where it was out (K >= 4: at least 2 a side); the likelihood ratio scores the N
  unlearned models (members that were unlearned) against the N gold standards; AUC and
  balanced accuracy (50: indistinguishable), TPR at 1% and 0.1% FPR.
"""
import math

import numpy as np
import torch

import metrics


# The scorer's constants (google-deepmind/unlearning_evaluation, metric.py).
DELTA = 1e-5
EPSILON_CAP = 50  # a sample's epsilon when one side has collapsed, and the largest any sample gets
COLLAPSED = 0.01  # one side's range below this fraction of the other's: collapsed
GRID = 100  # thresholds per unit of phi
BUFFER = 2.0  # how far the interval rules' thresholds reach past the peaky side
BUCKET = 0.5


# ---------------------------------------------------------------- the challenge's score

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


# ---------------------------------------------------------------- U-LiRA

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


def thin_roc(fpr, tpr, n=400):
    """The ROC at about n points spaced evenly on a log FPR axis (the plot's), plus its ends."""
    keep = np.unique(np.r_[0, np.searchsorted(fpr, np.geomspace(1e-5, 1, n)).clip(0, len(fpr) - 1), len(fpr) - 1])
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}


def shadow_halves(n_forget, n_shadows, seed):
    """(K, |F|) bool: each forget sample in exactly K/2 shadows (rounded down), drawn from
    `seed`, so every sample has as many in- as out-models (Carlini et al.'s LiRA design)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(n_shadows, n_forget, generator=gen).argsort(0)
    return (order < n_shadows // 2).numpy()
