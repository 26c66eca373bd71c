"""Figures shared by the scripts: a run's summary, its saliency masks, annotated heatmaps.

    plots.plot_summary("output/<run>/summary.png", table)   # main.py, at the end of a run
    plots.plot_tradeoff("output/<run>/tradeoff.png", table)
    plots.plot_curves("output/<run>/curves.png", table, results)
    plots.plot_representation_layers("output/<run>/layers.png", table)   # main.py --representations
    plots.plot_masks("output/<run>")                        # main.py and mask_vis.py
    plots.heatmap(ax, matrix, labels, "viridis", 0, 1, "distance")  # wasserstein.py, masks
    plots.plot_epsilons("output/<audit>/epsilon.png", rows, n, "official")  # audit.py
    plots.plot_rocs("output/<audit>/roc.png", rows)
    plots.plot_tuning("output/<tuning>/tuning/<name>.png", name, keys, log_keys, points)  # tune.py

Files only: matplotlib never needs a display here.
"""
import csv
import io
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import torch

from datasets import ForgetSpec
from privacy import ATTACKS, BUCKET
from utils import atomic_write, atomic_write_text, load_mask

ANNOTATE_MAX = 12  # above this many classes the cell numbers become unreadable


# ---------------------------------------------------------------- a run's summary

DPI = 100
MAX_WIDTH_IN = 15  # figures stay at most 1500 px wide
REFERENCES = {"base (before)": ("black", "*"), "gold standard": ("goldenrod", "P")}
PANELS = (("UA", "UA: 100 − forget acc. (%)"), ("RA", "RA: retain acc. (%)"), ("TA", "TA: test acc. (%)"),
          ("MIA", "MIA-efficacy (%)"), ("avg_gap", "Avg. Gap to gold (lower = better)"), ("rte_s", "RTE (s)"))
MASK_MARKERS = "sD^vph<>"


def method_colours(table):
    methods = list(dict.fromkeys(r["method"] for r in table if r["experiment"] not in REFERENCES))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def mask_markers(table):
    masks = sorted({r["mask"] for r in table if r["mask"] != "-" and r["experiment"] not in REFERENCES}, key=float)
    return {"-": "o", **{m: MASK_MARKERS[i % len(MASK_MARKERS)] for i, m in enumerate(masks)}}


def legend(fig, colours, markers, reference_style, method_style, mask_size):
    """The figure's legend: the base and gold references, a colour per method, a marker per mask."""
    handles = [Line2D([], [], color=c, marker=m, label=label, **reference_style)
               for label, (c, m) in REFERENCES.items()]
    handles += [Line2D([], [], color=c, marker="o", label=m, **method_style) for m, c in colours.items()]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="", markersize=mask_size,
                       label="no mask" if k == "-" else f"mask {k}") for k, m in markers.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)


def save(fig, path):
    atomic_write(path, lambda out: fig.savefig(out, format="png", dpi=DPI))
    plt.close(fig)


def plot_summary(path, table):
    """One panel per metric, experiments on one shared vertical axis (base and gold rows
    included), bars coloured by method, the mean ± std written beside each bar."""
    panels = [(k, title) for k, title in PANELS if any(k in r for r in table)]
    colours = method_colours(table)
    n = len(table)
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False,
                             figsize=(MAX_WIDTH_IN, 1.3 + 0.28 * n), dpi=DPI, layout="constrained")
    ys = np.arange(n)[::-1]
    for ax, (k, title) in zip(axes[0], panels):
        for y, r in zip(ys, table):
            if k not in r:
                continue
            mean, std = r[k]
            colour = REFERENCES.get(r["experiment"], (colours.get(r["method"]),))[0]
            ax.barh(y, mean, xerr=std if r.get("runs", 1) > 1 else None, color=colour, height=0.7,
                    error_kw={"elinewidth": 0.8, "capsize": 2})
            ax.text(mean + (std if r.get("runs", 1) > 1 else 0), y, f" {mean:.3g}", va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.25)
        ax.set_ylim(-0.6, n - 0.4)
        ax.grid(axis="x", alpha=0.3)
    several_specs = len({r["forget"] for r in table}) > 1
    labels = [f"{r['experiment']}, {r['forget']}" if several_specs and r["experiment"] in REFERENCES
              else r["experiment"] for r in table]
    axes[0][0].set_yticks(ys, labels, fontsize=8)
    fig.suptitle("Unlearning summary: mean ± std over runs; colour = method, black = base, gold = gold standard",
                 fontsize=10)
    save(fig, path)


