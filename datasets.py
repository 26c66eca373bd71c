"""Datasets as uint8 tensors, forget/retain/val splits, and batch iteration.

Every dataset is held whole as one uint8 tensor (N, C, H, W) plus an int64 label
tensor, moved to the compute device once. Batches are cut by indexing and augmented
as whole batches on that device: no per-sample PIL transforms, no DataLoader.

    ds = load_dataset("digits")
    split = make_split(ds, ForgetSpec(class_to_forget=0), seed=0)   # val from the seed, then forget
    for x, y, i in batches(ds, split.retain, 64, gen=torch.Generator().manual_seed(0)):
        ...

Indices everywhere (forget JSONs, `idxs_to_forget`, splits) are positions in the
dataset's official training split.
"""
import gzip
import json
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils import UserError, reason

DEFAULT_DATA_DIR = "./data"
VAL_FRACTION = 0.1


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list
    flip: bool  # horizontal flips keep the label (not for digits or text-like images)
    crop_pad: int  # padding of the random crop; 0 disables it

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def in_chans(self):
        return self.x_train.shape[1]

    @property
    def img_size(self):
        return self.x_train.shape[-1]

    @property
    def device(self):
        return self.x_train.device

    def to(self, device):
        """Move to `device`. Images are kept channels-last in memory (logically still
        N, C, H, W), so a batch reads as (N, H, W, C) rows without a transpose."""
        for field in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, field, getattr(self, field).to(device))
        for field in ("x_train", "x_test"):
            setattr(self, field, getattr(self, field).contiguous(memory_format=torch.channels_last))
        stats = self.x_train.float().div(255)
        mean = stats.mean(dim=(0, 2, 3))
        std = stats.std(dim=(0, 2, 3)).clamp_min(1e-3)
        # Normalising is x * scale + shift over rows of W * C values (one image row,
        # channels interleaved): long contiguous rows vectorise, a channel axis of 3 does not.
        self._scale = (1 / (255 * std)).repeat(self.img_size)
        self._shift = (-mean / std).repeat(self.img_size)
        self._mean, self._std = mean[:, None, None], std[:, None, None]
        return self

    def to_pixels(self, x):
        """A normalised float batch back in [0, 1] pixel space (what attacks bound)."""
        return x * self._std + self._mean

    def from_pixels(self, pixels):
        """A [0, 1] pixel batch, normalised as `prepare` does."""
        return (pixels - self._mean) / self._std

    def prepare(self, x, gen=None, augment=False, channels_last=False):
        """uint8 batch -> normalised float batch, randomly cropped/flipped if `augment`."""
        if augment and (self.crop_pad or self.flip):
            x = crop_and_flip(x, self.crop_pad, self.flip, gen)
        else:
            x = x.permute(0, 2, 3, 1).contiguous()
        b, h, w, c = x.shape
        x = x.view(b, h, w * c).float().mul_(self._scale).add_(self._shift).view(b, h, w, c).permute(0, 3, 1, 2)
        return x if channels_last else x.contiguous()


def crop_and_flip(x, pad, flip, gen=None):
    """Per sample, a random translation by up to `pad` pixels (zero-filled) and, if
    `flip`, a horizontal flip with probability 1/2, done together as one gather of
    whole windows. (N, C, H, W) uint8 in, (N, H, W, C) contiguous out."""
    b, _, h, w = x.shape
    dev = x.device
    sample = torch.arange(b, device=dev)
    x = x.permute(0, 2, 3, 1)
    dy = dx = torch.zeros(b, dtype=torch.long, device=dev)
    if pad:
        dy, dx = torch.randint(0, 2 * pad + 1, (2, b), device=dev, generator=gen)
        x = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    if flip:  # a flipped sample reads its window from the mirrored copy of its padded image
        flipped = torch.rand(b, device=dev, generator=gen) < 0.5
        x = torch.cat([x, x.flip(2)])
        sample = torch.where(flipped, sample + b, sample)
        dx = torch.where(flipped, 2 * pad - dx, dx)
    windows = x.unfold(1, h, 1).unfold(2, w, 1).permute(0, 1, 2, 4, 5, 3)  # b, dy, dx, h, w, C
    return windows[sample, dy, dx]


