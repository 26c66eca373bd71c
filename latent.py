"""The latent space of checkpoints: embeddings and class prototypes, their files, t-SNE maps, Wasserstein distances.

    feats = latent.embed_samples(model, ds, 1000, 500, compute)        # feature_extraction.py
    by_folder = latent.read_folders(["features/checkpoints"], n=1000)   # tsne_vis.py, wasserstein.py
    y2, y3 = latent.embed(X, (2, 3), seed=0)                           # tsne_vis.py, bench.py
    d = latent.class_distances(features, labels, num_classes)           # wasserstein.py (and ot_distance: bench.py)

A features file's writer (`features_record`, feature_extraction.py's) and its reader
(`read_features`, through which tsne_vis.py and wasserstein.py load features) live here
side by side, so the format has one definition.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import datasets
from datasets import ForgetSpec
from utils import UserError


FEATURES_ROOT = "features"
SAMPLES = 1000  # -S of feature_extraction.py, tsne_vis.py and wasserstein.py
SAMPLES_HELP = "the first S training samples (-S means this in all three latent-space scripts)"
DECIMALS = 6  # 1e-6 absolute is far below what t-SNE or OT resolve, and halves the file
REQUIRED = ("all_features", "all_labels", "proto")


# ---------------------------------------------------------------- paths

def relative_name(folder, base="."):
    """`folder` as a relative path: under `base` if inside it, else under the current
    directory, else the absolute path without its anchor. Outputs mirror this."""
    path = Path(os.path.abspath(folder))  # as typed: a symlinked folder keeps its name
    for root in (Path(os.path.abspath(base)), Path.cwd()):
        if path == root or root in path.parents:
            return path.relative_to(root)
    return path.relative_to(path.anchor)


def features_folders(root=FEATURES_ROOT):
    """Every folder under `root` that holds features files, sorted (features/checkpoints
    comes before features/output/<run>: base models before the runs that unlearn them)."""
    return sorted({str(p.parent) for p in Path(root).rglob("*.json")})


# ---------------------------------------------------------------- extraction

def prototypes(model):
    """The classifier's weight rows (C x D): the direction each class's logit reads."""
    weight = getattr(model.get_classifier(), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UserError(f"{type(model).__name__}'s classifier has no weight matrix to take "
                        f"class prototypes from")
    return weight.detach().float().flatten(1).cpu()


@torch.no_grad()
def embed_samples(model, ds, n, batch_size, compute):
    """Penultimate embeddings of training samples 0..n-1, in order, as an n x D tensor (fp32)."""
    model.eval()
    parts = []
    idx = torch.arange(n, device=ds.device)
    for x, _, _ in datasets.batches(ds, idx, batch_size, channels_last=compute.channels_last):
        z = model.forward_head(model.forward_features(x), pre_logits=True)
        parts.append(z.float().flatten(1).cpu())
    return torch.cat(parts)


def forget_of(config):
    """The forget spec a checkpoint records, without its unset keys ({} for a base model)."""
    return {k: v for k, v in (config.get("forget") or {}).items() if v is not None}


def features_record(path, config, ds, feats, protos, n):
    forgotten = sorted(i for i in config.get("forget_idx") or [] if i < n)
    return {"checkpoint": str(path), "model": config["model"], "dataset": config["dataset"],
            "classes": list(ds.classes), "num_samples": n,
            "forget": forget_of(config), "forget_idx": forgotten,
            "all_labels": ds.y_train[:n].tolist(),
            "all_features": np.round(feats.double().numpy(), DECIMALS).tolist(),
            "proto": np.round(protos.double().numpy(), DECIMALS).tolist()}


# ---------------------------------------------------------------- reading

@dataclass
class Features:
    """One features file, cut to its first n samples and checked."""
    path: Path
    features: np.ndarray  # n x D
    labels: np.ndarray  # n, ints in 0..C-1
    proto: np.ndarray  # C x D'
    classes: list
    dataset: str
    model: str
    forget: dict = field(default_factory=dict)
    forget_idx: np.ndarray = None  # positions among the n samples

    @property
    def stem(self):
        return self.path.stem

    @property
    def forgets(self):
        """What the model forgot, in words: 'class 0 (airplane)', 'random 0.1', 'nothing'."""
        spec = ForgetSpec(**{k: self.forget.get(k) for k in ForgetSpec().to_config()})
        words = spec.describe()
        c = spec.class_to_forget
        if c is not None and 0 <= c < len(self.classes) and self.classes[c] != str(c):
            words += f" ({self.classes[c]})"
        return words

    @property
    def target(self):
        """Files with the same target forgot the same thing from the same samples."""
        return self.dataset, json.dumps(self.forget, sort_keys=True)

    @property
    def forget_class(self):
        return self.forget.get("class_to_forget")


def _matrix(data, key, path):
    try:
        m = np.asarray(data[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {key} is not a matrix of numbers") from None
    if m.ndim != 2 or m.shape[0] == 0 or not np.isfinite(m).all():
        raise UserError(f"{path}: {key} must be a non-empty matrix of finite numbers, got shape {m.shape}")
    return m


def _ints(values, path, key, limit):
    if not isinstance(values, list) or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise UserError(f"{path}: {key} must be a list of integers")
    a = np.asarray(values, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() >= limit):
        raise UserError(f"{path}: {key} holds {a.min() if a.min() < 0 else a.max()}, outside 0..{limit - 1}")
    return a


def read_features(path, n=None):
    """A features file, its first n samples, checked; a UserError naming the file otherwise.

    Files written before the metadata keys existed (only all_features, all_labels,
    proto) are read too, as a model of unknown dataset that forgot nothing.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if k not in data] if isinstance(data, dict) else list(REQUIRED)
    if missing:
        raise UserError(f"{path} is not a features file (no {', '.join(missing)}); "
                        f"make one with feature_extraction.py")
    feats, proto = _matrix(data, "all_features", path), _matrix(data, "proto", path)
    classes = data.get("classes") or [str(c) for c in range(len(proto))]
    if len(proto) != len(classes):
        raise UserError(f"{path}: proto has {len(proto)} rows for {len(classes)} classes")
    labels = _ints(data["all_labels"], path, "all_labels", len(classes))
    if len(labels) != len(feats):
        raise UserError(f"{path}: {len(feats)} feature rows but {len(labels)} labels")
    n = len(feats) if n is None else min(n, len(feats))
    forget_idx = _ints(data.get("forget_idx", []), path, "forget_idx", len(feats))
    forget = data.get("forget") or {}
    if not isinstance(forget, dict):
        raise UserError(f"{path}: forget must be an object like {{\"class_to_forget\": 0}}")
    return Features(path, feats[:n], labels[:n], proto, list(classes), str(data.get("dataset", "unknown")),
                    str(data.get("model", "unknown")), forget, forget_idx[forget_idx < n])


