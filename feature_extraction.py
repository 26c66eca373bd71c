"""Penultimate embeddings, labels and class prototypes of every checkpoint in a folder.

    python feature_extraction.py -D reduced/base/ -S 5000
    python feature_extraction.py -D output/20261130-101500_classforget -S 1000 --device cpu
    python feature_extraction.py -D checkpoints output/20261130-101500_classforget -S 1000

For every <folder>/*.pt (train.py's and main.py's checkpoints alike; subfolders such as
a run's masks/ are not read) this writes features/<folder>/<checkpoint stem>.json with

    all_features  S x D  penultimate embeddings: timm's forward_features, then
                         forward_head(pre_logits=True), so any timm family works
    all_labels    S      their labels
    proto         C x D  class prototypes: the rows of the classifier's weight
    forget, forget_idx   the checkpoint's forget spec, and its forgotten training
                         indices among the S samples
    dataset, model, classes, checkpoint, num_samples

The samples are the first S of the dataset's official training split, in order, for
every checkpoint: files of different checkpoints compare sample by sample, and a
sample's position in the file is its training index. A relative folder is mirrored
as given; an absolute one outside the current directory loses only its leading "/"
(-D /tmp/ana/base -> features/tmp/ana/base).

The reader, `read_features`, lives here too, next to the writer: tsne_vis.py and
wasserstein.py load features through it.
"""
import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
from datasets import ForgetSpec
from models import load_model
from utils import UserError, atomic_write_text, check_writable, cli, compute_for, get_device, load_checkpoint

FEATURES_ROOT = "features"
SAMPLES = 1000  # -S of feature_extraction.py, tsne_vis.py and wasserstein.py
SAMPLES_HELP = "the first S training samples (-S means this in all three latent-space scripts)"
DECIMALS = 6  # 1e-6 absolute is far below what t-SNE or OT resolve, and halves the file
REQUIRED = ("all_features", "all_labels", "proto")
CONFIG_KEYS = ("model", "dataset", "num_classes", "in_chans", "img_size")


def build_parser():
    p = argparse.ArgumentParser(description="Embeddings, labels and class prototypes of every "
                                            "checkpoint (<folder>/*.pt) in a folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-D", "--directory", required=True, nargs="+", default=argparse.SUPPRESS,
                   help="folder(s) of checkpoints, e.g. reduced/base/")
    p.add_argument("-S", "--samples", type=int, default=SAMPLES, help=SAMPLES_HELP + ", embedded")
    p.add_argument("-B", "--batch-size", type=int, default=500, help="samples per forward pass")
    p.add_argument("-W", "--num-workers", type=int, default=0,
                   help="accepted for compatibility and ignored: batches are cut from tensors "
                        "already in memory, there is no DataLoader")
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR, help="dataset download folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    p.add_argument("--out", default=FEATURES_ROOT,
                   help="folder the script writes under: <out>/<checkpoint folder>/<stem>.json")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------- paths

def relative_name(folder, base="."):
    """`folder` as a relative path: under `base` if inside it, else under the current
    directory, else the absolute path without its anchor. Outputs mirror this."""
    path = Path(os.path.abspath(folder))  # as typed: a symlinked folder keeps its name
    for root in (Path(os.path.abspath(base)), Path.cwd()):
        if path == root or root in path.parents:
            return path.relative_to(root)
    return path.relative_to(path.anchor)


def checkpoint_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} not found")
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise UserError(f"no checkpoints (*.pt) in {folder}")
    return files


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


def check_checkpoints(files, data_dir, device, models):
    """Everything that can be wrong, before any file is written: each .pt must be a
    checkpoint whose weights fit its model and whose dataset loads."""
    data = {}
    for path in files:
        config = load_checkpoint(path)["config"]
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise UserError(f"{path} is not a SalUn DeepDive checkpoint (config lacks {', '.join(missing)})")
        if config["dataset"] not in data:
            data[config["dataset"]] = datasets.load_dataset(config["dataset"], data_dir, device)
        model, _ = load_model(path, device, models)
        prototypes(model)
    return data


def main(argv=None):
    args = parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        raise UserError("-S/--samples and -B/--batch-size must be positive")
    device = get_device(args.device)
    compute = compute_for(device, "fp32")
    folders = {folder: checkpoint_files(folder) for folder in dict.fromkeys(args.directory)}
    models = {}  # one built model per architecture, reloaded per checkpoint
    data = check_checkpoints([f for files in folders.values() for f in files], args.data_dir, device, models)
    check_writable(args.out, "--out")
    for ds in data.values():
        if len(ds.y_train) < args.samples:
            print(f"{ds.name} has {len(ds.y_train)} training samples; embedding all of them")
    for folder, files in folders.items():
        out_dir = Path(args.out) / relative_name(folder)
        for path in tqdm(files, desc="checkpoints", unit="ckpt"):
            model, config = load_model(path, device, models)
            ds = data[config["dataset"]]
            n = min(args.samples, len(ds.y_train))
            feats = embed_samples(model, ds, n, args.batch_size, compute)
            record = features_record(path, config, ds, feats, prototypes(model), n)
            atomic_write_text(out_dir / f"{path.stem}.json", json.dumps(record))
        print(f"features of {len(files)} checkpoints in {out_dir}")


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


def features_folders(root=FEATURES_ROOT):
    """Every folder under `root` that holds features files, sorted (features/checkpoints
    comes before features/output/<run>: base models before the runs that unlearn them)."""
    return sorted({str(p.parent) for p in Path(root).rglob("*.json")})


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


if __name__ == "__main__":
    cli(main)