# ---------------------------------------------------------------- loading

class DatasetMissing(UserError):
    pass


def _download(name, folder, how, fetch):
    """Run a torchvision download with a short socket timeout; one clear line on failure."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        return fetch()
    except Exception as e:  # any network or integrity failure means: not available here
        raise DatasetMissing(f"dataset {name} not found in {folder} and could not be downloaded "
                             f"({reason(e)}); {how}") from None
    finally:
        socket.setdefaulttimeout(old)


def _torchvision_how(cls_name, folder):
    return (f"on a machine with network run: python -c \"import torchvision; "
            f"torchvision.datasets.{cls_name}('{folder}', download=True)\" and copy the folder here")


def _cifar(name, folder, n):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if n == 10 else torchvision.datasets.CIFAR100
    how = _torchvision_how(cls.__name__, folder)
    parts = [_download(name, folder, how, lambda t=t: cls(folder, train=t, download=True))
             for t in (True, False)]
    x_tr, x_te = (torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous() for p in parts)
    y_tr, y_te = (torch.tensor(p.targets) for p in parts)
    return Dataset(name, x_tr, y_tr, x_te, y_te, list(parts[0].classes), flip=True, crop_pad=4)


def _svhn(folder):
    import torchvision
    how = _torchvision_how("SVHN", folder)
    parts = [_download("svhn", folder, how,
                       lambda s=s: torchvision.datasets.SVHN(folder, split=s, download=True))
             for s in ("train", "test")]
    x_tr, x_te = (torch.from_numpy(p.data) for p in parts)
    y_tr, y_te = (torch.from_numpy(p.labels).long() for p in parts)
    return Dataset("svhn", x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)], flip=False, crop_pad=4)


def read_idx(path):
    """Read an idx file (optionally .gz), the format MNIST and Fashion-MNIST ship in."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated idx file ({data.size} of {int(np.prod(dims))} bytes)")
    return torch.from_numpy(data.reshape(dims).copy())


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder, tv_name):
    """The four idx files, plain or .gz, in `folder` or torchvision's `<folder>/<Name>/raw`."""
    for base in (Path(folder), Path(folder) / tv_name / "raw"):
        found = []
        for stem in IDX_FILES:
            hits = [base / (stem + ext) for ext in ("", ".gz") if (base / (stem + ext)).is_file()]
            if not hits:
                break
            found.append(hits[0])
        else:
            return found
    return None


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # where apt-get install dataset-fashion-mnist puts it
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _mnist_like(name, folder):
    import torchvision
    tv_name = "FashionMNIST" if name == "fashionmnist" else "MNIST"
    files = _find_idx(folder, tv_name)
    if files is None:
        how = (f"apt-get install dataset-fashion-mnist and pass --data-dir {DEBIAN_FASHION_MNIST}"
               if name == "fashionmnist" else _torchvision_how(tv_name, folder))
        cls = getattr(torchvision.datasets, tv_name)
        _download(name, folder, how, lambda: cls(folder, train=True, download=True))
        files = _find_idx(folder, tv_name)
    x_tr, y_tr, x_te, y_te = (read_idx(f) for f in files)
    classes = FASHION_CLASSES if name == "fashionmnist" else [str(i) for i in range(10)]
    return Dataset(name, x_tr[:, None], y_tr.long(), x_te[:, None], y_te.long(), classes,
                   flip=False, crop_pad=2)


