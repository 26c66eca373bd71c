"""A study's summary: one row per experiment (mean ± std over its runs) after its base and gold rows.

    table = summary.summarize(names, experiments, finished_rows, refs)
    text = summary.write_summary(run_dir, table, finished_rows)   # summary.csv, summary.md, figures

summary.csv holds every setting and metric with its std; summary.md the full table, the
do-nothing line (how many experiments end closer to the gold standard than the model they
started from) and the mask's effect (mask_effect.csv: masked minus unmasked, paired by seed);
the terminal gets the numbers a reader compares, at most 120 characters wide. Every verdict
rests on a 95% t-interval over runs: with one run there is none, and where the interval
covers the line it is judged against, the verdict is "no difference".
"""
import csv
import io
import json
import math

import numpy as np

import metrics
import plots
from experiments import method_settings
from utils import atomic_write_text, mean_std


METRIC_KEYS = ("UA", "RA", "TA", "VA", "MIA", "loss_MIA_AUC", "avg_gap")  # n/a when missing
SUMMARY_KEYS = METRIC_KEYS + ("rte_s", "mask_fraction", "mask_zero_fraction")
CSV_ONLY_KEYS = ("TA_forgotten", "VA_forgotten", "loss_MIA_forget", "UA_gap", "RA_gap", "TA_gap", "MIA_gap")
BEATS = "beats_do_nothing"
# main.py --representations (representations.py): the penultimate features' numbers, and per stage
REPRESENTATION_KEYS = ("probe_forgotten", "knn_forgotten", "cka_base", "cka_gold", "relearn_steps", "relearned")
STAGE_KEYS = ("probe", "knn", "cka_base", "cka_gold")


def flat(row):
    m = dict(row["metrics"])
    m.update(row.get("gap", {}))
    m["rte_s"], m["mask_fraction"] = row["rte_s"], row["mask_fraction"]
    m["mask_zero_fraction"] = row.get("mask_zero_fraction")
    m.update({k: v for k, v in (row.get("representations") or {}).items() if k in REPRESENTATION_KEYS})
    return m


def stage_means(measures):
    """The per-stage numbers of representations.Probe.measure, averaged over runs (NaN-aware),
    with the mask's share of each stage (the same in every run of an experiment)."""
    measures = [m["stages"] for m in measures if m and m.get("stages")]
    if not measures:
        return None
    out = {"name": measures[0]["name"]}
    for k in STAGE_KEYS:
        lists = [m[k] for m in measures if m.get(k)]
        if lists:
            with np.errstate(all="ignore"):
                out[k] = np.nanmean(np.array(lists, dtype=float), axis=0).tolist()
    if "mask" in measures[0]:
        out["mask"] = measures[0]["mask"]
    return out


def reference_rows(e, before, gold, representations=None):
    """The base model's row (with its gap to the gold standard: the do-nothing baseline)
    and the gold standard's row, for one checkpoint and forget set."""
    out = []
    representations = representations or {}
    for label, m, key in (("base (before)", before, "base"), ("gold standard", gold, "gold")):
        probed = representations.get(key) or {}
        if not m and not probed:
            continue
        m = dict(m, **metrics.gap(before, gold)) if label == "base (before)" and gold else dict(m or {})
        m.update({k: v for k, v in probed.items() if k in REPRESENTATION_KEYS})
        row = {"experiment": label, "method": "-", "mask": "-", "forget": e.spec.describe(), "runs": 1,
               **{k: (m[k], 0.0) for k in SUMMARY_KEYS + CSV_ONLY_KEYS + REPRESENTATION_KEYS
                  if m.get(k) is not None}}
        if probed:
            row["stages"] = stage_means([probed])
        out.append(row)
    return out


