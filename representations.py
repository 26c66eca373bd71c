"""Representation-level forgetting: does the network still know what its outputs forgot?

    probe = representations.Probe(ds, split, settings, base_model, gold_model)
    m = probe.measure(model, mask)      # the scalars below, and per stage of the network
    probe.references                    # the same for the base model and the gold standard

Every number is computed in fp32, on samples no model trained on (validation and test),
from frozen features: at the output of each stage of the network (timm's feature_info:
for a ResNet the stem and layer1-4, pooled over space) and the penultimate features
(forward_head with pre_logits), which the classifier reads.

    probe_forgotten  a linear probe (scikit-learn's logistic regression, standardised
                     features) fit on validation samples of every class, the forgotten one
                     included, scored on the forgotten class's test samples (%): can a new
                     linear head find the class again? (class forgetting)
    knn_forgotten    the same with a cosine k-NN classifier instead of the probe (%)
    cka_base         linear CKA (Kornblith et al. 2019) of the features of test samples
    cka_gold         with the base model's and with the gold standard's: which is it closer to?
    relearn_steps    full-batch SGD steps on a fixed small part of the forget set until
                     the accuracy on the rest of the forget set is back within a margin of
                     the base model's (Golatkar et al. 2020's relearn time); the cap when
                     it never gets there (`relearned` is then 0)

The samples are drawn once per split from a fixed seed and capped at `samples`, so the
cost does not grow with the dataset, and every model is measured on the same ones.
"""
import copy
import json
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

import datasets
from latent import unit_rows
from metrics import sample_indices
from utils import UserError, describe_setting, setting, settings_problems

PENULTIMATE = "penultimate"
SEED = 0  # which samples are drawn: the same for every model and every run


@dataclass
class Settings:
    """What --representations measures with (KEY=VALUE after the flag)."""
    samples: int = setting(1000, "validation samples the probe and k-NN fit on, and test samples they and CKA "
                                 "are scored on (each at most this many, drawn once)", "[10, inf)")
    neighbours: int = setting(5, "neighbours of the k-NN classifier (cosine distance)", "[1, inf)")
    relearn_fraction: float = setting(0.05, "share of the forget set the relearning fine-tunes on (at least 2 "
                                            "samples; the rest measures the accuracy)", "(0, 1)")
    relearn_margin: float = setting(5.0, "relearned: forget accuracy within this many points of the base model's",
                                    "[0, 100]")
    relearn_max_steps: int = setting(100, "steps after which a model counts as not relearning", "[1, inf)")
    relearn_lr: float = setting(0.01, "learning rate of the relearning (SGD, momentum 0.9, BatchNorm frozen)",
                                "(0, inf)")