def plot_tradeoff(path, table):
    """Forgetting (UA) against utility (TA, RA): one point per experiment with its ± as
    error bars, one row of panels per forget set; colour = method, marker = mask threshold."""
    specs = list(dict.fromkeys(r["forget"] for r in table))
    colours, markers = method_colours(table), mask_markers(table)
    fig, axes = plt.subplots(len(specs), 2, squeeze=False, figsize=(13, 0.6 + 4.4 * len(specs)), dpi=DPI,
                             layout="constrained")
    for row_axes, spec in zip(axes, specs):
        rows = [r for r in table if r["forget"] == spec and "UA" in r]
        for ax, k in zip(row_axes, ("TA", "RA")):
            for r in rows:
                if k not in r:
                    continue
                (x, dx), (y, dy) = r["UA"], r[k]
                colour, marker = REFERENCES.get(r["experiment"], (colours.get(r["method"]), markers[r["mask"]]))
                size = 14 if r["experiment"] in REFERENCES else 7
                several = r.get("runs", 1) > 1
                ax.errorbar(x, y, xerr=dx if several else None, yerr=dy if several else None, fmt=marker,
                            color=colour, markersize=size, markeredgecolor="black", markeredgewidth=0.5,
                            elinewidth=0.8, capsize=2, alpha=0.9)
            ax.set_xlabel("UA: 100 − accuracy on the forget set (%); higher = forgets more", fontsize=9)
            ax.set_ylabel(f"{k}: {'test' if k == 'TA' else 'retain'} accuracy (%)", fontsize=9)
            ax.set_title(f"forget {spec}: forgetting vs {'test' if k == 'TA' else 'retain'} accuracy", fontsize=10)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    legend(fig, colours, markers, dict(linestyle="", markersize=10, markeredgecolor="black"),
           dict(linestyle="", markersize=7), 7)
    save(fig, path)


LAYER_PANELS = (("probe", "probe: forgotten class (%)"), ("cka_gold", "CKA to the gold standard"),
                ("cka_base", "CKA to the base model"))


def plot_representation_layers(path, table):
    """Where the class disappears, stage by stage (main.py --representations): the probe's
    accuracy on the forgotten class and the CKA to the gold standard and to the base model at
    the output of every stage, one line per experiment (colour = method, marker = mask), the
    base and gold models dashed; beside them the share of each stage's weights the mask keeps.
    One row of panels per forget set."""
    rows = [r for r in table if r.get("stages")]
    specs = list(dict.fromkeys(r["forget"] for r in rows))
    colours, markers = method_colours(table), mask_markers(table)
    masked = any(r["stages"].get("mask") for r in rows)
    ncols = len(LAYER_PANELS) + masked
    fig, axes = plt.subplots(len(specs), ncols, squeeze=False, figsize=(min(MAX_WIDTH_IN, 4.6 * ncols + 2.5),
                                                                        0.8 + 3.8 * len(specs)),
                             dpi=DPI, layout="constrained")
    for row_axes, spec in zip(axes, specs):
        here = [r for r in rows if r["forget"] == spec]
        names = here[0]["stages"]["name"]
        x = np.arange(len(names))
        for ax, (key, title) in zip(row_axes, LAYER_PANELS):
            for r in here:
                values = r["stages"].get(key)
                if not values:
                    continue
                if r["experiment"] in REFERENCES:
                    colour, marker = REFERENCES[r["experiment"]]
                    ax.plot(x, values, color=colour, linestyle="--", linewidth=2, marker=marker, markersize=8, zorder=3)
                else:
                    ax.plot(x, values, color=colours.get(r["method"]), marker=markers[r["mask"]], markersize=5,
                            linewidth=1, alpha=0.85)
            ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"forget {spec}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if not ax.lines:
                ax.text(0.5, 0.5, "class forgetting only", transform=ax.transAxes, ha="center", color="0.5")
        if masked:  # a mask depends on the checkpoint, forget set and threshold: one bar per distinct one
            ax = row_axes[-1]
            shares = {}  # the same shares -> (shares, thresholds), stages in model order
            for r in here:
                if r["stages"].get("mask"):
                    key = json.dumps(r["stages"]["mask"], sort_keys=True)
                    shares.setdefault(key, (r["stages"]["mask"], []))[1].append(r)
            stages = list(dict.fromkeys(s for share, _ in shares.values() for s in share))
            width = 0.8 / max(1, len(shares))
            greys = plt.get_cmap("Greys")(np.linspace(0.4, 0.85, len(shares)))
            for i, (share, users) in enumerate(shares.values()):
                methods = list(dict.fromkeys(r["method"] for r in users))
                label = "mask " + "/".join(dict.fromkeys(r["mask"] for r in users)) + ": " + (
                    ", ".join(methods) if len(methods) <= 2 else f"{len(methods)} methods")
                ax.bar(np.arange(len(stages)) + (i - (len(shares) - 1) / 2) * width,
                       [share.get(s, np.nan) for s in stages], width, color=greys[i], label=label)
            ax.set_xticks(np.arange(len(stages)), stages, rotation=30, ha="right", fontsize=8)
            ax.set(ylim=(0, 1.25), yticks=np.linspace(0, 1, 6))
            ax.legend(fontsize=7, frameon=False, loc="upper center", ncol=1 if len(shares) > 1 else 2)
            ax.set_title(f"forget {spec}: weights the mask keeps", fontsize=9)
            ax.tick_params(labelsize=8)
    legend(fig, colours, markers, dict(linestyle="--", markersize=8), dict(linestyle="-", markersize=5), 6)
    save(fig, path)


