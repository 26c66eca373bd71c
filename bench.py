"""Speed of our pipeline against the way the original toolkit did the same work.

    python bench.py --quick --json bench.json     # about 2 min on 2 idle CPU cores
    python bench.py --json bench.json             # full sizes, about 7-10 min on 2 idle CPU cores
    python bench.py --device cuda --json bench.json
    python bench.py --quick --rows mask_speedup,wasserstein_speedup
    python bench.py --smoke --json /tmp/b.json    # tiny sizes: tests the code paths, not the speed
    python bench.py --rows ray_runs_ratio          # main.py --executor ray against local, same list of runs
    python bench.py --rows trial_overhead          # a tune.py trial's wall time over its unlearning time

Each row builds ours and a reference for the same work in this one process, warms
both up, then times them in turn for a few repeats (the order swapped every repeat,
so drift and other load on the machine hit both alike) and reports the median of
the per-repeat ratios. `ours`/`reference` in the table and `ours_s`/`reference_s`
in the JSON are the median seconds one repeat of the work took (the size column
says what one repeat is). Speedups are reference/ours (higher is better); overhead
and RTE ratios are ours/reference (lower is better).

--quick shrinks the work (see SIZES), and some ratios move with it: t-SNE's gain is
larger on fewer points, exact OT's smaller. Other programs running on the machine
slow every row (two threads per op wait on each other when the cores are shared), so
the footer gives the load average; compare figures from an idle machine.

The JSON holds one key per row: ours_s, reference_s, ratio, goal, direction
(">=" or "<="), met, size, note, mode and device. A row that cannot run (say a
missing module) gets an `error` instead, and the script exits with status 1.
"""
import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# The network of the model rows, and what one repeat of each row is, per mode. "smoke"
# only exercises the code: timm's tiny test_resnet stands in for ResNet-18 there.
MODEL = {"full": "resnet18", "quick": "resnet18", "smoke": "test_resnet"}
SIZES = {
    "full": {
        "seed_pipeline_speedup": dict(batch=128, batches=1, repeats=3),
        "data_path_speedup": dict(images=50_000, batch=128, repeats=3),
        "data_overhead": dict(batch=128, batches=2, repeats=5),
        "mask_speedup": dict(forget=128, repeats=5),
        "wasserstein_speedup": dict(points=500, dims=512, repeats=2),
        "tsne_speedup": dict(points=3000, dims=512, repeats=1),
        "rte_ratio": dict(train=None, repeats=3),
        "ray_runs_ratio": dict(experiments=4, nexp=6, repeats=1),
        "ray_gpu_packing": dict(experiments=4, nexp=4, repeats=1),
        "trial_overhead": dict(datasets=("digits", "fashionmnist"), repeats=1),
    },
    "quick": {
        "seed_pipeline_speedup": dict(batch=32, batches=1, repeats=3),
        "data_path_speedup": dict(images=10_000, batch=128, repeats=3),
        "data_overhead": dict(batch=32, batches=2, repeats=3),
        "mask_speedup": dict(forget=32, repeats=3),
        "wasserstein_speedup": dict(points=300, dims=512, repeats=2),
        "tsne_speedup": dict(points=500, dims=512, repeats=1),
        "rte_ratio": dict(train=None, repeats=1),
        "ray_runs_ratio": dict(experiments=4, nexp=1, repeats=1),
        "ray_gpu_packing": dict(experiments=4, nexp=2, repeats=1),
        "trial_overhead": dict(datasets=("digits",), repeats=2),
    },
    "smoke": {
        "seed_pipeline_speedup": dict(batch=4, batches=1, repeats=1),
        "data_path_speedup": dict(images=256, batch=64, repeats=1),
        "data_overhead": dict(batch=4, batches=2, repeats=1),
        "mask_speedup": dict(forget=4, repeats=1),
        "wasserstein_speedup": dict(points=30, dims=16, repeats=1),
        "tsne_speedup": dict(points=60, dims=16, repeats=1),
        "rte_ratio": dict(train=160, repeats=1),
        "ray_runs_ratio": dict(experiments=1, nexp=1, repeats=1),
        "ray_gpu_packing": dict(experiments=1, nexp=1, repeats=1),
        "trial_overhead": dict(datasets=("digits",), repeats=1),
    },
}


