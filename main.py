"""Unlearning experiments: each experiment --nexp times, mean ± std, against a gold standard.

    python main.py -L exp/classforget.json --nexp 5
    python main.py -c checkpoints/resnet18_digits_base.pt -CF 0 -M rl_split -UM -MT 0.2 -NL
    python main.py -c checkpoints/resnet18_digits_base.pt -CF 3 -M scrub -MA msteps=1 -E 3 -LR 0.01 -NL
    python main.py --resume output/20261130-101500_classforget
    python main.py -L exp/demo.json --nexp 3 -NL --executor ray --gpus-per-run 0.25

Results go to output/<run>/: config.json (the resolved experiments), results.jsonl (one
line per finished run, written as it ends), summary.csv / summary.md / summary.png, and
per experiment the unlearned model of its last run (<name>.pt, train.py's format) and
its saliency mask (masks/<name>.pt); --save none or all keeps none or every run's.
With --executor ray each run is a task on a Ray worker (ray_executor.py); this process
alone writes the run folder either way.
"""
import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import shlex
import sys
import textwrap
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import datasets
import metrics
import plots
from datasets import ForgetSpec
from methods import (METHODS, Run, cross_entropy, forget_gradients, make_optimizer, mask_from_gradients,
                     sgd_pass)
from models import load_model, load_model_checkpoint, model_from_config
from utils import (Logger, UserError, add_precision_flag, announce_compute, atomic_write_text, check_writable, cli,
                   compute_for, default_precision, device_name, get_device, make_generator, mean_std,
                   save_checkpoint, save_mask, seed_everything, setting, settings_problems, timestamp, unique_dir)


@dataclass
class Experiment:
    """One unlearning experiment: every key of an experiment file, its type, range, flags and help."""
    checkpoint: str = setting("checkpoints/resnet18_cifar10_base.pt", "the model to unlearn from (train.py's "
                              "checkpoint)", flags=("-c", "--checkpoint"))
    class_to_forget: int = setting(None, "forget every training sample of this class",
                                   flags=("-CF", "--cf", "--class-to-forget"))
    unlearning_rate: float = setting(None, "forget a random fraction of the training set, drawn once from `seed`",
                                     "(0, 1)", flags=("-UL", "--unlr", "--unlearning-rate"))
    idxs_to_forget: str = setting(None, "forget the training indices listed in this JSON file",
                                  flags=("-IF", "--itf", "--idxs-to-forget"))
    use_mask: bool = setting(False, "update only the salient weights (SalUn's mask)", flags=("-UM", "--use-mask"))
    mask_thr: float = setting(0.5, "fraction of all weights the mask keeps", "(0, 1]", flags=("-MT", "--mask-thr"))
    lr: float = setting(0.1, "learning rate of the method's optimizer (SGD with momentum 0.9, weight decay 5e-4; "
                                 "Adam for bad_teacher)", "(0, inf)", flags=("-LR", "--lr"))
    epochs: int = setting(10, "unlearning epochs", "[1, inf)", flags=("-E", "--epochs"))
    method: str = setting("rl_split", "the unlearning method: " + ", ".join(METHODS), flags=("-M", "--method"))
    method_args: dict = setting({}, "the method's own settings (see the README's method table)",
                                flags=("-MA", "--method-arg"))
    tag: str = setting(None, "a name for the experiment (default: built from method, mask and forget set)",
                       flags=("-T", "--tag"))
    retrained: str = setting(None, "gold-standard checkpoint trained without the same forget set, for the gap",
                             flags=("-R", "--retrained"))
    seed: int = setting(0, "first run's seed; run k uses seed + k", flags=("--seed",))
    batch_size: int = setting(64, "samples per step", "[1, inf)", flags=("--batch-size",))
    freeze_bn: bool = setting(False, "keep BatchNorm running statistics as they were (BatchNorm in eval mode while "
                                     "unlearning); by default they move, as in SalUn's code, mask or not",
                              flags=("--freeze-bn",))

    @property
    def spec(self):
        return ForgetSpec(self.class_to_forget, self.unlearning_rate, self.idxs_to_forget)


KEYS = {f.name: f for f in fields(Experiment)}
FORGET_KEYS = ("class_to_forget", "unlearning_rate", "idxs_to_forget")


# ---------------------------------------------------------------- reading and checking experiments

def method_problems(e):
    """The method must be known and its `method_args` fit its settings."""
    if e.method not in METHODS:
        return [("method", f"unknown method {e.method!r}; known: {', '.join(METHODS)}")]
    settings = fields(METHODS[e.method].settings)
    known = ", ".join(f.name for f in settings) or "none"
    return [(f"method_args: {name}", f"{e.method} has no setting {name!r} (its settings: {known})"
             if problem.startswith("unknown") else f"{e.method}: {problem}")
            for name, problem in settings_problems(METHODS[e.method].settings, e.method_args).items()]