def parse_settings(pairs):
    """Settings from ["samples=500", ...] (values as JSON); a UserError naming every problem."""
    if pairs is None:
        return None
    values = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq:
            raise UserError(f"--representations takes KEY=VALUE settings, got {pair!r} (keys: "
                            f"{', '.join(f.name for f in fields(Settings))})")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"--representations {key}: {text!r} is not a number") from None
    if (problems := settings_problems(Settings, values)):
        raise UserError("--representations: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
    return Settings(**values)


def settings_help():
    return "; ".join(f"{f.name} ({describe_setting(f)})" for f in fields(Settings))


# ---------------------------------------------------------------- the known-answer measures

def linear_probe(train_x, train_y, test_x, test_y):
    """Accuracy (%) on (test_x, test_y) of a logistic regression fit on standardised train_x."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    if len(test_y) == 0:
        return float("nan")
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), train_y)
    return 100.0 * float(np.mean(clf.predict(scaler.transform(test_x)) == test_y))


def knn_accuracy(train_x, train_y, test_x, test_y, k=5):
    """Accuracy (%) of a k-nearest-neighbour vote (cosine distance) among train_x."""
    from sklearn.neighbors import KNeighborsClassifier
    if len(test_y) == 0:
        return float("nan")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_y))).fit(unit_rows(train_x), train_y)
    return 100.0 * float(np.mean(clf.predict(unit_rows(test_x)) == test_y))


def linear_cka(x, y):
    """Linear CKA of two feature matrices of the same n samples (n x d1, n x d2), in [0, 1]:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on column-centred features (Kornblith et al.,
    2019). Invariant to orthogonal transforms and isotropic scaling; NaN for constant features."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else float("nan")


# ---------------------------------------------------------------- features per stage

def stages(model):
    """[(label, module name, module)] whose outputs are probed, in forward order: timm's
    feature_info modules (the first is labelled 'stem' when it is not a block of the body)."""
    modules = dict(model.named_modules())
    info = getattr(model, "feature_info", None) or []
    names = [i["module"] for i in info if i.get("module") in modules]
    return [("stem" if k == 0 and not name.startswith(("layer", "blocks", "stages")) else name, name, modules[name])
            for k, name in enumerate(names)]


def pooled(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    out = out.float()
    if out.dim() == 4:  # N, C, H, W: average over space
        return out.mean((2, 3))
    if out.dim() == 3:  # N, tokens, D: average over tokens
        return out.mean(1)
    return out.flatten(1)


@torch.no_grad()
def stage_features(model, ds, idx, test, batch_size=500):
    """{stage: n x d float64 array} for the samples idx (of the test set if `test`), in fp32."""
    model.eval()
    found = stages(model)
    store = {label: [] for label, _, _ in found}
    store[PENULTIMATE] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: store[name].append(pooled(out).cpu()))
             for name, _, m in found]
    try:
        for x, _, _ in datasets.batches(ds, idx, batch_size, test=test):
            z = model.forward_head(model.forward_features(x), pre_logits=True)
            store[PENULTIMATE].append(z.float().flatten(1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(parts).double().numpy() for name, parts in store.items()}


def stage_of_parameter(model):
    """{parameter name: stage}: the stage whose module holds the parameter, else the first stage
    registered after the parameter's module (a ResNet's conv1 and bn1 feed its stem; a ByobNet's
    stages.3 feeds final_conv), else 'head' (the classifier, after the last stage)."""
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    found = [(label, name, order[name]) for label, name, _ in stages(model)]
    out = {}
    for n, _ in model.named_parameters():
        owner = n.rpartition(".")[0]
        inside = next((label for label, name, _ in found if owner == name or owner.startswith(name + ".")), None)
        out[n] = inside or next((label for label, _, k in found if k > order[owner]), "head")
    return out


def mask_stage_shares(model, keep):
    """{stage: kept fraction of the stage's weights, counting entries} for a mask's `keep`."""
    of = stage_of_parameter(model)
    kept, total = {}, {}
    for n, t in keep.items():
        s = of.get(n, "head")
        kept[s] = kept.get(s, 0) + int(t.sum())
        total[s] = total.get(s, 0) + t.numel()
    return {s: kept[s] / total[s] for s in total}


# ---------------------------------------------------------------- relearn time

@torch.no_grad()
def accuracy_on(model, x, y, batch_size=500):
    model.eval()
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(y), batch_size))
    return 100.0 * hits / max(1, len(y))


def relearn_steps(model, fit, held, target, settings):
    """Full-batch SGD steps on `fit` (x, y) until the accuracy on `held` (x, y) is at least
    `target`; 0 when it already is, None when not within settings.relearn_max_steps. On a copy,
    in fp32, with BatchNorm statistics frozen (a batch of a few samples would rewrite them)."""
    model = copy.deepcopy(model).float()
    opt = torch.optim.SGD(model.parameters(), lr=settings.relearn_lr, momentum=0.9)
    x, y = fit
    for step in range(settings.relearn_max_steps + 1):
        if accuracy_on(model, *held) >= target:
            return step
        if step == settings.relearn_max_steps:
            return None
        model.eval()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------- one split's probe