@dataclass
class Result:
    ours_s: float
    reference_s: float
    ratio: float
    size: str
    note: str = ""


# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds fn() takes, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(ours, ref, repeats, device, warmup=None):
    """[(ours seconds, reference seconds)] per repeat, after a warm-up of both
    (`warmup`, or one untimed call of each)."""
    if warmup is None:
        ours(), ref()
    else:
        warmup()
    sync(device)
    pairs = []
    for r in range(repeats):
        t = {}
        for name in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
            t[name] = timed(ours if name == "ours" else ref, device)
        pairs.append((t["ours"], t["ref"]))
    return pairs


def summarize(pairs, size, speedup=True, note=""):
    ratios = [r / o if speedup else o / r for o, r in pairs]
    return Result(statistics.median(o for o, _ in pairs), statistics.median(r for _, r in pairs),
                  statistics.median(ratios), size, note)


# ---------------------------------------------------------------- shared set-up

def synthetic_cifar(n, device, seed=0):
    """n random CIFAR-shaped uint8 images (3x32x32, 10 classes), augmented as CIFAR is."""
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return Dataset("synthetic", x, y, x[:2].clone(), y[:2].clone(), [str(c) for c in range(NUM_CLASSES)],
                   flip=True, crop_pad=4).to(device)


def our_model(name, ds, compute, seed=0):
    """The model as our scripts build it: small-image stem, on the device, channels_last if fast."""
    from models import create_model
    torch.manual_seed(seed)
    model, _ = create_model(name, ds.num_classes, ds.in_chans, ds.img_size)
    fmt = torch.channels_last if compute.channels_last else torch.contiguous_format
    return model.to(compute.device, memory_format=fmt)


def our_run(ds, compute, batch, split=None, seed=0):
    from methods import Run
    from utils import make_generator
    return Run(ds, split, batch, make_generator(seed, compute.device), compute)


class PILImages(torch.utils.data.Dataset):
    """The original toolkit's way: one uint8 HWC array per sample, to PIL, through a transform."""

    def __init__(self, x_hwc, y, transform):
        self.x, self.y, self.transform = x_hwc, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def pil_loader(ds, n, batch, transform, workers):
    x_hwc = ds.x_train[:n].permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return torch.utils.data.DataLoader(PILImages(x_hwc, ds.y_train[:n].cpu().numpy(), transform),
                                       batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


# ---------------------------------------------------------------- rows

def seed_pipeline_speedup(size, device, workers):
    """Training throughput: our pipeline (uint8 tensor -> batched augment -> small-stem
    ResNet-18 at 32 px, channels_last) against the original's (per-sample PIL, timm's
    evaluation transform: resize to 224 px + centre crop + normalise, DataLoader,
    ImageNet-stem ResNet-18 at 224 px), the same number of images and the same SGD."""
    import timm
    import timm.data
    from methods import cross_entropy, make_optimizer, sgd_pass
    from utils import compute_for

    n = size["batch"] * size["batches"]
    compute = compute_for(device, size["precision"])
    ds = synthetic_cifar(n, device)
    model = our_model(size["model"], ds, compute)
    run = our_run(ds, compute, size["batch"])
    opt = make_optimizer(model, 0.01)
    idx = torch.arange(n, device=device)

    torch.manual_seed(0)
    ref_model = timm.create_model(size["model"], num_classes=NUM_CLASSES).to(device)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref_model))
    loader = pil_loader(ds, n, size["batch"], transform, workers)
    ref_opt = make_optimizer(ref_model, 0.01)

    def ours():
        sgd_pass(model, opt, run, idx, cross_entropy).item()

    def ref():
        ref_model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(ref_model(x), y)
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()

    pairs = alternate(ours, ref, size["repeats"], device)
    r = summarize(pairs, f"{n} images/repeat, batch {size['batch']}, {size['repeats']} repeat(s)")
    r.note = f"{n / r.ours_s:.1f} vs {n / r.reference_s:.1f} img/s; ref workers={workers}"
    return r