def _digits(_folder):
    """scikit-learn's bundled 8x8 digits, with a fixed seeded 80/20 train/test split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train].sort().values, perm[n_train:].sort().values
    return Dataset("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)],
                   flip=False, crop_pad=1)


DATASETS = {
    "cifar10": lambda folder: _cifar("cifar10", folder, 10),
    "cifar100": lambda folder: _cifar("cifar100", folder, 100),
    "svhn": _svhn,
    "mnist": lambda folder: _mnist_like("mnist", folder),
    "fashionmnist": lambda folder: _mnist_like("fashionmnist", folder),
    "digits": _digits,
}


def check_dataset_name(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def load_dataset(name, data_dir=DEFAULT_DATA_DIR, device="cpu"):
    check_dataset_name(name)
    return DATASETS[name](str(data_dir)).to(device)


# ---------------------------------------------------------------- forget specs and splits

# How train.py and base_test.py spell the forget-spec keys on their command lines.
FORGET_FLAGS = {"class_to_forget": "--cf", "unlearning_rate": "--unlr", "idxs_to_forget": "--itf"}


@dataclass(frozen=True)
class ForgetSpec:
    """Exactly one of the three, or none for a model trained on everything."""
    class_to_forget: int = None
    unlearning_rate: float = None
    idxs_to_forget: str = None

    def problems(self, num_classes=None):
        """(key, message) for everything wrong with the spec; empty when it is usable."""
        given = [k for k, v in self.to_config().items() if v is not None]
        out = []
        if len(given) > 1:
            out.append(("forget spec", f"give exactly one forget spec, got {', '.join(given)}"))
        c, r = self.class_to_forget, self.unlearning_rate
        if c is not None and num_classes is not None and not 0 <= c < num_classes:
            out.append(("class_to_forget", f"class {c} out of range 0..{num_classes - 1}"))
        if r is not None and not 0 < r < 1:
            out.append(("unlearning_rate", f"{r} outside (0, 1)"))
        if self.idxs_to_forget is not None and not Path(self.idxs_to_forget).is_file():
            out.append(("idxs_to_forget", f"index file {self.idxs_to_forget} not found"))
        return out

    @property
    def is_empty(self):
        return all(v is None for v in self.to_config().values())

    def to_config(self):
        return {"class_to_forget": self.class_to_forget, "unlearning_rate": self.unlearning_rate,
                "idxs_to_forget": self.idxs_to_forget}

    def describe(self):
        if self.class_to_forget is not None:
            return f"class {self.class_to_forget}"
        if self.unlearning_rate is not None:
            return f"random {self.unlearning_rate:g}"
        if self.idxs_to_forget is not None:
            return f"indices {Path(self.idxs_to_forget).name}"
        return "nothing"


def read_index_file(path, n_train):
    """A forget-index JSON: a non-empty list of distinct ints in 0..n_train-1."""
    try:
        idx = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"index file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"index file {path} is not valid JSON ({e})") from None
    if not isinstance(idx, list):
        raise UserError(f"index file {path} must hold a list of indices, got {type(idx).__name__}")
    if not idx:
        raise UserError(f"index file {path} is empty: nothing to forget")
    bad = [v for v in idx if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise UserError(f"index file {path} holds non-integers, e.g. {bad[0]!r}")
    out = [v for v in idx if not 0 <= v < n_train]
    if out:
        raise UserError(f"index file {path}: index {out[0]} out of range 0..{n_train - 1}")
    if len(set(idx)) != len(idx):
        dup = next(v for v in idx if idx.count(v) > 1)
        raise UserError(f"index file {path}: index {dup} appears more than once")
    return torch.tensor(sorted(idx), dtype=torch.long)


def validation_indices(n_train, seed, fraction=VAL_FRACTION):
    """The held-out validation set: drawn from the whole training set, from the seed alone,
    so every model of one dataset and seed holds out the same samples, whatever it forgets."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 1))
    return perm[:int(fraction * n_train)].sort().values


