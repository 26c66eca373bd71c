"""Class-by-class Wasserstein distances of the embeddings, and how they change between folders.

    python wasserstein.py -S 1000
    python wasserstein.py -S 1000 --folders features/checkpoints features/output/<run>

Edit `folders` below, or pass --folders. For every features/<path>/<stem>.json (first
S samples) it writes under images/<path>/wasserstein/:

    <stem>.png / .csv / .json    the C x C matrix of exact 1-Wasserstein distances between
                                 the embeddings of every two classes (euclidean cost)
    vs_<other>/<stem>_minus_<other stem>.png / .csv / .json
                                 the delta against a file of an earlier folder

Pairing for the deltas: for every two folders A before B in the list, each file b of B
is compared with the file of A that has the same checkpoint stem; without one, with
every file of A (same dataset) that forgot the same thing as b (e.g. the retrained gold
standard: what is left to close) and every one that forgot nothing (the base model:
what unlearning changed). The delta is D(b) - D(a): positive where b holds two classes
farther apart than a does.

Colour scales: the distance heatmaps of one dataset share one scale (so folders compare
at a glance); the deltas of each two folders share one symmetric scale centred on 0.
"""
import argparse
import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt
import numpy as np

from latent import FEATURES_ROOT, SAMPLES, SAMPLES_HELP, class_distances, read_folders, relative_name
from plots import heatmap
from utils import UserError, atomic_write, atomic_write_text, check_writable, cli

folders = [  # e.g. "features/reduced/base", "features/reduced/rl_split"; empty: every folder under features/
]

IMAGES_ROOT = "images"


def build_parser():
    p = argparse.ArgumentParser(description="Class-by-class Wasserstein distance matrices of features "
                                            "files, and their deltas between folders.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-S", "--samples", type=int, default=SAMPLES, help=SAMPLES_HELP + " of each features file")
    p.add_argument("--folders", nargs="+", default=folders,
                   help="features folders; default: the `folders` list at the top of this script, "
                        "or every folder under features/ when it is empty")
    p.add_argument("--out", default=IMAGES_ROOT,
                   help="folder the script writes under, mirroring the features tree")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------- which files are compared

def partners(b, files_a):
    """The files of an earlier folder that b is compared with (see the module docstring)."""
    same_data = [a for a in files_a if a.dataset == b.dataset and len(a.classes) == len(b.classes)]
    same_stem = [a for a in same_data if a.stem == b.stem]
    return same_stem or [a for a in same_data if a.target == b.target or not a.forget]


# ---------------------------------------------------------------- plots and files

def class_labels(f):
    """Class names, the forgotten class flagged (and drawn red by heatmap)."""
    labels = list(f.classes)
    c = f.forget_class
    if c is not None and 0 <= c < len(labels):
        labels[c] = f"{labels[c]} (forgotten)"
        return labels, {labels[c]}
    return labels, set()


def with_ext(base, ext):
    """base + ext; not Path.with_suffix, which would cut a stem like `01_rl_mask0.2_class-0`."""
    return base.with_name(base.name + ext)