CURVES_PER_ROW = 10  # one colour each: more experiments wrap onto further rows of panels


def plot_curves(path, table, results):
    """UA, RA and TA after every epoch of every experiment (mean over its finished runs),
    from the history in results.jsonl, starting at epoch 0 from the base model's values
    (except for a method that trains a new model); a row of panels per forget set and per
    ten experiments, the gold standard's values dotted black."""
    from methods import METHODS
    experiments = [r for r in table if r["experiment"] not in REFERENCES]
    specs = list(dict.fromkeys(r["forget"] for r in experiments))
    groups = []
    for spec in specs:
        mine = [r for r in experiments if r["forget"] == spec]
        groups += [(spec, mine[i:i + CURVES_PER_ROW]) for i in range(0, len(mine), CURVES_PER_ROW)]
    if not groups:
        return
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(groups), 3, squeeze=False, figsize=(MAX_WIDTH_IN, 0.6 + 3.4 * len(groups)),
                             dpi=DPI, layout="constrained")
    for row_axes, (spec, rows) in zip(axes, groups):
        before, gold = (next((r for r in table if r["experiment"] == name and r["forget"] == spec), None)
                        for name in REFERENCES)
        handles, longest = [], 1
        for j, r in enumerate(rows):
            runs = [x["history"] for x in results if x.get("name") == r["experiment"] and x.get("history")]
            if not runs:
                continue
            epochs = list(range(1, min(map(len, runs)) + 1))
            longest = max(longest, len(epochs))
            start = before if before and not METHODS[r["method"]].fresh_model else None
            style = {"color": cmap(j), "marker": "o", "markersize": 3, "linewidth": 1.2}
            for ax, k in zip(row_axes, ("UA", "RA", "TA")):
                values = [np.mean([h[e - 1][k] for h in runs]) for e in epochs]
                ax.plot(([0] if start else []) + epochs, ([start[k][0]] if start else []) + values, **style)
            handles.append(Line2D([], [], label=r["experiment"], **style))
        for ax, (k, title) in zip(row_axes, PANELS[:3]):
            if gold and k in gold:
                ax.axhline(gold[k][0], color="black", linestyle=":", linewidth=1.5)
            ax.set_title(f"forget {spec}: {title}", fontsize=9)
            ax.set_xlabel("epoch (0: the base model)", fontsize=9)
            ax.set_xlim(-0.3, longest + 0.3)
            ax.set_xticks(range(0, longest + 1, max(1, longest // 10)))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        if gold:
            handles.append(Line2D([], [], color="black", linestyle=":", label="gold standard"))
        row_axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    save(fig, path)


# ---------------------------------------------------------------- heatmaps

def heatmap(ax, m, labels, cmap, vmin, vmax, colorbar_label, marked=()):
    """An annotated matrix; NaN cells grey, labels in `marked` drawn in red."""
    cmap = plt.get_cmap(cmap).with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, label=colorbar_label, fraction=0.046, pad=0.04)
    n = len(labels)
    step = max(1, n // 25)  # at most ~25 tick labels per axis
    ticks = np.arange(0, n, step)
    slant = n > 5 or max(len(label) for label in labels) > 6  # long labels would run into each other
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=40 if slant else 0,
                  ha="right" if slant else "center", rotation_mode="anchor")
    ax.set_yticks(ticks, [labels[i] for i in ticks])
    for t in ax.get_xticklabels() + ax.get_yticklabels():
        if t.get_text() in marked:
            t.set_color("red")
            t.set_fontweight("bold")
    if n <= ANNOTATE_MAX:
        for (i, k), v in np.ndenumerate(m):
            if np.isfinite(v):
                r, g, b, _ = cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(k, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    return im


# ---------------------------------------------------------------- saliency masks

@dataclass
class SavedMask:
    name: str
    experiment: dict  # as main.py resolved it
    keep: dict  # parameter name -> bool tensor

    def label(self, method=True):
        """What the experiment forgot, how (unless method=False), and the threshold."""
        e = self.experiment
        spec = ForgetSpec(**{k: e.get(k) for k in ForgetSpec().to_config()})
        parts = [f"forgets {spec.describe()}"] + ([str(e.get("method", "?"))] if method else [])
        if e.get("mask_thr") is not None:
            parts.append(f"thr {e['mask_thr']:g}")
        return ", ".join(parts)


def read_mask(path):
    keep, config = load_mask(path)
    return SavedMask(str(config.get("name") or Path(path).stem), config.get("experiment") or {}, keep)


def read_masks(run_dir):
    return [read_mask(p) for p in sorted((Path(run_dir) / "masks").glob("*.pt"))]


# ---------------------------------------------------------------- numbers

def stage_of(name):
    """A parameter's stage: 'layer3' for ResNets' layer3.1.conv2.weight, 'blocks.4' for
    ViTs' blocks.4.attn.qkv.weight, else the first name part (conv1, bn1, fc, head)."""
    parts = name.split(".")
    if re.fullmatch(r"[a-z_]+\d+", parts[0]) or len(parts) < 3 or not parts[1].isdigit():
        return parts[0]
    return f"{parts[0]}.{parts[1]}"


def kept_fractions(mask, names):
    return np.array([mask.keep[n].float().mean().item() if n in mask.keep else np.nan for n in names])


def stage_fractions(mask, stages):
    """Kept fraction of each stage, counting entries (a big conv outweighs a bias)."""
    kept, total = dict.fromkeys(stages, 0), dict.fromkeys(stages, 0)
    for n, t in mask.keep.items():
        kept[stage_of(n)] += int(t.sum())
        total[stage_of(n)] += t.numel()
    return np.array([kept[s] / total[s] if total[s] else np.nan for s in stages])


def jaccard(a, b):
    """|kept in both| / |kept in either| over the parameters both masks have."""
    shared = [n for n in a.keep if n in b.keep and a.keep[n].shape == b.keep[n].shape]
    if not shared:
        return float("nan")
    both = sum(int((a.keep[n] & b.keep[n]).sum()) for n in shared)
    either = sum(int((a.keep[n] | b.keep[n]).sum()) for n in shared)
    return both / either if either else float("nan")


def same_entries(a, b):
    return a.keep.keys() == b.keep.keys() and all(torch.equal(a.keep[n], b.keep[n]) for n in a.keep)


def distinct(masks):
    """[(mask, legend label)], one per set of identical masks. A mask depends only on the
    checkpoint, the forget set and the threshold, so experiments that differ only in the
    method share it, and their lines would lie on top of each other."""
    groups = []
    for m in masks:
        group = next((g for g in groups if same_entries(g[0], m)), None)
        if group:
            group.append(m)
        else:
            groups.append([m])
    return [(g[0], f"{g[0].name}: {g[0].label()}" if len(g) == 1 else
             f"{len(g)} identical masks ({g[0].label(method=False)}): {', '.join(m.name for m in g)}")
            for g in groups]


def overlap_matrix(masks):
    m = np.eye(len(masks))
    for i in range(len(masks)):
        for k in range(i + 1, len(masks)):
            m[i, k] = m[k, i] = jaccard(masks[i], masks[k])
    return m


# ---------------------------------------------------------------- plots

def shade_stages(ax, stages):
    """Alternating bands, one per run of parameters of the same stage, named above the axes."""
    bounds = [0] + [i for i in range(1, len(stages)) if stages[i] != stages[i - 1]] + [len(stages)]
    for band, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if band % 2 == 0:
            ax.axvspan(start - 0.5, end - 0.5, color="0.92", zorder=0)
        ax.text((start + end - 1) / 2, 1.01, stages[start], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=7, rotation=90 if end - start < 3 else 0)


def plot_layers(masks, path):
    """One line (and one bar per stage) per distinct mask."""
    masks, labels = zip(*distinct(masks))
    labels = ["\n".join(textwrap.wrap(label, 100)) for label in labels]
    names = list(dict.fromkeys(n for m in masks for n in m.keep))
    stages = list(dict.fromkeys(stage_of(n) for n in names))
    colors = plt.get_cmap("tab10")(np.arange(len(masks)) % 10)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(9, 0.12 * len(names)), 8), dpi=110,
                                      gridspec_kw={"height_ratios": [3, 2], "hspace": 0.45})
    shade_stages(top, [stage_of(n) for n in names])
    for i, (m, c, label) in enumerate(zip(masks, colors, labels)):  # markers: masks that nearly coincide
        top.plot(kept_fractions(m, names), marker="os^Dv<>"[i % 7], color=c, markersize=3.5, linewidth=1,
                 alpha=0.85, label=label)
    top.set(xlim=(-0.5, len(names) - 0.5), ylim=(-0.02, 1.02), ylabel="kept fraction",
            xlabel="parameter, in model order")
    top.set_title("Kept fraction per parameter", pad=40)
    width = 0.8 / len(masks)
    x = np.arange(len(stages))
    for i, (m, c) in enumerate(zip(masks, colors)):
        bottom.bar(x + (i - (len(masks) - 1) / 2) * width, stage_fractions(m, stages), width, color=c)
    slant = len(stages) > 8  # e.g. a ViT's twelve blocks
    bottom.set_xticks(x, stages, rotation=45 if slant else 0, ha="right" if slant else "center")
    bottom.set(ylim=(0, 1), ylabel="kept fraction")
    bottom.set_title("Kept fraction per stage (weighted by entries)")
    ncol = 1 if any("\n" in label for label in labels) else min(2, len(masks))
    rows = sum(label.count("\n") + 1 for label in labels) if ncol == 1 else (len(masks) + 1) // 2
    fig.legend(*top.get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.08 + 0.025 * rows, top=0.88)
    atomic_write(path, lambda out: fig.savefig(out, format="png"))
    plt.close(fig)


def plot_overlap(masks, m, path):
    labels = [f"{k.name}\n({k.label()})" for k in masks]
    size = max(6.0, 1.1 * len(masks) + 3)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=110)
    heatmap(ax, m, labels, "magma", 0.0, 1.0, "Jaccard index of kept entries")  # the index's own range
    ax.tick_params(labelsize=7)
    ax.set_title("Overlap of the saliency masks", fontsize=10)
    atomic_write(path, lambda out: fig.savefig(out, format="png", bbox_inches="tight"))
    plt.close(fig)


