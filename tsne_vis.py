"""2D, 3D and rotating 3D t-SNE plots of every features file in the listed folders.

    python tsne_vis.py -S 3000
    python tsne_vis.py -S 3000 --folders features/checkpoints features/output/<run> --proto

Edit `folders` below, or pass --folders. For features/<path>/<stem>.json (first S
samples) it writes images/<path>/tsne_2D/<stem>.png, tsne_3D/<stem>.png and
tsne_animated/<stem>.gif. Colour = class; black rings = the samples the model forgot;
--proto adds the class prototypes (classifier weight rows) as stars.

Files that forgot the same thing on the same dataset (in any of the folders) are
embedded together, once, and split back, so that their plots come from one map (each
framed on its own points, as different models land in different parts of it); files
that forgot different things get separate maps.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from PIL import Image

from latent import FEATURES_ROOT, SAMPLES, SAMPLES_HELP, embed, read_folders, relative_name
from utils import UserError, atomic_write, check_writable, cli

folders = [  # e.g. "features/reduced/base", "features/reduced/rl_split"; empty: every folder under features/
]

IMAGES_ROOT = "images"
GIF_FRAMES = 24
GIF_DPI = 60
GIF_FPS = 8


def build_parser():
    p = argparse.ArgumentParser(description="2D, 3D and animated t-SNE plots of features files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-S", "--samples", type=int, default=SAMPLES, help=SAMPLES_HELP + " of each features file")
    p.add_argument("--folders", nargs="+", default=folders,
                   help="features folders; default: the `folders` list at the top of this script, "
                        "or every folder under features/ when it is empty")
    p.add_argument("--proto", action="store_true", help="embed and draw the class prototypes")
    p.add_argument("--no-gif", action="store_true", help="skip the rotating 3D GIF")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed (the same seed gives the same plots)")
    p.add_argument("--jobs", type=int, default=-1,
                   help="t-SNE threads; -1: all cores (on a busy machine 1 is faster)")
    p.add_argument("--out", default=IMAGES_ROOT,
                   help="folder the script writes under, mirroring the features tree")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------- embedding

def joint_groups(by_folder):
    """Files that forgot the same thing on the same dataset (and embed in the same space)."""
    groups = {}
    for files in by_folder.values():
        for f in files:
            groups.setdefault((*f.target, f.features.shape[1]), []).append(f)
    return list(groups.values())


def points_of(f, proto):
    """What goes into the embedding for file f: its samples, then its prototypes if asked."""
    if proto and f.proto.shape[1] == f.features.shape[1]:
        return np.vstack([f.features, f.proto])
    return f.features


def embed_jointly(group, proto, seed, n_jobs):
    """Concatenate the group's points, embed once per dimension (2D, 3D), split back per
    file: for each file [(y, bounds)] per dimension. One t-SNE for the whole group puts
    every file's points in one map; different models' features land in different parts
    of it, so each plot is framed on its own points."""
    parts = [points_of(f, proto) for f in group]
    per_file = [[] for _ in group]
    for y in embed(np.vstack(parts), (2, 3), seed, n_jobs):
        for out, part in zip(per_file, np.split(y, np.cumsum([len(p) for p in parts])[:-1])):
            pad = 0.04 * (part.max(0) - part.min(0))
            out.append((part, list(zip(part.min(0) - pad, part.max(0) + pad))))
    return per_file


# ---------------------------------------------------------------- plotting

def class_colors(n):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def draw(ax, f, y, colors):
    """Samples by class colour, forgotten ones ringed in black, prototypes as stars."""
    n = len(f.labels)
    pts, protos = y[:n], y[n:]
    size = 4 if n > 2000 else 8 if n > 500 else 16
    c = np.asarray(colors)[f.labels]
    flat = {"depthshade": False} if pts.shape[1] == 3 else {}  # 3D fading hides the class colours
    ax.scatter(*pts.T, c=c, s=size, linewidths=0, **flat)
    if len(f.forget_idx):
        ax.scatter(*pts[f.forget_idx].T, facecolors="none", edgecolors="black", s=size * 4, linewidths=0.4)
    if len(protos):
        ax.scatter(*protos.T, c=colors[:len(protos)], marker="*", s=220, edgecolors="black", linewidths=0.8)


def legend_entries(f, colors, has_proto):
    handles, names = [], []
    for i, name in enumerate(f.classes):
        handles.append(Line2D([], [], marker="o", linestyle="", color=colors[i], markersize=6))
        names.append(f"{name} (forgotten)" if i == f.forget_class else name)
    if len(f.forget_idx):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                              markeredgecolor="black", markersize=7))
        names.append(f"forgotten samples ({len(f.forget_idx)})")
    if has_proto:
        handles.append(Line2D([], [], marker="*", linestyle="", color="0.5", markeredgecolor="black",
                              markersize=11))
        names.append("class prototype")
    return handles, names


def title(f):
    return (f"{relative_name(f.path.parent, FEATURES_ROOT)}/{f.stem}\n{f.model} on {f.dataset}, "
            f"forgot {f.forgets}, {len(f.labels)} samples")


def figure(f, embedded, colors):
    """Axes on the left, the legend just right of them (in columns of 25 for many classes)."""
    y, bounds = embedded
    dim = y.shape[1]
    handles, names = legend_entries(f, colors, has_proto=len(y) > len(f.labels))
    ncol = 1 + (len(names) - 1) // 25
    width = 0.76 - 0.1 * (ncol - 1)
    fig = plt.figure(figsize=(9, 6.5), dpi=110)
    ax = fig.add_axes([0.02, 0.03, width, 0.85], **({"projection": "3d"} if dim == 3 else {}))
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(0.03 + width, 0.45), ncol=ncol,
               fontsize=8 if ncol == 1 else 6, frameon=False, title="class", title_fontsize=9)
    draw(ax, f, y, colors)
    for axis, (lo, hi) in zip("xyz", bounds):
        getattr(ax, f"set_{axis}lim")(lo, hi)
        getattr(ax, f"set_{axis}ticks")([])  # t-SNE coordinates carry no meaning
    if dim == 3:
        ax.set_box_aspect(None, zoom=1.2)  # the default leaves a wide empty margin around the cube
    fig.suptitle(title(f), fontsize=10)
    return fig, ax


def save_png(fig, path):
    atomic_write(path, lambda out: fig.savefig(out, format="png"))


def save_gif(fig, ax, path):
    """A full turn around the vertical axis, small: few frames at low dpi.

    Everything but the 3D axes (title, legend) is drawn once and each frame redraws the
    axes alone over it: half the time of drawing whole frames, the same pixels.
    """
    fig.set_dpi(GIF_DPI)
    canvas = fig.canvas
    ax.set_visible(False)
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    ax.set_visible(True)
    frames = []
    for i in range(GIF_FRAMES):
        ax.view_init(elev=20, azim=45 + i * 360 / GIF_FRAMES)
        canvas.restore_region(background)
        ax.draw(canvas.get_renderer())
        frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB"))
    atomic_write(path, lambda out: frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=1000 // GIF_FPS, loop=0))


def plot_file(f, embedded_2d, embedded_3d, root, gif):
    out = Path(root) / relative_name(f.path.parent, FEATURES_ROOT)
    colors = class_colors(len(f.classes))
    fig, _ = figure(f, embedded_2d, colors)
    save_png(fig, out / "tsne_2D" / f"{f.stem}.png")
    plt.close(fig)
    fig, ax = figure(f, embedded_3d, colors)
    ax.view_init(elev=20, azim=45)
    save_png(fig, out / "tsne_3D" / f"{f.stem}.png")
    if gif:
        save_gif(fig, ax, out / "tsne_animated" / f"{f.stem}.gif")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.samples < 4:
        raise UserError("-S/--samples must be at least 4")
    by_folder = read_folders(args.folders, args.samples)
    check_writable(args.out, "--out")
    for group in joint_groups(by_folder):
        n = sum(len(points_of(f, args.proto)) for f in group)
        print(f"t-SNE of {len(group)} file(s) that forgot {group[0].forgets} ({n} points)", flush=True)
        for f, (a, b) in zip(group, embed_jointly(group, args.proto, args.seed, args.jobs)):
            plot_file(f, a, b, args.out, not args.no_gif)
    print(f"plots under {args.out}/")


if __name__ == "__main__":
    cli(main)