class Checker:
    """Checks experiments against their checkpoints and data; caches what it loads."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self.configs, self.labels = {}, {}

    def config(self, path):
        if path not in self.configs:
            self.configs[path] = load_model_checkpoint(path)["config"]
        return self.configs[path]

    def train_labels(self, name):
        if name not in self.labels:
            self.labels[name] = datasets.load_dataset(name, self.data_dir).y_train
        return self.labels[name]

    def problems(self, e):
        out = []
        given = [k for k, v in e.spec.to_config().items() if v is not None]
        if len(given) != 1:
            out.append(("forget spec", f"give exactly one of {', '.join(FORGET_KEYS)} "
                                       f"(got {', '.join(given) or 'none'})"))
        try:
            cfg = self.config(e.checkpoint)
        except UserError as err:
            return out + [("checkpoint", str(err) + missing_checkpoint_hint(e.checkpoint))]
        if out:
            return out
        out = e.spec.problems(cfg["num_classes"])
        if out:
            return out
        labels = self.train_labels(cfg["dataset"])
        try:
            forget = datasets.forget_indices(e.spec, labels, e.seed, datasets.as_flags(cfg["val_idx"], len(labels)))
        except UserError as err:
            return [("idxs_to_forget", str(err))]
        if e.retrained is not None:
            out += self.gold_problems(e, cfg, forget)
        return out

    def gold_problems(self, e, cfg, forget):
        try:
            gold = self.config(e.retrained)
        except UserError as err:
            return [("retrained", str(err) + missing_checkpoint_hint(e.retrained))]
        if gold["dataset"] != cfg["dataset"]:
            return [("retrained", f"{e.retrained} was trained on {gold['dataset']}, "
                                  f"the checkpoint on {cfg['dataset']}")]
        if gold["val_idx"] != cfg["val_idx"]:
            return [("retrained", f"{e.retrained} holds out another validation set than {e.checkpoint} "
                                  f"(seeds {gold['seed']} and {cfg['seed']}); train both with one --seed")]
        if gold["forget_idx"] != forget.tolist():
            return [("retrained", f"{e.retrained} was retrained without {len(gold['forget_idx'])} samples, "
                                  f"not the {len(forget)} this experiment forgets ({e.spec.describe()})")]
        return []


def train_command(path):
    """The train.py command that writes checkpoint `path`, read from its name
    (<model>_<dataset>_<base | cf<c> | rf<r> | itf_<stem>>.pt), or None."""
    path = Path(path)
    found = re.fullmatch(rf"(.+)_({'|'.join(datasets.DATASETS)})_(base|cf\d+|rf[0-9.]+|itf_.+)", path.stem)
    if not found:
        return None
    model, dataset, comment = found.groups()
    flags = {"b": "", "c": f" --cf {comment[2:]}", "r": f" --unlr {comment[2:]}",
             "i": f" --itf {path.parent / comment[4:]}_forget.json"}[comment[0]]
    folder = "" if path.parent == Path("checkpoints") else f" --save-dir {path.parent}"
    return f"python train.py --model {model} --dataset {dataset}{flags}{folder}"


def missing_checkpoint_hint(path):
    command = train_command(path)
    return f"; train.py makes it: {command}" if command and not Path(path).exists() else ""


def flag_names(key):
    """'-c/--checkpoint' for an Experiment key (and 'method_args: x' for one of its parts):
    how the command line spells it."""
    head, _, rest = key.partition(": ")
    flags = KEYS[head].metadata.get("flags") if head in KEYS else None
    name = "/".join(flags[:2]) if flags else head
    return f"{name}: {rest}" if rest else name


def span(indices):
    """'experiment 3', 'experiments 0-19' or 'experiments 0, 2, 5'."""
    if len(indices) == 1:
        return f"experiment {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"experiments {indices[0]}-{indices[-1]}"
    return "experiments " + ", ".join(map(str, indices))


def problem_lines(problems, where):
    """One line per distinct problem, naming every experiment that has it; on the command
    line, keys are named by their flags."""
    grouped = {}
    for i, key, msg in problems:
        grouped.setdefault((key, msg), []).append(i)
    lines = []
    for (key, msg), indices in grouped.items():
        label = key
        if where == "command line":  # keys as the flags the user typed, also inside the message
            label = "" if key == "forget spec" else flag_names(key)
            msg = re.sub(r"\b(" + "|".join(k for k in KEYS if "_" in k) + r")\b", lambda m: flag_names(m[1]), msg)
        text = f"{label}: {msg}" if label and not msg.startswith(key.split(": ")[0] + " ") else msg
        lines.append(f"{where}: {text}" if where == "command line" else f"{where}: {span(indices)}: {text}")
    return lines


def resolve(entries, where, data_dir):
    """Experiments from raw dicts (file values with the command line's on top); every problem at once."""
    if not isinstance(entries, list) or not entries or not all(isinstance(x, dict) for x in entries):
        raise UserError(f"{where}: expected a non-empty list of experiment objects")
    problems, experiments, checker = [], [], Checker(data_dir)
    for i, entry in enumerate(entries):
        bad = settings_problems(Experiment, entry)
        problems += [(i, k if k in KEYS else "", msg) for k, msg in bad.items()]
        # The rest of the experiment is still checked, with defaults in place of the bad values;
        # what depends on a bad checkpoint or forget key is not (it would only repeat the problem).
        e = Experiment(**{k: v for k, v in entry.items() if k not in bad})
        local = method_problems(e) if not {"method", "method_args"} & set(bad) else []
        if not set(bad) & {"checkpoint", "retrained", "seed", *FORGET_KEYS}:
            local += checker.problems(e)
        problems += [(i, key, msg) for key, msg in local]
        experiments.append(e)
    if problems:
        raise UserError("\n".join(problem_lines(problems, where)))
    return experiments


def method_settings(e):
    """The method's settings with their defaults filled in: {name: value}."""
    return asdict(METHODS[e.method].settings(**e.method_args))


VARYING = (("lr", "lr"), ("epochs", "E"), ("batch_size", "bs"), ("seed", "seed"))  # key, short name


def experiment_names(experiments):
    """'<index>_<method>[_mask<thr>]_<forget set>', then whatever else differs between the
    experiments of the list (lr, epochs, batch size, method settings, seed, checkpoint), so
    that every row of a sweep says what it is; a `tag` replaces all but the index."""
    varying = [(k, short) for k, short in VARYING if len({getattr(e, k) for e in experiments}) > 1]
    given = [{(k, json.dumps(v)) for k, v in e.method_args.items()} for e in experiments]
    common = set.intersection(*given) if given else set()
    many_checkpoints = len({e.checkpoint for e in experiments}) > 1
    names = []
    for i, (e, args) in enumerate(zip(experiments, given)):
        parts = [e.method + (f"_mask{e.mask_thr:g}" if e.use_mask else "") + ("_bnfrozen" if e.freeze_bn else ""),
                 e.spec.describe()]
        parts += [f"{short}{getattr(e, k):g}" for k, short in varying]
        parts += [f"{k}{json.loads(v)}" for k, v in sorted(args - common)]
        if many_checkpoints:
            parts.append(Path(e.checkpoint).stem)
        names.append(f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_.+-]+", "-", e.tag or "_".join(parts)))
    return names


# ---------------------------------------------------------------- one run

@dataclass
class Context:
    """What every run of one experiment shares: data, split, base model and reference metrics."""
    ds: object
    split: object
    base_config: dict
    base_model: torch.nn.Module  # never trained: each run unlearns a copy
    before: dict
    gold: dict
    compute: object
    gradients: object  # (model, run) -> SalUn's forget-set gradients, seconds they took


def prepare(e, compute, cache):
    """The experiment's Context. `cache` keeps what experiments share: datasets, base
    models, the reference evaluations (the same checkpoint on the same split is evaluated
    once), the forget-set gradients the masks are cut from, and which (checkpoint,
    method, batch size) has been warmed up."""
    device = compute.device
    if ("model", e.checkpoint) not in cache:
        cache["model", e.checkpoint] = load_model(e.checkpoint, device)
    base, cfg = cache["model", e.checkpoint]
    if cfg["dataset"] not in cache:
        cache[cfg["dataset"]] = datasets.load_dataset(cfg["dataset"], cache["data_dir"], device)
    ds = cache[cfg["dataset"]]
    split = datasets.make_split(ds, e.spec, seed=e.seed, val_idx=cfg["val_idx"])

    def evaluated(path, model=None):
        key = ("report", path, e.checkpoint, repr(e.spec), e.seed)  # what the split depends on
        if key not in cache:
            model = model if model is not None else load_model(path, device)[0]
            cache[key] = metrics.report(metrics.evaluate(model, ds, split, compute))
        return cache[key]

    def gradients(model, run):
        """The base model's gradients depend only on the checkpoint, the forget set and the
        batch size, so every masked run on them shares one computation and its time."""
        if METHODS[e.method].fresh_model:  # a model trained from scratch has its own
            return timed_gradients(model, run)
        key = ("gradients", e.checkpoint, repr(e.spec), e.seed, e.batch_size)
        if key not in cache:
            cache[key] = timed_gradients(model, run)
        return cache[key]

    before = evaluated(e.checkpoint, base)
    gold = evaluated(e.retrained) if e.retrained else None
    ctx = Context(ds, split, cfg, base, before, gold, compute, gradients)
    if ("warm", e.checkpoint, e.method, e.batch_size) not in cache:
        warm_up(e, ctx)
        cache["warm", e.checkpoint, e.method, e.batch_size] = True
    return ctx


def warm_up(e, ctx):
    """A step at every batch shape an epoch can see, on a throwaway copy, so that one-time
    costs (allocator growth, kernel selection per shape) are paid before any run's clock
    starts."""
    model = model_from_config(ctx.base_config, ctx.ds.device) if METHODS[e.method].fresh_model \
        else copy.deepcopy(ctx.base_model)
    model = model.to(memory_format=torch.channels_last) if ctx.compute.channels_last else model
    run = make_run(e, ctx, 0)
    opt = make_optimizer(model, 0.0)
    for idx in (ctx.split.forget, ctx.split.retain, ctx.split.train):
        for n in {min(e.batch_size, len(idx)), len(idx) % e.batch_size}:
            if n > 1:
                sgd_pass(model, opt, run, idx[:n], cross_entropy)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_gradients(model, run):
    """SalUn's forget-set gradients of `model`, and the seconds they took."""
    sync(run.ds.device)
    start = time.perf_counter()
    grads = forget_gradients(model, run)
    sync(run.ds.device)
    return grads, time.perf_counter() - start


def unlearn(e, ctx, seed, logger, on_epoch=None):
    """One run; returns (model, mask, result dict). Evaluation time is not part of RTE.
    `on_epoch(epoch, loss, metrics)`, when given, sees every evaluated epoch (a progress bar).

    A run whose loss becomes NaN or infinite stops there; its result has no metrics
    (`diverged_at` says when), so no mean ever includes it.
    """
    device = ctx.ds.device
    seed_everything(seed)
    method = METHODS[e.method]
    if method.fresh_model:
        model = model_from_config(ctx.base_config, device)
    else:  # a copy, not a new model loaded with the weights: building one costs 0.25 s
        model = copy.deepcopy(ctx.base_model)
    if ctx.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = make_run(e, ctx, seed)
    grads, spent = ctx.gradients(model, run) if e.use_mask else (None, 0.0)  # RTE counts their time
    sync(device)
    start = time.perf_counter()
    mask = mask_from_gradients(grads, e.mask_thr).bind(model) if e.use_mask else None
    history, diverged_at, outs = [], None, None
    with contextlib.closing(method.unlearn(model, run, method.settings(**e.method_args), mask)) as epochs:
        for epoch, loss in enumerate(epochs, 1):
            loss = None if loss is None else float(loss)
            sync(device)
            spent += time.perf_counter() - start
            if loss is not None and not math.isfinite(loss):
                diverged_at = epoch
                break
            outs = metrics.evaluate(model, ctx.ds, ctx.split, ctx.compute)
            m = metrics.report(outs, mia=False)
            history.append({"epoch": epoch, "loss": loss, **m})
            logger.log({"loss": loss, **m} if loss is not None else m, step=epoch)
            if on_epoch:
                on_epoch(epoch, loss, m)
            start = time.perf_counter()
    final = metrics.report(outs) if diverged_at is None else None  # the last evaluation, now with the attacks
    result = {"seed": seed, "metrics": final, "rte_s": spent, "diverged_at": diverged_at,
              "mask_fraction": mask.total_fraction if mask else 1.0,
              "mask_zero_fraction": mask.zero_fraction if mask else None, "history": history}
    if ctx.gold and final is not None:
        result["gap"] = metrics.gap(final, ctx.gold)
    return model, mask, result


def make_run(e, ctx, seed):
    device = ctx.ds.device
    return Run(ctx.ds, ctx.split, e.batch_size, make_generator(seed, device), ctx.compute, lr=e.lr, epochs=e.epochs,
               new_model=lambda: model_from_config(ctx.base_config, device), freeze_bn=e.freeze_bn)


# ---------------------------------------------------------------- results

METRIC_KEYS = ("UA", "RA", "TA", "VA", "MIA", "loss_MIA_AUC", "avg_gap")  # n/a when missing
SUMMARY_KEYS = METRIC_KEYS + ("rte_s", "mask_fraction", "mask_zero_fraction")
CSV_ONLY_KEYS = ("TA_forgotten", "VA_forgotten", "loss_MIA_forget", "UA_gap", "RA_gap", "TA_gap", "MIA_gap")
BEATS = "beats_do_nothing"


def read_results(path, run_id):
    """Finished runs; a half-written last line (an interrupted write) is reported and dropped.
    Lines written for another run folder's config are refused: they would be mislabelled."""
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines()
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: ignoring unreadable line {k + 1} of {path} (an interrupted write)", file=sys.stderr)
    foreign = [r for r in rows if not isinstance(r, dict) or r.get("run_id") != run_id]
    if foreign:
        raise UserError(f"{path} holds {len(foreign)} result line(s) of another run (run_id differs from "
                        f"config.json's); resume the folder they came from, or start a new run")
    if len(rows) != len([ln for ln in lines if ln.strip()]):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def flat(row):
    m = dict(row["metrics"])
    m.update(row.get("gap", {}))
    m["rte_s"], m["mask_fraction"] = row["rte_s"], row["mask_fraction"]
    m["mask_zero_fraction"] = row.get("mask_zero_fraction")
    return m


def reference_rows(e, before, gold):
    """The base model's row (with its gap to the gold standard: the do-nothing baseline)
    and the gold standard's row, for one checkpoint and forget set."""
    out = []
    for label, m in (("base (before)", before), ("gold standard", gold)):
        if not m:
            continue
        m = dict(m, **metrics.gap(before, gold)) if label == "base (before)" and gold else m
        out.append({"experiment": label, "method": "-", "mask": "-", "forget": e.spec.describe(), "runs": 1,
                    **{k: (m[k], 0.0) for k in SUMMARY_KEYS + CSV_ONLY_KEYS if m.get(k) is not None}})
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
            table += reference_rows(e, ref["before"], golds.get(key))
        mine = [r for r in rows if r["experiment"] == i]
        if not mine:
            continue
        finished = [flat(r) for r in mine if r["diverged_at"] is None]
        row = {"experiment": name, "method": e.method, "mask": format(e.mask_thr, "g") if e.use_mask else "-",
               "forget": e.spec.describe(), "runs": len(mine), **settings_columns(e)}
        for k in SUMMARY_KEYS + CSV_ONLY_KEYS:
            vals = [m[k] for m in finished if m.get(k) is not None]
            if vals:
                row[k] = mean_std(vals)
        if ref.get("gold") and "avg_gap" in row:
            do_nothing = metrics.gap(ref["before"], ref["gold"])["avg_gap"]
            row[BEATS] = "yes" if row["avg_gap"][0] < do_nothing else "no"
        diverged = [r["diverged_at"] for r in mine if r["diverged_at"]]
        row["diverged"] = f"{len(diverged)}/{len(mine)} diverged (epoch {min(diverged)})" if diverged else ""
        table.append(row)
    return table


def do_nothing_line(table):
    """'k of n experiments are closer to the gold standard than the original model', or None."""
    judged = [r for r in table if BEATS in r]
    if not judged:
        return None
    k = sum(r[BEATS] == "yes" for r in judged)
    return (f"{k} of {len(judged)} experiments are closer to the gold standard than the original model "
            f"(the do-nothing baseline: base row's avg_gap)")


SETTING_KEYS = ("lr", "epochs", "batch_size", "seed", "freeze_bn", "checkpoint", "retrained")


def settings_columns(e):
    """What the experiment ran with, for summary.csv: its settings and its method's (with defaults)."""
    return {**{k: getattr(e, k) for k in SETTING_KEYS},
            **{f"method_args.{k}": v for k, v in method_settings(e).items()}}


COLUMNS = ("experiment", "method", "mask", "forget", "runs") + SUMMARY_KEYS + (BEATS, "diverged")
NUMERIC = SUMMARY_KEYS + CSV_ONLY_KEYS
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
    return ["experiment", "method", "mask", "forget", "runs"] + settings + list(NUMERIC) + [BEATS, "diverged"]


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


def write_summary(run_dir, table, results=()):
    """summary.csv (every setting and metric), summary.md (the full table) and the figures;
    returns the terminal's table."""
    atomic_write_text(run_dir / "summary.csv", csv_text(table))
    md = markdown(COLUMNS, [[cell(row.get(k, "n/a" if k in METRIC_KEYS else ""), k, row.get("runs", 1))
                             for k in COLUMNS] for row in table])
    line = do_nothing_line(table)
    atomic_write_text(run_dir / "summary.md", md + ("\n\n" + line if line else "") + "\n")
    plots.plot_summary(run_dir / "summary.png", table)
    plots.plot_tradeoff(run_dir / "tradeoff.png", table)
    if results:
        plots.plot_curves(run_dir / "curves.png", table, results)
    return screen_table(table) + ("\n\n" + line if line else "")


# ---------------------------------------------------------------- the command line

def method_arg(text):
    """-MA name=value: the value read as JSON when it is JSON (0.9, 3, true), else as text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_experiment_flags(p):
    """One flag per Experiment key, its help and default taken from the field. Flags are
    None unless given, so that only what the user typed overrides the file."""
    g = p.add_argument_group("experiment (each overrides the same key of every experiment in -L)")
    for f in fields(Experiment):
        default = f.default_factory() if f.type is dict else f.default
        notes = ([f"in {f.metadata['interval']}"] if f.metadata["interval"] else []) + \
            ([f"default: {default}"] if default not in (None, {}) else []) + (["repeatable"] if f.type is dict else [])
        kw = dict(dest=f.name, default=None, help=f.metadata["doc"] + (f" ({'; '.join(notes)})" if notes else ""))
        if f.type is bool:
            g.add_argument(*f.metadata["flags"], action="store_true", **kw)
        elif f.type is dict:
            g.add_argument(*f.metadata["flags"], action="append", type=method_arg, metavar="NAME=VALUE", **kw)
        else:
            g.add_argument(*f.metadata["flags"], type=f.type, metavar=f.type.__name__.upper(), **kw)


def methods_help():
    lines = ["methods (-M) and their settings (-MA name=value, or method_args in a file):"]
    for name, m in METHODS.items():
        settings = ", ".join(f"{f.name}={f.default}" for f in fields(m.settings)) or "no settings"
        lines += textwrap.wrap(f"{name}: {m.summary} [{settings}]", 100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines + ["python methods.py prints the table of methods, papers and settings."])


EXECUTORS = ("local", "ray")
EXECUTOR_FLAGS = ("--executor", "--ray-address", "--cpus-per-run", "--gpus-per-run")


def add_executor_flags(p, tasks):
    """--executor and the Ray flags, shared by main.py and audit.py; `tasks` says what becomes a Ray task."""
    g = p.add_argument_group("executor (where the runs compute; results are the same)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help=f"local: the runs one after another in this process; ray: {tasks} (default: %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="with --executor ray: auto or HOST:PORT joins a running Ray cluster (None: start Ray on "
                        "this machine, on the loopback only)")
    g.add_argument("--cpus-per-run", type=float, default=None,
                   help="with --executor ray: CPUs each worker reserves, and its torch threads (None: 1 when the "
                        "runs use GPUs, else the torch threads a local run uses, so the numbers are the same)")
    g.add_argument("--gpus-per-run", type=float, default=None,
                   help="with --executor ray: GPUs each worker reserves; fractions share a GPU, 0.25 packs four "
                        "runs on one (None: 1 when --device is cuda, else 0)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run unlearning experiments (SalUn and the methods it is compared "
                                            "with): each one --nexp times, mean ± std, against a gold standard.",
                                epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-L", "--load", help="JSON list of experiments (default: one experiment from the flags)")
    p.add_argument("--nexp", type=int, default=1, help="runs per experiment, seeds seed, seed+1, ... (default: 1)")
    add_experiment_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    add_precision_flag(p)
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR,
                   help=f"where datasets are found (default: {datasets.DEFAULT_DATA_DIR})")
    p.add_argument("--out", default="output",
                   help="folder the script writes under: <out>/<time>_<file>/ (default: output)")
    p.add_argument("--name", help="run folder name (default: <time>_<experiment file>); never reused")
    p.add_argument("--resume", help="an interrupted run folder: do the runs missing from its results (and retry "
                                    "the runs that failed)")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
    p.add_argument("--save", choices=SAVE_CHOICES, default="last",
                   help="which unlearned models and masks are kept as .pt files: last: each experiment's last "
                        "run; none: no .pt file; all: every run's, as <experiment>_run<k>.pt (default: last)")
    add_executor_flags(p, "each (experiment, run) is a task on a Ray worker")
    args = p.parse_args(argv)
    args.changed = [a.option_strings[0] for a in p._actions  # as the user may have typed them
                    if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default]
    return args


def overrides(args):
    """The experiment keys given on the command line."""
    given = {f.name: getattr(args, f.name) for f in fields(Experiment) if getattr(args, f.name) is not None}
    if "method_args" in given:
        given["method_args"] = dict(given["method_args"])
    return given


def with_overrides(entry, given):
    """An experiment of the file with the command line's keys on top; -MA settings are
    added to the file's method_args rather than replacing them."""
    out = {**entry, **given}
    if "method_args" in given and isinstance(entry.get("method_args"), dict):
        out["method_args"] = {**entry["method_args"], **given["method_args"]}
    return out


def load_list(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"experiment file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


# What --resume may change: where it computes, whether it logs and which models it keeps,
# not what it computes.
RESUME_MAY_CHANGE = {"--resume", "--device", "-NL", "--save", *EXECUTOR_FLAGS}


def resume_plan(args):
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    saved = json.loads((run_dir / "config.json").read_text())
    fixed = [f for f in args.changed if f not in RESUME_MAY_CHANGE and not
             (f == "--precision" and args.precision == saved.get("precision"))]
    if fixed:
        raise UserError(f"--resume continues {run_dir} exactly as it was configured; {', '.join(fixed)} would "
                        f"change it (only --device, -NL, --save and the executor flags may be given): start a new "
                        f"run instead")
    if not {"run_id", "precision"} <= set(saved):
        raise UserError(f"{run_dir} was written by an older version of main.py (no run_id or precision in "
                        f"its config.json) and cannot be resumed; start a new run")
    check_writable(run_dir, "run folder")
    experiments = resolve(saved["experiments"], run_dir / "config.json", saved["data_dir"])
    args.data_dir = saved["data_dir"]
    return experiments, saved


def plan(args, device):
    """(experiments, config) — all checked, the run folder made, nothing computed.
    A resumed run keeps its config.json, precision included."""
    if args.resume:
        return resume_plan(args)
    if args.nexp < 1:
        raise UserError(f"--nexp must be at least 1, got {args.nexp}")
    given = overrides(args)
    if args.load:
        entries, where = load_list(args.load), args.load
        if isinstance(entries, list):
            entries = [with_overrides(x, given) if isinstance(x, dict) else x for x in entries]
    elif not given.keys() & {"checkpoint", *FORGET_KEYS}:
        raise UserError("nothing to unlearn: give an experiment list (-L FILE), or a checkpoint (-c) and what "
                        "to forget (-CF CLASS, -UL FRACTION or -IF JSON); see python main.py -h")
    else:
        entries, where = [given], "command line"
    experiments = resolve(entries, where, args.data_dir)
    check_writable(args.out, "--out")
    compute = compute_for(device, args.precision or default_precision())
    label = Path(args.load).stem if args.load else "cli"
    run_dir = unique_dir(args.out, args.name or f"{timestamp()}_{label}")
    config = {"experiments": [asdict(e) for e in experiments], "names": experiment_names(experiments),
              "nexp": args.nexp, "data_dir": args.data_dir, "precision": compute.precision,
              "device_name": device_name(device), "run_id": uuid.uuid4().hex, "save": args.save,
              "command": sys.argv}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    return experiments, {**config, "run_dir": str(run_dir)}


def save_outputs(run_dir, name, e, ctx, model, mask, result):
    config = dict(ctx.base_config, forget=e.spec.to_config(), forget_idx=ctx.split.forget.tolist(),
                  method=e.method, experiment=asdict(e), metrics=result["metrics"],
                  kept_fraction=mask.kept_fraction if mask else None, **ctx.compute.describe())
    save_checkpoint(run_dir / f"{name}.pt", model.state_dict(), config)
    if mask:
        save_mask(run_dir / "masks" / f"{name}.pt", mask.keep,
                        {"name": name, "experiment": asdict(e), "kept_fraction": mask.kept_fraction,
                         "zero_fraction": mask.zero_fraction})


# ---------------------------------------------------------------- the run loop

SAVE_CHOICES = ("last", "none", "all")


def check_executor(args, device):
    """The executor flags, checked before anything is computed; fills in their defaults."""
    if args.executor != "ray":
        given = [f for f in EXECUTOR_FLAGS[1:] if f in args.changed]
        if given:
            raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --executor ray only")
        return
    if args.gpus_per_run is None:
        args.gpus_per_run = 1.0 if device.type == "cuda" else 0.0
    if args.cpus_per_run is None:  # a CPU worker computes with the threads a local run would use
        args.cpus_per_run = 1.0 if args.gpus_per_run > 0 else float(torch.get_num_threads())
    if not (math.isfinite(args.cpus_per_run) and args.cpus_per_run > 0):
        raise UserError(f"--cpus-per-run must be a number above 0, got {args.cpus_per_run:g}")
    if not (math.isfinite(args.gpus_per_run) and 0 <= args.gpus_per_run):
        raise UserError(f"--gpus-per-run must be 0 or more, got {args.gpus_per_run:g}")
    if args.gpus_per_run > 0 and "--device" in args.changed and device.type != "cuda":
        raise UserError(f"--gpus-per-run {args.gpus_per_run:g} puts the runs on GPUs, --device {args.device} "
                        f"on the CPU; give one or the other")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install -r requirements.txt") from None


def saved_name(name, k, nexp, save):
    """The name run k's model and mask are saved under, or None when --save keeps no file of it."""
    if save == "all":
        return f"{name}_run{k}"
    return name if save == "last" and k == nexp - 1 else None


def append_line(path, row):
    """One whole JSON line in a single write: an interruption leaves the line or nothing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


class RunFolder:
    """What the driver alone writes while runs finish: results.jsonl, and the saved models."""

    def __init__(self, run_dir, run_id, names, nexp, save, rows):
        self.run_dir, self.run_id, self.names, self.nexp, self.save = run_dir, run_id, names, nexp, save
        self.results, self.rows = run_dir / "results.jsonl", rows

    def save_as(self, i, k):
        return saved_name(self.names[i], k, self.nexp, self.save)

    def record(self, i, k, result, describe, write_model):
        """Run k of experiment i: its files through `write_model(name)`, then its results line."""
        name, save_as = self.names[i], self.save_as(i, k)
        if save_as and result["diverged_at"] is None:
            write_model(save_as)
        elif save_as:  # its weights hold NaN/inf: no checkpoint to analyse
            tqdm.write(f"{name}: diverged at epoch {result['diverged_at']}; no checkpoint saved", file=sys.stderr)
        self.add({"experiment": i, "name": name, "run": k, **result, "run_id": self.run_id, **describe})

    def record_failure(self, i, k, seed, error, attempts):
        """A run that raised (or lost its worker) on every attempt: kept with its error, in no mean;
        --resume tries it again."""
        tqdm.write(f"{self.names[i]} run {k}: failed after {attempts} attempts: {error}", file=sys.stderr)
        self.add({"experiment": i, "name": self.names[i], "run": k, "seed": seed, "failed": error,
                  "attempts": attempts, "metrics": None, "diverged_at": None, "history": [], "run_id": self.run_id})

    def add(self, row):
        append_line(self.results, row)
        self.rows.append(row)


def drop_failed(path, rows):
    """Results without the runs that failed, which --resume runs again."""
    kept = [r for r in rows if not r.get("failed")]
    if len(kept) < len(rows):
        print(f"note: trying the {len(rows) - len(kept)} failed run(s) of {path} again", file=sys.stderr)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def run_local(experiments, todo, folder, compute, args):
    """The runs one after another in this process: one bar over every run of the list, the
    current run's epochs under it. Returns the reference metrics of every experiment."""
    cache, refs = {"data_dir": args.data_dir}, {}
    total = len(experiments) * folder.nexp
    with tqdm(total=total, initial=total - len(todo), unit="run", dynamic_ncols=True) as bar:
        for i, e in enumerate(experiments):
            runs = [k for j, k in todo if j == i]
            if runs:  # a finished experiment only gives its reference metrics: no redraw
                bar.set_description(folder.names[i])
            ctx = prepare(e, compute, cache)
            refs[i] = {"before": ctx.before, "gold": ctx.gold}
            for k in runs:
                with tqdm(total=e.epochs, desc=f"  run {k + 1}/{folder.nexp}", unit="epoch", position=1,
                          leave=False, dynamic_ncols=True) as epochs:
                    def show(epoch, loss, m):
                        epochs.set_postfix_str(("" if loss is None else f"loss {loss:.4f}, ") +
                                               f"UA {m['UA']:.1f}, RA {m['RA']:.1f}", refresh=False)
                        epochs.update()
                    logger = Logger(not args.no_log, "salun-deepdive",
                                    f"{folder.run_dir.name}/{folder.names[i]}/run{k}", asdict(e))
                    model, mask, result = unlearn(e, ctx, e.seed + k, logger, show)
                    logger.finish()
                folder.record(i, k, result, compute.describe(),
                              lambda name: save_outputs(folder.run_dir, name, e, ctx, model, mask, result))
                bar.update()
    return refs


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


def failure_lines(failed, run_dir):
    lines = [f"failed: {r['name']} run {r['run']} (seed {r['seed']}): {r['failed']}" for r in failed]
    return lines + [f"{len(failed)} run(s) failed and are in no mean; {resume_command(run_dir)} tries them again"]


def resume_command(run_dir, args=None):
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("main.py") else "main.py"
    extra = " -NL" if args is not None and args.no_log else ""
    return f"python {shlex.quote(script)} --resume {shlex.quote(str(run_dir))}{extra}"


def main(argv=None):
    args = parse_args(argv)
    device = get_device(args.device)
    check_executor(args, device)
    experiments, config = plan(args, device)
    run_dir = Path(config.get("run_dir") or args.resume)
    names, nexp = config["names"], config["nexp"]
    save = args.save if not args.resume or "--save" in args.changed else config.get("save", "last")
    compute = compute_for(device, config["precision"])
    announce_compute(compute, config["precision"])
    results_path = run_dir / "results.jsonl"
    rows = drop_failed(results_path, read_results(results_path, config["run_id"]))
    done = {(r["experiment"], r["run"]) for r in rows}
    todo = [(i, k) for i in range(len(experiments)) for k in range(nexp) if (i, k) not in done]
    print(f"run folder: {run_dir} ({len(experiments)} experiments x {nexp} runs, {len(done)} already done)")
    folder = RunFolder(run_dir, config["run_id"], names, nexp, save, rows)
    try:
        if args.executor == "ray" and todo:
            import ray_executor  # Ray is imported only when asked for
            refs = ray_executor.run(experiments, todo, folder, config["precision"], args)
        else:
            refs = run_local(experiments, todo, folder, compute, args)
    except KeyboardInterrupt:
        print(f"interrupted: {len(folder.rows)} of {len(experiments) * nexp} runs are in {results_path}; "
              f"resume with: {resume_command(run_dir, args)}", file=sys.stderr)
        sys.exit(130)
    finished = sorted((r for r in folder.rows if not r.get("failed")), key=lambda r: (r["experiment"], r["run"]))
    failed = sorted((r for r in folder.rows if r.get("failed")), key=lambda r: (r["experiment"], r["run"]))
    table = summarize(names, experiments, finished, refs)
    note_failures(table, names, experiments, failed, nexp)
    md = write_summary(run_dir, table, finished)
    if failed:  # said last, where the eye ends up
        lines = "\n".join(failure_lines(failed, run_dir))
        summary_md = run_dir / "summary.md"
        atomic_write_text(summary_md, summary_md.read_text().rstrip("\n") + "\n\n" + lines + "\n")
        md += "\n\n" + lines
    if (run_dir / "masks").is_dir():
        plots.plot_masks(run_dir)
    print(md)
    print(f"results: {run_dir}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