def summarize(names, experiments, rows, refs):
    """One row per experiment (mean ± std over the runs that did not diverge), after the
    base and gold rows of its checkpoint and forget set."""
    golds = {}  # the gold standard named by any experiment on that checkpoint and forget set
    for i, e in enumerate(experiments):
        if refs.get(i, {}).get("gold"):
            golds.setdefault((e.checkpoint, e.spec.describe()), refs[i]["gold"])
    table, seen = [], set()
    for i, (name, e) in enumerate(zip(names, experiments)):
        ref = refs.get(i, {})
        key = (e.checkpoint, e.spec.describe())
        if key not in seen and ref:
            seen.add(key)
            table += reference_rows(e, ref["before"], golds.get(key), ref.get("representations"))
        mine = [r for r in rows if r["experiment"] == i]
        if not mine:
            continue
        finished = [flat(r) for r in mine if r["diverged_at"] is None]
        row = {"experiment": name, "method": e.method, "mask": format(e.mask_thr, "g") if e.use_mask else "-",
               "forget": e.spec.describe(), "runs": len(mine), **settings_columns(e)}
        for k in SUMMARY_KEYS + CSV_ONLY_KEYS + REPRESENTATION_KEYS:
            vals = [m[k] for m in finished if m.get(k) is not None]
            if vals:
                row[k] = mean_std(vals)
        stages = stage_means([r.get("representations") for r in mine if r["diverged_at"] is None])
        if stages:
            row["stages"] = stages
        if ref.get("gold") and "avg_gap" in row:
            do_nothing = metrics.gap(ref["before"], ref["gold"])["avg_gap"]
            row[BEATS] = verdict([m["avg_gap"] for m in finished if m.get("avg_gap") is not None], do_nothing,
                                 ("yes", "no difference", "no"))
        diverged = [r["diverged_at"] for r in mine if r["diverged_at"]]
        row["diverged"] = f"{len(diverged)}/{len(mine)} diverged (epoch {min(diverged)})" if diverged else ""
        table.append(row)
    return table


def note_failures(table, names, experiments, failed, nexp):
    """Failed runs in the summary table: 'k/n failed' in the experiment's row (a row of its own
    when none of its runs finished)."""
    for i in sorted({r["experiment"] for r in failed}):
        note = f"{sum(r['experiment'] == i for r in failed)}/{nexp} failed"
        row = next((r for r in table if r["experiment"] == names[i]), None)
        if row is None:
            e = experiments[i]
            row = {"experiment": names[i], "method": e.method, "mask": format(e.mask_thr, "g") if e.use_mask else "-",
                   "forget": e.spec.describe(), "runs": 0, **settings_columns(e), "diverged": ""}
            after = [n for n, r in enumerate(table) if r["experiment"] in names[:i]]
            table.insert(after[-1] + 1 if after else len(table), row)
        row["diverged"] = "; ".join(x for x in (row.get("diverged"), note) if x)