def write_overlap_csv(masks, m, path):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["mask"] + [k.name for k in masks])
    for k, row in zip(masks, m):
        w.writerow([k.name] + [f"{v:.6f}" for v in row])
    atomic_write_text(path, buf.getvalue())


def plot_masks(run_dir):
    """The mask plots of one main.py run folder; returns the files written ([] without masks)."""
    run_dir = Path(run_dir)
    masks = read_masks(run_dir)
    if not masks:
        return []
    written = [run_dir / "mask_layers.png"]
    plot_layers(masks, written[0])
    if len(masks) >= 2:
        m = overlap_matrix(masks)
        written += [run_dir / "mask_overlap.png", run_dir / "mask_overlap.csv"]
        plot_overlap(masks, m, written[1])
        write_overlap_csv(masks, m, written[2])
    return written


# ---------------------------------------------------------------- an audit's figures

def plot_epsilons(path, rows, n, attacks):
    """A bar per bucket; the official rules' last bar holds what scores 0 (epsilon past the
    last bucket, up to 50), the exhaustive rules' the perfect separations (infinity)."""
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


# ---------------------------------------------------------------- a tuning

TRIAL_STYLE = {"complete": ("tab:blue", "o"), "pruned": ("0.6", "s"), "diverged": ("tab:red", "x"),
               "failed": ("tab:red", "x")}


def plot_tuning(path, name, keys, log_keys, points):
    """The objective against each tuned setting, one panel per setting: every trial (pruned ones
    at their last per-epoch objective, failed and diverged ones at the worst value), the best
    circled."""
    n = max(1, len(keys))
    fig, axes = plt.subplots(1, n, figsize=(min(MAX_WIDTH_IN, 3.6 * n + 0.6), 3.2), squeeze=False)
    complete = [p for p in points if p[2] == "complete"]
    best = min(complete, key=lambda p: p[1]) if complete else None
    for ax, key in zip(axes[0], keys):
        for state, (colour, marker) in TRIAL_STYLE.items():
            xs = [(p[0][key], p[1]) for p in points if p[2] == state and key in p[0]]
            if xs:
                ax.scatter(*zip(*xs), c=colour, marker=marker, s=22, label=state, alpha=0.8)
        if best is not None and key in best[0]:
            ax.scatter([best[0][key]], [best[1]], s=120, facecolors="none", edgecolors="black", label="best")
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key.replace("method_args.", ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("objective (lower = better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(textwrap.shorten(name, 100), fontsize=9)
    fig.tight_layout()
    save(fig, path)