def data_path_speedup(size, device, workers):
    """Images per second of batch preparation alone (index, crop, flip, normalise):
    datasets.batches(augment=True) against per-sample PIL transforms in a DataLoader."""
    import torchvision.transforms as T
    from datasets import batches
    from utils import compute_for, make_generator

    n, batch = size["images"], size["batch"]
    compute = compute_for(device, size["precision"])
    ds = synthetic_cifar(n, device)
    gen = make_generator(0, device)
    idx = torch.arange(n, device=device)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    loader = pil_loader(ds, n, batch, transform, workers)

    def ours():
        for x, y, _ in batches(ds, idx, batch, gen=gen, augment=True, channels_last=compute.channels_last):
            pass

    def ref():
        for x, y in loader:
            x, y = x.to(device), y.to(device)

    pairs = alternate(ours, ref, size["repeats"], device)
    r = summarize(pairs, f"{n} images/repeat, batch {batch}, {size['repeats']} repeat(s)")
    r.note = f"{n / r.ours_s:,.0f} vs {n / r.reference_s:,.0f} img/s; ref workers={workers}"
    return r


def data_overhead(size, device, workers):
    """Our epoch (methods.sgd_pass) over the pure compute of the same batches already
    prepared as tensors on the device: what our data path adds to training (1.0 = nothing)."""
    from datasets import batches
    from methods import cross_entropy, make_optimizer, sgd_pass
    from utils import compute_for, make_generator

    n = size["batch"] * size["batches"]
    compute = compute_for(device, size["precision"])
    ds = synthetic_cifar(n, device)
    model = our_model(size["model"], ds, compute)
    run = our_run(ds, compute, size["batch"])
    opt = make_optimizer(model, 0.01)
    idx = torch.arange(n, device=device)
    staged = [(x, y) for x, y, _ in batches(ds, idx, size["batch"], gen=make_generator(1, device),
                                            augment=True, channels_last=compute.channels_last)]

    def ours():
        sgd_pass(model, opt, run, idx, cross_entropy).item()

    def limit():  # sgd_pass's loop body without the data
        model.train()
        total = torch.zeros((), device=device)
        for x, y in staged:
            with compute.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        total.item()

    pairs = alternate(ours, limit, size["repeats"], device)
    return summarize(pairs, f"{n} images/repeat, batch {size['batch']}, {size['repeats']} repeat(s)",
                     speedup=False, note=f"{size['model']}, small-image stem, CIFAR-shaped")


def original_mask(grads, mask_thr):
    """SalUn's original selection: rank every |gradient| entry with a double argsort."""
    flat = -torch.cat([g.abs().flatten() for g in grads.values()])
    threshold = int(len(flat) * mask_thr)
    ranks = torch.argsort(torch.argsort(flat))
    keep, start = {}, 0
    for name, g in grads.items():
        part = ranks[start:start + g.numel()]
        hard = torch.zeros_like(part)
        hard[part < threshold] = 1
        keep[name] = hard.reshape(g.shape)
        start += g.numel()
    return keep


def mask_speedup(size, device, workers):
    """Mask selection over all ResNet-18 parameters from the same forget gradients:
    methods.mask_from_gradients (a selection, no sort) against the original's double argsort."""
    from methods import forget_gradients, mask_from_gradients
    from utils import compute_for

    compute = compute_for(device, size["precision"])
    ds = synthetic_cifar(size["forget"], device)
    model = our_model(size["model"], ds, compute)
    run = our_run(ds, compute, 64, split=SimpleNamespace(forget=torch.arange(size["forget"], device=device)))
    grads = forget_gradients(model, run)
    n = sum(g.numel() for g in grads.values())

    def check():  # doubles as the warm-up
        ours = mask_from_gradients(grads, 0.5).keep
        kept = [sum(int(k.sum()) for k in m.values()) for m in (ours, original_mask(grads, 0.5))]
        if kept[0] != kept[1] or kept[0] != int(0.5 * n):
            raise RuntimeError(f"mask sizes differ: ours keeps {kept[0]}, the original {kept[1]} of {n}")

    pairs = alternate(lambda: mask_from_gradients(grads, 0.5), lambda: original_mask(grads, 0.5),
                      size["repeats"], device, check)
    return summarize(pairs, f"{n / 1e6:.2f}M parameters, mask_thr 0.5, {size['repeats']} repeat(s)",
                     note=f"gradients of {size['forget']} images")