class Probe:
    """The fixed samples of one split, the base and gold models' features on them, and
    `measure`: the representation metrics of any model of that architecture."""

    def __init__(self, ds, split, settings, base, gold=None):
        self.ds, self.settings, self.forget_class = ds, settings, split.forget_class
        s, device = settings.samples, ds.device
        self.fit_idx = sample_indices(torch.cat([split.val, split.val_forgotten]).sort().values, s, SEED)
        self.fit_y = ds.y_train[self.fit_idx].cpu().numpy()
        every = sample_indices(torch.arange(len(ds.y_test), device=device), s, SEED)
        forgotten = (sample_indices(torch.nonzero(ds.y_test == split.forget_class).flatten(), s, SEED)
                     if split.forget_class is not None else every[:0])
        self.test_idx = torch.unique(torch.cat([every, forgotten]))
        position = {int(i): k for k, i in enumerate(self.test_idx.cpu())}
        self.cka_rows = np.array([position[int(i)] for i in every.cpu()], dtype=np.int64)
        self.forgotten_rows = np.array([position[int(i)] for i in forgotten.cpu()], dtype=np.int64)
        forget = split.forget[torch.randperm(len(split.forget), generator=torch.Generator().manual_seed(SEED))
                              .to(split.forget.device)]
        n_fit = min(len(forget) - 1, max(2, round(settings.relearn_fraction * len(forget))))
        self.relearn_fit = self.batch(forget[:n_fit].sort().values)
        self.relearn_held = self.batch(sample_indices(forget[n_fit:].sort().values, s, SEED))
        self.base = self.features(base)
        self.gold = self.features(gold) if gold is not None else None
        self.target = accuracy_on(base, *self.relearn_held) - settings.relearn_margin
        self.stage_names = list(self.base[0])
        self.references = {"base": self.measure(base, features=self.base)}
        if gold is not None:
            self.references["gold"] = self.measure(gold, features=self.gold)

    def batch(self, idx):
        return self.ds.prepare(self.ds.x_train[idx]), self.ds.y_train[idx]

    def features(self, model):
        return (stage_features(model, self.ds, self.fit_idx, test=False),
                stage_features(model, self.ds, self.test_idx, test=True))

    def measure(self, model, keep=None, features=None):
        """{"probe_forgotten", "knn_forgotten", "cka_base", "cka_gold", "relearn_steps", "relearned",
        "stages": {"name": [...], "probe": [...], "cka_base": [...], "cka_gold": [...], "mask": [...]}}."""
        fit, test = features or self.features(model)
        y_test = self.ds.y_test[self.test_idx].cpu().numpy()
        per = {"name": self.stage_names, "probe": [], "knn": [], "cka_base": [], "cka_gold": []}
        for name in self.stage_names:
            if self.forget_class is not None:
                rows = self.forgotten_rows
                per["probe"].append(linear_probe(fit[name], self.fit_y, test[name][rows], y_test[rows]))
                per["knn"].append(knn_accuracy(fit[name], self.fit_y, test[name][rows], y_test[rows],
                                               self.settings.neighbours))
            per["cka_base"].append(linear_cka(test[name][self.cka_rows], self.base[1][name][self.cka_rows]))
            if self.gold is not None:
                per["cka_gold"].append(linear_cka(test[name][self.cka_rows], self.gold[1][name][self.cka_rows]))
        if keep is not None:  # a saliency mask's {parameter: bool tensor}
            per["mask"] = mask_stage_shares(model, keep)
        steps = relearn_steps(model, self.relearn_fit, self.relearn_held, self.target, self.settings)
        last = lambda key: per[key][-1] if per[key] else None
        return {"probe_forgotten": last("probe"), "knn_forgotten": last("knn"), "cka_base": last("cka_base"),
                "cka_gold": last("cka_gold"),
                "relearn_steps": self.settings.relearn_max_steps if steps is None else steps,
                "relearned": 0.0 if steps is None else 100.0, "stages": per}


def probe_for(e, ctx, cache, settings):
    """The Probe of an experiment's split, made once per (checkpoint, gold standard, forget set)."""
    from models import load_model
    key = ("probe", e.checkpoint, e.retrained, repr(e.spec), e.split_seed, repr(asdict(settings)))
    if key not in cache:
        gold = load_model(e.retrained, ctx.ds.device)[0] if e.retrained else None
        cache[key] = Probe(ctx.ds, ctx.split, settings, ctx.base_model, gold)
    return cache[key]