def save_numbers(base, m, classes, extra):
    """base.csv (a table with class names) and base.json (the matrix, NaN as null, plus `extra`)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class"] + list(classes))
    for name, row in zip(classes, m):
        w.writerow([name] + [f"{v:.6g}" for v in row])
    atomic_write_text(with_ext(base, ".csv"), buf.getvalue())
    record = {**extra, "classes": list(classes),
              "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in m]}
    atomic_write_text(with_ext(base, ".json"), json.dumps(record, indent=1))


def save_matrix(base, m, f, title, cmap, vmin, vmax, cbar, extra):
    """base.png (the heatmap), base.csv and base.json (the numbers)."""
    labels, marked = class_labels(f)
    shown = m.copy()
    np.fill_diagonal(shown, np.nan)  # zero by definition; it would only stretch the scale
    size = max(6.0, 0.35 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=110)
    heatmap(ax, shown, labels, cmap, vmin, vmax, cbar, marked)
    ax.set_title(title, fontsize=10)
    atomic_write(with_ext(base, ".png"), lambda out: fig.savefig(out, format="png", bbox_inches="tight"))
    plt.close(fig)
    save_numbers(base, m, f.classes, extra)


def off_diagonal_range(matrices):
    vals = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m in matrices])
    vals = vals[np.isfinite(vals)]
    return (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)


def image_dir(f, root):
    return Path(root) / relative_name(f.path.parent, FEATURES_ROOT) / "wasserstein"


def write_distances(by_folder, dists, root):
    by_dataset = {}
    for files in by_folder.values():
        for f in files:
            by_dataset.setdefault(f.dataset, []).append(dists[f.path])
    scale = {name: off_diagonal_range(ms) for name, ms in by_dataset.items()}
    for folder, files in by_folder.items():
        for f in files:
            title = (f"Wasserstein distance between classes\n{relative_name(folder, FEATURES_ROOT)}/"
                     f"{f.stem}: {f.model} on {f.dataset}, forgot {f.forgets}, {len(f.labels)} samples")
            extra = {"features": str(f.path), "samples": len(f.labels), "forget": f.forget}
            save_matrix(image_dir(f, root) / f.stem, dists[f.path], f, title, "viridis",
                        *scale[f.dataset], "1-Wasserstein distance", extra)


def delta_pairs(by_folder):
    """(folder A, folder B, a, b) for every two folders A before B and each pairing."""
    names = list(by_folder)
    return [(fa, fb, a, b) for i, fa in enumerate(names) for fb in names[i + 1:]
            for b in by_folder[fb] for a in partners(b, by_folder[fa])]


def symmetric_limit(matrices):
    top = max((float(np.nanmax(np.abs(m))) for m in matrices if np.isfinite(m).any()), default=0.0)
    return top or 1e-12  # identical folders: an all-zero delta, still drawn centred


def write_deltas(by_folder, dists, root):
    """The delta of every pairing; one symmetric scale per two folders (and dataset)."""
    pairs = delta_pairs(by_folder)
    deltas = [dists[b.path] - dists[a.path] for _, _, a, b in pairs]
    comparison = [(fa, fb, b.dataset) for fa, fb, _, b in pairs]
    limit = {key: symmetric_limit([d for k, d in zip(comparison, deltas) if k == key])
             for key in set(comparison)}
    for (fa, fb, a, b), key, delta in zip(pairs, comparison, deltas):
        rel_a, rel_b = relative_name(fa, FEATURES_ROOT), relative_name(fb, FEATURES_ROOT)
        base = image_dir(b, root) / f"vs_{'_'.join(rel_a.parts)}" / f"{b.stem}_minus_{a.stem}"
        title = (f"Wasserstein distance delta\n{rel_b}/{b.stem} (forgot {b.forgets})\n"
                 f"minus {rel_a}/{a.stem} (forgot {a.forgets})")
        extra = {"minuend": str(b.path), "subtrahend": str(a.path), "samples": len(b.labels)}
        save_matrix(base, delta, b, title, "RdBu_r", -limit[key], limit[key],
                    "delta of 1-Wasserstein distance", extra)
    return len(pairs)


def main(argv=None):
    args = parse_args(argv)
    if args.samples < 2:
        raise UserError("-S/--samples must be at least 2")
    by_folder = read_folders(args.folders, args.samples)
    check_writable(args.out, "--out")
    dists = {}
    for files in by_folder.values():
        for f in files:
            dists[f.path] = class_distances(f.features, f.labels, len(f.classes))
            print(f"{f.path}: {len(f.labels)} samples, {len(f.classes)} classes")
    write_distances(by_folder, dists, args.out)
    n_deltas = write_deltas(by_folder, dists, args.out)
    print(f"{len(dists)} distance matrices and {n_deltas} deltas under {args.out}/")


if __name__ == "__main__":
    cli(main)