def wasserstein_speedup(size, device, workers):
    """One class pair's exact 1-Wasserstein distance: latent.ot_distance (POT)
    against scipy.stats.wasserstein_distance_nd (the original's call)."""
    import scipy.stats
    from latent import ot_distance

    rng = np.random.default_rng(0)
    n, d = size["points"], size["dims"]
    a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(n, d))
    got = {}

    def ours():
        got["ours"] = ot_distance(a, b)

    def ref():
        got["ref"] = scipy.stats.wasserstein_distance_nd(a, b)

    def warmup():
        ot_distance(a[:10], b[:10]), scipy.stats.wasserstein_distance_nd(a[:10], b[:10])

    pairs = alternate(ours, ref, size["repeats"], device, warmup)
    if not math.isclose(got["ours"], got["ref"], rel_tol=1e-6):
        raise RuntimeError(f"distances differ: ours {got['ours']}, scipy {got['ref']}")
    return summarize(pairs, f"{n} vs {n} points in {d} dims, {size['repeats']} repeat(s)",
                     note="values agree to 1e-6")


def tsne_speedup(size, device, workers):
    """A 2D and a 3D t-SNE of the same points: latent.embed (openTSNE) against
    scikit-learn's TSNE with its defaults (the original's call)."""
    from sklearn.manifold import TSNE
    from latent import embed

    rng = np.random.default_rng(0)
    n, d = size["points"], size["dims"]
    centres = rng.normal(0, 2, size=(NUM_CLASSES, d))
    X = (centres[np.arange(n) % NUM_CLASSES] + rng.normal(size=(n, d))).astype(np.float32)

    def ours():
        embed(X, (2, 3), seed=0)

    def ref():
        for dim in (2, 3):
            TSNE(n_components=dim, random_state=0).fit_transform(X)

    def warmup():  # the libraries only: openTSNE's FFT grid costs seconds even on 40 points
        importlib.import_module("openTSNE")
        TSNE(n_components=2, random_state=0, max_iter=250).fit_transform(X[:40])

    pairs = alternate(ours, ref, size["repeats"], device, warmup)
    return summarize(pairs, f"{n}x{d}, 2D + 3D, {size['repeats']} repeat(s)", note="10 clusters")


UNLEARN_EPOCHS, UNLEARN_BATCH = 10, 64  # main.py's defaults
RETRAIN_EPOCHS, RETRAIN_BATCH = 30, 128  # train.py's defaults