def read_folders(folders, n=None):
    """{folder: [Features, ...]} for every *.json of every folder, all checked before use;
    no folders: every folder under features/."""
    folders = folders or features_folders()
    if not folders:
        raise UserError(f"no features files under {FEATURES_ROOT}/; make them with "
                        f"python feature_extraction.py -D <checkpoint folder>")
    out = {}
    for folder in dict.fromkeys(str(Path(f)) for f in folders):
        if not Path(folder).is_dir():
            raise UserError(f"features folder {folder} not found; make it with "
                            f"feature_extraction.py -D <checkpoint folder>")
        files = sorted(Path(folder).glob("*.json"))
        if not files:
            raise UserError(f"no features files (*.json) in {folder}")
        out[folder] = [read_features(f, n) for f in files]
    return out


# ---------------------------------------------------------------- t-SNE

def unit_rows(x):
    """The rows of x scaled to unit length (an all-zero row stays zero): cosine geometry for
    t-SNE here and for representations.py's k-NN."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def embed(X, dims=(2, 3), seed=0, n_jobs=-1):
    """t-SNE of the rows of X into each of `dims` (2 or 3) dimensions: one array per dim,
    deterministic for a seed.

    openTSNE, measured faster than scikit-learn on 5000 x 512: 18 s vs 31 s in 2D,
    49 s vs 186 s in 3D. The affinities (nearest neighbours and perplexity calibration)
    do not depend on the output dimension, so they are computed once for all `dims`.
    In 2D openTSNE picks its gradient method by size (Barnes-Hut below 10,000 points,
    where FFT interpolation costs more than it saves; FFT above); 3D is always
    Barnes-Hut, as its FFT method refuses 3D. Rows are L2-normalised first, so
    neighbours are those of the cosine metric (prototypes, whose scale differs from the
    features', land by direction) and an all-zero row cannot make a NaN.
    All cores by default (3000 x 512 on 2 idle cores: 19 s against 32 s on one); on a
    2-core machine with anything else running, 2 threads were measured 2.5x slower than 1.
    """
    from openTSNE import TSNE
    from openTSNE.affinity import PerplexityBasedNN
    X = np.asarray(X, dtype=np.float64)
    if len(X) < 4:
        raise UserError(f"t-SNE needs at least 4 points, got {len(X)}")
    X = unit_rows(X)
    perplexity = min(30.0, (len(X) - 1) / 3)  # openTSNE needs 3 * perplexity < n
    affinities = PerplexityBasedNN(X, perplexity=perplexity, n_jobs=n_jobs, random_state=seed, verbose=False)
    P, out = affinities.P, []
    for dim in dims:
        affinities.P = P.copy()  # exaggeration scales P in place and back, which rounds
        tsne = TSNE(n_components=dim, random_state=seed, n_jobs=n_jobs, verbose=False,
                    negative_gradient_method="auto" if dim == 2 else "bh")
        out.append(np.asarray(tsne.fit(X, affinities=affinities)))
    return out


# ---------------------------------------------------------------- Wasserstein distances

def ot_distance(a, b):
    """Exact 1-Wasserstein distance between two point sets, uniform weights, euclidean cost.

    The same value as scipy's wasserstein_distance_nd (to 1e-13) from POT's network
    simplex instead of a generic linear program: measured 60x faster on two digit
    classes of ~100 ResNet-18 embeddings (512-d).
    """
    import ot  # imports in seconds; only needed here
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cost = ot.dist(a, b, metric="euclidean")
    # the default iteration cap stops short (with a warning) on a few hundred points a side
    return float(ot.emd2(ot.unif(len(a)), ot.unif(len(b)), cost, numItermax=10_000_000))


def class_distances(features, labels, num_classes):
    """C x C symmetric matrix of ot_distance between the classes' embeddings; zero
    diagonal; NaN for a class with no sample."""
    groups = [features[labels == c] for c in range(num_classes)]
    d = np.full((num_classes, num_classes), np.nan)
    present = [c for c in range(num_classes) if len(groups[c])]
    for i, c in enumerate(present):
        d[c, c] = 0.0
        for k in present[i + 1:]:
            d[c, k] = d[k, c] = ot_distance(groups[c], groups[k])
    return d