def interval(values, level=0.95):
    """(mean, low, high): Student's t-interval of the mean over `values`; low and high are None
    for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    from scipy.stats import t
    half = t.ppf(0.5 + level / 2, n - 1) * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, mean - half, mean + half


NO_VERDICT = "-"  # one run: no interval, no verdict


def verdict(values, line, words):
    """words[0] when the 95% interval of `values` lies below `line`, words[2] above it, words[1]
    when it covers it; NO_VERDICT for fewer than two values."""
    mean, low, high = interval(values) if values else (None, None, None)
    if low is None:
        return NO_VERDICT
    return words[0] if high < line else words[2] if low > line else words[1]


def do_nothing_line(table):
    """'k of n experiments are closer to the gold standard than the original model', or None."""
    judged = [r for r in table if BEATS in r]
    if not judged:
        return None
    decided = [r for r in judged if r[BEATS] != NO_VERDICT]
    if not decided:
        return "one run per experiment: no verdict on doing nothing (it needs --nexp 2 or more)"
    k = sum(r[BEATS] == "yes" for r in decided)
    return (f"{k} of {len(decided)} experiments are closer to the gold standard than the original model: their "
            f"avg_gap's 95% interval over runs lies below the base row's (the do-nothing baseline)")


# ---------------------------------------------------------------- the mask's effect

EFFECT_KEYS = ("UA", "RA", "TA", "MIA", "avg_gap")


def mask_pairs(experiments):
    """(masked i, unmasked j) for experiments that differ only in the mask, or, in a tuned list,
    the one masked and the one unmasked experiment of a method on a checkpoint and forget set."""
    def key(e, loose):
        fixed = dict(vars(e), use_mask=None, mask_thr=None, tag=None)
        if loose:
            fixed = {k: fixed[k] for k in ("checkpoint", "method", "seed", "retrained", "class_to_forget",
                                          "unlearning_rate", "idxs_to_forget", "forget_seed")}
        return json.dumps(fixed, sort_keys=True, default=str)
    pairs = []
    for loose in (False, True):
        taken = {i for pair in pairs for i in pair}
        groups = {}
        for i, e in enumerate(experiments):
            if i not in taken:
                groups.setdefault(key(e, loose), []).append(i)
        for members in groups.values():
            plain = [i for i in members if not experiments[i].use_mask]
            if len(plain) != 1:
                continue
            for thr in {experiments[i].mask_thr for i in members if experiments[i].use_mask}:
                masked = [i for i in members if experiments[i].use_mask and experiments[i].mask_thr == thr]
                if len(masked) == 1:
                    pairs.append((masked[0], plain[0]))
    return sorted(pairs)


def mask_effects(names, experiments, rows):
    """Per pair, masked minus unmasked for each metric of EFFECT_KEYS over the runs of the same
    seed that both finished: {metric: (mean, low, high)}, the runs, and the Avg. Gap verdict."""
    by_run = {(r["experiment"], r["run"]): flat(r) for r in rows if r.get("metrics") and r["diverged_at"] is None}
    out = []
    for i, j in mask_pairs(experiments):
        runs = sorted(k for (x, k) in by_run if x == i and (j, k) in by_run)
        if not runs:
            continue
        effect = {}
        for key in EFFECT_KEYS:
            diffs = [by_run[i, k][key] - by_run[j, k][key] for k in runs
                     if by_run[i, k].get(key) is not None and by_run[j, k].get(key) is not None]
            if diffs and not any(math.isnan(d) for d in diffs):
                effect[key] = interval(diffs)
        gaps = [by_run[i, k]["avg_gap"] - by_run[j, k]["avg_gap"] for k in runs if "avg_gap" in by_run[i, k]]
        out.append({"masked": names[i], "unmasked": names[j], "runs": len(runs), "effect": effect,
                    "verdict": verdict(gaps, 0.0, ("mask better", "no difference", "mask worse")) if gaps else ""})
    return out


def effect_cell(v):
    mean, low, high = v
    return f"{mean:+.2f}" + (f" [{low:+.2f}, {high:+.2f}]" if low is not None else "")


def effects_markdown(effects):
    if not effects:
        return None
    header = ["masked", "unmasked", "runs"] + list(EFFECT_KEYS) + ["Avg. Gap verdict"]
    body = [[x["masked"], x["unmasked"], str(x["runs"])] + [effect_cell(x["effect"][k]) if k in x["effect"] else "n/a"
                                                             for k in EFFECT_KEYS] + [x["verdict"] or "n/a"]
            for x in effects]
    return ("The mask's effect: masked minus unmasked, paired by seed, mean [95% interval] over runs; "
            "\"no difference\" where the interval covers 0, no verdict with one run.\n\n" + markdown(header, body))


def method_table(table, effects):
    """Markdown: a row per method, per forget set the Avg. Gap without and with the mask (mean ±
    std) and masked − unmasked with its interval and verdict; the do-nothing row first. None
    with fewer than two masked experiments (effects_markdown's table already says it all)."""
    if len({x["masked"] for x in effects}) < 2:
        return None
    rows = {r["experiment"]: r for r in table}
    specs = list(dict.fromkeys(rows[x["unmasked"]]["forget"] for x in effects))
    methods = list(dict.fromkeys(rows[x["unmasked"]]["method"] for x in effects))
    by = {(rows[x["unmasked"]]["method"], rows[x["unmasked"]]["forget"]): x for x in effects}
    gap = lambda r: cell(r.get("avg_gap", "n/a"), "avg_gap", r.get("runs", 1)) if r else ""
    header = ["method"] + [h for spec in specs for h in (spec, "+ mask", "mask − no mask")]
    base = {r["forget"]: r for r in table if r["experiment"] == "base (before)"}
    body = [["do nothing (base model)"] + [c for spec in specs for c in (gap(base.get(spec)), "", "")]]
    for m in methods:
        line = [m]
        for spec in specs:
            x = by.get((m, spec))
            line += ([gap(rows[x["unmasked"]]), gap(rows[x["masked"]]),
                      (effect_cell(x["effect"]["avg_gap"]) + f" {x['verdict']}") if "avg_gap" in x["effect"] else "n/a"]
                     if x else ["", "", ""])
        body.append(line)
    return "Avg. Gap to the gold standard per method, mean ± std over runs; the mask's effect paired by seed.\n\n" \
        + markdown(header, body)


def effects_csv(effects):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["masked", "unmasked", "runs"] + [f"{k}_{p}" for k in EFFECT_KEYS for p in ("diff", "low", "high")]
                    + ["avg_gap_verdict"])
    for x in effects:
        cells = []
        for k in EFFECT_KEYS:
            mean, low, high = x["effect"].get(k, (None, None, None))
            cells += ["" if v is None else f"{v:.4f}" for v in (mean, low, high)]
        writer.writerow([x["masked"], x["unmasked"], x["runs"]] + cells + [x["verdict"]])
    return out.getvalue()