def rte_setup(size, device):
    """digits (cut to size["train"] samples in smoke mode), a random-10% forget set, the
    model to unlearn and a fresh one to retrain, with its optimizer and schedule."""
    import datasets
    from methods import make_optimizer
    from utils import compute_for

    compute = compute_for(device, size["precision"])
    ds = datasets.load_dataset("digits", device=device)
    if size["train"]:
        n = size["train"]
        ds = datasets.Dataset(ds.name, ds.x_train[:n], ds.y_train[:n], ds.x_test[:n // 4], ds.y_test[:n // 4],
                              ds.classes, ds.flip, ds.crop_pad).to(device)
    split = datasets.make_split(ds, datasets.ForgetSpec(unlearning_rate=0.1), seed=0)
    b = SimpleNamespace(ds=ds, split=split, compute=compute, device=device,
                        model=our_model(size["model"], ds, compute),
                        fresh=our_model(size["model"], ds, compute, seed=1),
                        unlearn_run=our_run(ds, compute, UNLEARN_BATCH, split),
                        retrain_run=our_run(ds, compute, RETRAIN_BATCH, split))
    b.fresh_opt = make_optimizer(b.fresh, 0.1)
    b.sched = torch.optim.lr_scheduler.OneCycleLR(  # as train.py sets it up
        b.fresh_opt, max_lr=0.1, total_steps=RETRAIN_EPOCHS * math.ceil(len(split.retain) / RETRAIN_BATCH),
        pct_start=0.15, cycle_momentum=False)
    return b


def salun_terms(b):
    """Seconds of (saliency mask, one masked rl_split epoch, one metrics.evaluate)."""
    import metrics
    from methods import METHODS, saliency_mask
    mask = {}
    mask_s = timed(lambda: mask.update(m=saliency_mask(b.model, b.unlearn_run, 0.5)), b.device)
    rl_split = METHODS["rl_split"]  # b.unlearn_run has epochs=1: the generator yields one epoch's loss
    epoch_s = timed(lambda: next(rl_split.unlearn(b.model, b.unlearn_run, rl_split.settings(), mask["m"])).item(),
                    b.device)
    eval_s = timed(lambda: metrics.evaluate(b.model, b.ds, b.split, b.compute), b.device)
    return mask_s, epoch_s, eval_s


def retrain_terms(b):
    """Seconds of (one train.py epoch over retain, its validation pass)."""
    import metrics
    from methods import cross_entropy, sgd_pass
    epoch_s = timed(lambda: sgd_pass(b.fresh, b.fresh_opt, b.retrain_run, b.split.retain, cross_entropy,
                                     sched=b.sched).item(), b.device)
    val_s = timed(lambda: metrics.predict(b.fresh, b.ds, b.split.val, b.compute), b.device)
    return epoch_s, val_s


def rte_ratio(size, device, workers):
    """SalUn's wall-clock cost over retraining's, from per-epoch costs on digits:

        salun   = t_mask + 10 * t_rl_split_epoch + t_evaluate
        retrain = 30 * (t_retain_epoch + t_val_pass) + t_evaluate

    SalUn as main.py runs it: the saliency mask (mask_thr 0.5), 10 epochs (main.py's
    default) of rl_split under the mask at batch 64 (main.py's default), one
    metrics.evaluate. Retraining as train.py does it: a fresh model, 30 epochs (train.py's
    default) over retain at batch 128 with SGD + OneCycle, a validation pass after every
    epoch (train.py keeps the best epoch), one metrics.evaluate at the end (the same cost
    as SalUn's). Forget set: a random 10% (SalUn's headline setting). Each term is
    measured once per repeat, after one untimed round of all of them, the SalUn and the
    retraining terms in alternating order; the ratio is the median over repeats. Even at
    equal cost per sample it cannot fall below 10 * (|forget| + |retain|) / (30 * |retain|).
    """
    b = rte_setup(size, device)
    salun_terms(b), retrain_terms(b)  # warm-up
    rows = []
    for r in range(size["repeats"]):
        if r % 2 == 0:
            s, t = salun_terms(b), retrain_terms(b)
        else:
            t, s = retrain_terms(b), salun_terms(b)
        rows.append((s[0] + UNLEARN_EPOCHS * s[1] + s[2], RETRAIN_EPOCHS * (t[0] + t[1]) + s[2], s, t))
    med = [statistics.median(row[k] for row in rows) for k in (0, 1)]
    s = [statistics.median(row[2][k] for row in rows) for k in range(3)]
    t = [statistics.median(row[3][k] for row in rows) for k in range(2)]
    n_f, n_r = len(b.split.forget), len(b.split.retain)
    note = (f"mask {s[0]:.2f}s + {UNLEARN_EPOCHS} x rl_split epoch {s[1]:.2f}s + eval {s[2]:.2f}s vs "
            f"{RETRAIN_EPOCHS} x (retain epoch {t[0]:.2f}s + val {t[1]:.2f}s) + eval; floor at equal "
            f"cost per sample {UNLEARN_EPOCHS * (n_f + n_r) / (RETRAIN_EPOCHS * n_r):.2f}")
    return Result(med[0], med[1], statistics.median(row[0] / row[1] for row in rows),
                  f"digits, {n_f} forget + {n_r} retain (random 10%), {size['repeats']} repeat(s)", note)


RAY_METHODS = ("rl", "ft", "ga_small", "rl_split")  # the fixed list: these, with the mask on every other one


def one_epoch_model(folder, size, device, dataset="digits", *flags):
    """train.py, one epoch: a checkpoint to time unlearning on (its accuracy does not matter)."""
    import subprocess
    from utils import UserError
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                        "--dataset", dataset, "--model", size["model"], "--epochs", "1", "--batch-size", "64",
                        "--precision", size["precision"], "--device", str(device), "-NL", "--save-dir", folder,
                        "--data-dir", data_dir(dataset), *flags], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"train.py for bench.py failed: {r.stderr.strip().splitlines()[-1:]}")