def forget_indices(spec, y_train, seed, in_val):
    """The sorted training indices a spec names, all outside the validation set `in_val`
    (a bool table): a class's non-validation samples, a fraction of the non-validation
    samples drawn from `seed` alone, or an index file, which may not name a validation sample."""
    y, in_val = y_train.cpu(), in_val.cpu()
    if spec.class_to_forget is not None:
        return torch.nonzero((y == spec.class_to_forget) & ~in_val).flatten()
    if spec.unlearning_rate is not None:
        pool = torch.nonzero(~in_val).flatten()
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        return pool[perm[:int(spec.unlearning_rate * len(pool))]].sort().values
    if spec.idxs_to_forget is not None:
        idx = read_index_file(spec.idxs_to_forget, len(y))
        check_outside_validation(idx, in_val, f"index file {spec.idxs_to_forget}")
        return idx
    return torch.zeros(0, dtype=torch.long)


def check_outside_validation(forget, in_val, what):
    clash = forget[in_val.cpu()[forget]]
    if len(clash):
        raise UserError(f"{what} names {len(clash)} validation sample(s) of this model (e.g. index "
                        f"{int(clash[0])}); a forget set holds training samples only")


@dataclass
class Split:
    forget: torch.Tensor  # sorted int64 training indices
    retain: torch.Tensor
    val: torch.Tensor  # validation samples (of the remaining classes, for class forgetting)
    val_forgotten: torch.Tensor  # validation samples of the forgotten class (empty otherwise)
    is_forget: torch.Tensor  # bool lookup tables over the training set
    in_val: torch.Tensor
    forget_class: int = None

    @property
    def train(self):
        """What a model that has not forgotten anything trained on: retain and forget."""
        return torch.nonzero(~self.in_val).flatten()

    def to(self, device):
        for field in ("forget", "retain", "val", "val_forgotten", "is_forget", "in_val"):
            setattr(self, field, getattr(self, field).to(device))
        return self


def as_flags(idx, n):
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.as_tensor(idx, dtype=torch.long)] = True
    return flags


def make_split(ds, spec, seed=0, val_idx=None, forget_idx=None):
    """Validation drawn from `seed` alone (or a checkpoint's `val_idx`), then the forget set
    from the samples outside it (or a checkpoint's `forget_idx`); retain is the rest.

    A checkpoint's indices make every script use that model's own held-out samples.
    """
    n = len(ds.y_train)
    in_val = as_flags(validation_indices(n, seed) if val_idx is None else val_idx, n)
    if forget_idx is None:
        forget = forget_indices(spec, ds.y_train, seed, in_val)
    else:
        forget = torch.as_tensor(forget_idx, dtype=torch.long)
        check_outside_validation(forget, in_val, "the forget set")
    is_forget = as_flags(forget, n)
    of_class = (ds.y_train.cpu() == spec.class_to_forget) if spec.class_to_forget is not None \
        else torch.zeros(n, dtype=torch.bool)
    split = Split(forget=forget,
                  retain=torch.nonzero(~is_forget & ~in_val).flatten(),
                  val=torch.nonzero(in_val & ~of_class).flatten(),
                  val_forgotten=torch.nonzero(in_val & of_class).flatten(),
                  is_forget=is_forget, in_val=in_val,
                  forget_class=spec.class_to_forget)
    return split.to(ds.device)


# ---------------------------------------------------------------- batches

def batches(ds, idx, batch_size, gen=None, augment=False, test=False, channels_last=False):
    """Yield (x, y, idx) batches over `idx`; shuffled when a generator is given.

    Training batches (gen given) never end in a single sample, which BatchNorm rejects.
    """
    x_all, y_all = (ds.x_test, ds.y_test) if test else (ds.x_train, ds.y_train)
    if gen is not None:
        idx = idx[torch.randperm(len(idx), generator=gen, device=gen.device).to(idx.device)]
        if len(idx) % batch_size == 1 and len(idx) > 1:
            idx = idx[:-1]
    for start in range(0, len(idx), batch_size):
        i = idx[start:start + batch_size]
        yield ds.prepare(x_all[i], gen, augment, channels_last), y_all[i], i