SETTING_KEYS = ("lr", "epochs", "batch_size", "seed", "forget_seed", "freeze_bn", "checkpoint", "retrained")


def settings_columns(e):
    """What the experiment ran with, for summary.csv: its settings and its method's (with defaults)."""
    return {**{k: getattr(e, k) for k in SETTING_KEYS},
            **{f"method_args.{k}": v for k, v in method_settings(e).items()}}


COLUMNS = ("experiment", "method", "mask", "forget", "runs") + SUMMARY_KEYS + (BEATS, "diverged")
NUMERIC = SUMMARY_KEYS + CSV_ONLY_KEYS + REPRESENTATION_KEYS
# The terminal's table: the numbers a reader compares, at most 120 characters wide.
SCREEN = (("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA", "MIA"), ("avg_gap", "Avg. Gap"), ("rte_s", "RTE s"))
SCREEN_WIDTH = 120


def cell(v, key, runs=2, sep=" ± ", digits=None):
    """'mean ± std', or the mean alone for a single run (its std says nothing)."""
    if not isinstance(v, tuple):
        return str(v)
    if math.isnan(v[0]):
        return "n/a"
    digits = digits or (3 if key in ("rte_s", "mask_fraction", "mask_zero_fraction") else 2)
    return f"{v[0]:.{digits}f}" + (f"{sep}{v[1]:.{digits}f}" if runs > 1 else "")


def csv_columns(table):
    settings = list(dict.fromkeys(k for row in table for k in row if k in SETTING_KEYS or k.startswith("method_args.")))
    probed = [k for k in REPRESENTATION_KEYS if any(k in row for row in table)]
    return (["experiment", "method", "mask", "forget", "runs"] + settings + list(SUMMARY_KEYS + CSV_ONLY_KEYS) + probed
            + [BEATS, "diverged"])