def ray_study(folder, size, device):
    """A digits base model (one epoch of train.py) and the fixed list of unlearning runs on it."""
    one_epoch_model(folder, size, device)
    base = os.path.join(folder, f"{size['model']}_digits_base.pt")
    exps = [{"checkpoint": base, "class_to_forget": 0, "method": RAY_METHODS[i % len(RAY_METHODS)], "lr": 0.01,
             "epochs": 1, "use_mask": i % 2 == 1} for i in range(size["experiments"])]
    path = os.path.join(folder, "ray_runs.json")
    with open(path, "w") as f:
        json.dump(exps, f)
    return path


def main_py(exp_file, folder, size, device, *flags):
    """Seconds of one whole `main.py -L exp_file` (start-up included: Ray's is part of what it costs)."""
    import subprocess
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py"), "-L", exp_file,
           "--nexp", str(size["nexp"]), "-NL", "--save", "none", "--out", folder, "--device", str(device),
           "--precision", size["precision"], *flags]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(flags) or 'local'}: main.py failed: {r.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def ray_runs_ratio(size, device, workers):
    """Throughput of a fixed list of digits runs (RAY_METHODS, one epoch each, --nexp runs) with
    `main.py --executor ray` on a Ray it starts on this machine, over the same list with the local
    executor: whole main.py processes, Ray's start-up and its workers' data loading included.
    Both with their defaults, so a CPU worker computes with the threads a local run uses."""
    import tempfile
    import ray  # noqa: F401  (a missing Ray is an error row, not a failed main.py)
    with tempfile.TemporaryDirectory() as folder:
        exp_file = ray_study(folder, size, device)
        pairs = []
        for r in range(size["repeats"]):
            order = ("ray", "local") if r % 2 == 0 else ("local", "ray")
            t = {name: main_py(exp_file, folder, size, device, "--executor", name) for name in order}
            pairs.append((t["ray"], t["local"]))
    runs = size["experiments"] * size["nexp"]
    res = summarize(pairs, f"{runs} digits runs of {size['model']}, 1 epoch each, {size['repeats']} repeat(s)")
    res.note = f"{60 * runs / res.ours_s:.1f} vs {60 * runs / res.reference_s:.1f} runs/min (ray vs local)"
    return res


def ray_gpu_packing(size, device, workers):
    """Runs per minute of the same list on one GPU with 1, 2, 4 and 8 runs packed on it
    (--gpus-per-run 1, 0.5, 0.25, 0.125); the ratio is 8 per GPU over 1 per GPU."""
    import tempfile
    import ray  # noqa: F401
    if device.type != "cuda":
        raise RuntimeError("ray_gpu_packing needs a CUDA device")
    per_gpu = (1, 2, 4, 8)
    with tempfile.TemporaryDirectory() as folder:
        exp_file = ray_study(folder, size, device)
        seconds = {n: main_py(exp_file, folder, size, device, "--executor", "ray", "--gpus-per-run", str(1 / n))
                   for n in per_gpu}
    runs = size["experiments"] * size["nexp"]
    return Result(seconds[8], seconds[1], seconds[1] / seconds[8], f"{runs} digits runs of {size['model']}",
                  "runs/min at " + ", ".join(f"{n}/GPU: {60 * runs / seconds[n]:.1f}" for n in per_gpu))


def data_dir(dataset):
    """Where the dataset is: Debian's folder for an installed dataset-fashion-mnist, else the default."""
    import datasets
    debian = datasets.DEBIAN_FASHION_MNIST
    return debian if dataset == "fashionmnist" and os.path.isdir(debian) else datasets.DEFAULT_DATA_DIR


def overheads(folder, size, device, dataset):
    """((trial wall, RTE, ratio), (main.py run wall, RTE, ratio)), medians over repeats, on one
    dataset; None when it is not installed."""
    import datasets
    import tuning
    from experiments import Experiment
    from unlearning import prepare, unlearn
    from utils import Logger, compute_for
    try:
        datasets.load_dataset(dataset, data_dir(dataset))
    except datasets.DatasetMissing:
        return None
    for flags in ((), ("--cf", "0")):
        one_epoch_model(folder, size, device, dataset, *flags)
    path = lambda tail: os.path.join(folder, f"{size['model']}_{dataset}_{tail}.pt")  # noqa: E731
    compute, quiet = compute_for(device, size["precision"]), Logger(False, "", "", {})
    cache = {"data_dir": data_dir(dataset)}
    trial = Experiment(checkpoint=path("base"), class_to_forget=0, retrained=path("cf0"), method="rl", lr=0.01,
                       epochs=1)
    task = {"experiment": vars(trial), "params": {}, "weights": tuning.DEFAULT_WEIGHTS,
            "retain_sample": tuning.RETAIN_SAMPLE, "history": None}
    run = Experiment(checkpoint=path("base"), class_to_forget=0, method="boundary_shrink", lr=0.01, epochs=5)
    tuning.run_trial(task, compute, cache, quiet)  # warm-up: data, models, gold evaluation
    ctx = prepare(run, compute, cache)
    trials, runs = [], []
    for _ in range(size["repeats"]):
        out = tuning.run_trial(task, compute, cache, quiet)
        trials.append((out["wall_s"], out["rte_s"]))
        start = time.perf_counter()
        result = unlearn(run, ctx, 0, quiet)[2]
        runs.append((time.perf_counter() - start, result["rte_s"]))
    return [(statistics.median(w for w, _ in x), statistics.median(r for _, r in x),
             statistics.median(w / r for w, r in x)) for x in (trials, runs)]


def trial_overhead(size, device, workers):
    """A tune.py trial's wall time over its unlearning time (rl, one epoch, class 0: the trial
    evaluates the forget set, the validation set and 1000 retain samples once), on the largest
    of size["datasets"] installed; the note gives every dataset's, and main.py's for a 5-epoch
    forget-set method (boundary_shrink: curve points from samples, one full evaluation at the end,
    with the attacks). One-epoch models of train.py: their accuracy does not change the cost."""
    import tempfile
    measured = {}
    with tempfile.TemporaryDirectory() as folder:
        for dataset in size["datasets"]:
            got = overheads(folder, size, device, dataset)
            if got:
                measured[dataset] = got
    last = list(measured)[-1]
    (wall, rte, ratio), _ = measured[last]
    note = "; ".join(f"{d}: trial {t[2]:.2f} ({t[0]:.1f}s / {t[1]:.1f}s), main.py 5-epoch boundary_shrink "
                     f"{r[2]:.2f} ({r[0]:.1f}s / {r[1]:.1f}s)" for d, (t, r) in measured.items())
    return Result(wall, rte, ratio, f"{last}, {size['model']}, {size['repeats']} repeat(s)", note)


ROWS = {  # name -> (function, direction, goal)
    "seed_pipeline_speedup": (seed_pipeline_speedup, ">=", 8.0),
    "data_path_speedup": (data_path_speedup, ">=", 10.0),
    "data_overhead": (data_overhead, "<=", 1.10),
    "mask_speedup": (mask_speedup, ">=", 5.0),
    "wasserstein_speedup": (wasserstein_speedup, ">=", 100.0),
    "tsne_speedup": (tsne_speedup, ">=", 2.5),
    "rte_ratio": (rte_ratio, "<=", 0.10),
    "ray_runs_ratio": (ray_runs_ratio, ">=", 0.8),
    "trial_overhead": (trial_overhead, "<=", 1.3),
}
if torch.cuda.is_available():  # packing runs on a GPU means nothing without one
    ROWS["ray_gpu_packing"] = (ray_gpu_packing, ">=", 1.0)


# ---------------------------------------------------------------- output

def fmt_s(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(records):
    head = ("figure", "ours", "reference", "ratio", "goal", "met?", "size", "note")
    lines = []
    for name, rec in records.items():
        if "error" in rec:
            lines.append((name, "-", "-", "-", "-", "error", "", rec["error"]))
            continue
        lines.append((name, fmt_s(rec["ours_s"]), fmt_s(rec["reference_s"]), f"{rec['ratio']:.3g}",
                      f"{rec['direction']} {rec['goal']:g}", "yes" if rec["met"] else "NO",
                      rec["size"], rec["note"]))
    widths = [max(len(str(row[k])) for row in [head] + lines) for k in range(len(head))]
    out = [" | ".join(str(v).ljust(w) for v, w in zip(head, widths)),
           "-|-".join("-" * w for w in widths)]
    out += [" | ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in lines]
    return "\n".join(line.rstrip() for line in out)


def run_row(name, mode, device, workers, precision):
    fn, direction, goal = ROWS[name]
    start = time.perf_counter()
    try:
        r = fn({**SIZES[mode][name], "model": MODEL[mode], "precision": precision}, device, workers)
    except ImportError as e:
        return {"error": f"cannot import {e.name or e} ({e})", "goal": goal, "direction": direction}
    met = r.ratio >= goal if direction == ">=" else r.ratio <= goal
    print(f"{name}: {r.ratio:.3g} ({direction} {goal:g}: {'met' if met else 'NOT met'}) "
          f"in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return {"ours_s": r.ours_s, "reference_s": r.reference_s, "ratio": r.ratio, "goal": goal,
            "direction": direction, "met": met, "size": r.size, "note": r.note, "mode": mode,
            "device": str(device), "precision": precision}


def build_parser():
    p = argparse.ArgumentParser(description="Benchmark our pipeline against the original toolkit's way.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: under 3 minutes on 2 CPU cores")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes: checks that every row runs, not the speed")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of: " + ", ".join(ROWS) + "; None: all of them")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader worker processes of the references (on 2 idle CPU cores the PIL "
                        "data path alone runs 1.5x faster with 2 than with 0, and training runs as fast)")
    p.add_argument("--json", default=None, help="write the figures to this file; None: print the table only")
    from utils import add_precision_flag
    add_precision_flag(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    from utils import UserError, announce_compute, atomic_write_text, compute_for, default_precision, get_device
    args = parse_args(argv)
    rows = ",".join(ROWS) if args.rows is None else args.rows
    names = [n.strip() for n in rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise UserError(f"unknown row(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ROWS)}")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = get_device(args.device)
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    asked = args.precision or default_precision()
    compute = compute_for(device, asked)
    announce_compute(compute, asked)
    precision = compute.precision
    print(f"bench: {mode} mode on {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})", file=sys.stderr, flush=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    records = {name: run_row(name, mode, device, args.workers, precision) for name in names}
    print(table(records))
    if "rte_ratio" in records:
        print(f"rte_ratio = (mask + {UNLEARN_EPOCHS} x rl_split epoch + evaluate) / "
              f"({RETRAIN_EPOCHS} x (retain epoch + val pass) + evaluate), each term measured on digits")
    # other work on the machine skews every row: the load average says how much there was
    print(f"({mode} mode, {device}, {precision}, {time.perf_counter() - start:.0f}s; 1-min load average "
          f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores)")
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
    if any("error" in rec for rec in records.values()):
        sys.exit(1)


if __name__ == "__main__":
    from utils import cli
    cli(main)