def csv_text(table):
    columns = csv_columns(table)
    header = [c for k in columns for c in ((k, k + "_std") if k in NUMERIC else (k,))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in table:
        line = []
        for k in columns:
            v = row.get(k, "")
            if k in NUMERIC:
                line += [f"{v[0]:.4f}", f"{v[1]:.4f}"] if v else ["", ""]
            else:
                line.append("" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v)
        writer.writerow(line)
    return out.getvalue()


def markdown(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def shorten(text, room):
    """`text` cut in the middle to at most `room` characters: both ends say what a row is."""
    if len(text) <= room:
        return text
    head = (room - 1) // 2
    return text[:head] + "…" + text[len(text) - (room - 1 - head):]


def screen_table(table):
    """The terminal's summary, at most SCREEN_WIDTH characters wide: the metrics a reader
    compares, names shortened in the middle to fit (summary.md has them whole), a runs
    column only when experiments ran different numbers of runs."""
    several_specs = len({r["forget"] for r in table}) > 1
    names = [f"{r['experiment']}, {r['forget']}" if several_specs and r["method"] == "-" else r["experiment"]
             for r in table]
    columns = [[cell(r.get(k, "n/a"), k, r.get("runs", 1), sep="±", digits=1 if k == "rte_s" else 2) for r in table]
               for k, _ in SCREEN]
    header = [label for _, label in SCREEN]
    experiment_runs = {r["runs"] for r in table if r["method"] != "-"}
    if len(experiment_runs) > 1:
        columns.insert(0, [str(r["runs"]) for r in table])
        header.insert(0, "runs")
    widths = [max(len(h), *map(len, col)) for h, col in zip(header, columns)]
    room = SCREEN_WIDTH - 4 - 3 * len(widths) - sum(widths)
    names = [shorten(n, room) for n in names]
    widths.insert(0, max(len("experiment"), *map(len, names)))
    columns.insert(0, names)
    header.insert(0, "experiment")
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(cells) for cells in zip(*columns)]
    if len(experiment_runs) == 1 and experiment_runs != {1}:
        out.append(f"mean ± std over {experiment_runs.pop()} runs; full table with settings: summary.md, summary.csv")
    out += [f"{r['experiment']}: {r['diverged']}" for r in table if r.get("diverged")]
    return "\n".join(out)


# ---------------------------------------------------------------- representations

REPRESENTATION_COLUMNS = (("probe_forgotten", "probe"), ("knn_forgotten", "k-NN"), ("cka_base", "CKA base"),
                          ("cka_gold", "CKA gold"), ("relearn_steps", "relearn steps"), ("relearned", "relearned %"))
REPRESENTATION_NOTE = (
    "What the features still know (representations.py, fp32, held-out samples): probe and k-NN: accuracy (%) "
    "of a linear probe and of a cosine k-NN fit on validation features of every class, on the forgotten class's "
    "test samples; CKA base/gold: linear CKA of test features with the base model's and the gold standard's; all "
    "from the penultimate features. relearn steps: SGD steps on a small part of the forget set until the "
    "accuracy on the rest is within a margin of the base model's (a run that never gets there counts the cap; "
    "relearned: the share that got there). Per stage: layers.png and representations.csv.")


def representation_markdown(table):
    rows = [r for r in table if "stages" in r or any(k in r for k, _ in REPRESENTATION_COLUMNS)]
    if not rows:
        return None
    body = [[r["experiment"], r["forget"]] + [cell(r.get(k, "n/a"), k, r.get("runs", 1), digits=3 if k.startswith(
        "cka") else 1) for k, _ in REPRESENTATION_COLUMNS] for r in rows]
    return REPRESENTATION_NOTE + "\n\n" + markdown(["experiment", "forget"] + [h for _, h in REPRESENTATION_COLUMNS],
                                                   body)


def measured_row(name, e, measure):
    """The table row of one model's representations.Probe.measure (feature_extraction.py's)."""
    return {"experiment": name, "method": e.method, "mask": format(e.mask_thr, "g") if e.use_mask else "-",
            "forget": e.spec.describe(), "runs": 1, "stages": stage_means([measure]),
            **{k: (measure[k], 0.0) for k in REPRESENTATION_KEYS if measure.get(k) is not None}}


def write_representations(folder, table):
    """representations.md, representations.csv and layers.png of measured models; returns the Markdown."""
    md = representation_markdown(table)
    atomic_write_text(folder / "representations.md", md + "\n")
    atomic_write_text(folder / "representations.csv", representations_csv(table))
    plots.plot_representation_layers(folder / "layers.png", table)
    return md


def representations_csv(table):
    """One line per (experiment, stage): the per-stage means and the mask's share of the stage (and
    of the weights after the last stage, the classifier's: 'head')."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["experiment", "forget", "stage", *STAGE_KEYS, "mask_kept"])
    for r in table:
        st = r.get("stages")
        if not st:
            continue
        mask = st.get("mask") or {}
        for k, name in enumerate(st["name"] + [s for s in mask if s not in st["name"]]):  # and the head's weights
            vals = [st[key][k] if st.get(key) and k < len(st["name"]) else None for key in STAGE_KEYS]
            vals.append(mask.get(name))
            writer.writerow([r["experiment"], r["forget"], name] +
                            ["" if v is None or math.isnan(v) else f"{v:.4f}" for v in vals])
    return out.getvalue()


def write_summary(run_dir, table, results=(), effects=()):
    """summary.csv (every setting and metric), summary.md (the full table, the do-nothing line and
    the mask's effect), mask_effect.csv and the figures; returns the terminal's text."""
    atomic_write_text(run_dir / "summary.csv", csv_text(table))
    md = markdown(COLUMNS, [[cell(row.get(k, "n/a" if k in METRIC_KEYS else ""), k, row.get("runs", 1))
                             for k in COLUMNS] for row in table])
    line = do_nothing_line(table)
    effect_md = effects_markdown(effects)
    methods_md = method_table(table, effects)
    probed_md = representation_markdown(table)
    if effects:
        atomic_write_text(run_dir / "mask_effect.csv", effects_csv(effects))
    atomic_write_text(run_dir / "summary.md",
                      md + "".join("\n\n" + x for x in (line, effect_md, methods_md, probed_md) if x) + "\n")
    if probed_md:
        atomic_write_text(run_dir / "representations.csv", representations_csv(table))
        plots.plot_representation_layers(run_dir / "layers.png", table)
    plots.plot_summary(run_dir / "summary.png", table)
    plots.plot_tradeoff(run_dir / "tradeoff.png", table)
    if results:
        plots.plot_curves(run_dir / "curves.png", table, results)
    said = [f"{x['masked']} vs {x['unmasked']}: Avg. Gap {effect_cell(x['effect']['avg_gap'])}, {x['verdict']}"
            for x in effects if "avg_gap" in x["effect"]]
    return screen_table(table) + "".join("\n\n" + x for x in (line, "\n".join(said), probed_md) if x)
