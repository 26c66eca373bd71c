"""Unlearning experiments: each experiment --nexp times, mean ± std, against a gold standard.

    python main.py -L exp/classforget.json --nexp 5
    python main.py -c checkpoints/resnet18_digits_base.pt -CF 0 -M rl_split -UM -MT 0.2 -NL
    python main.py -c checkpoints/resnet18_digits_base.pt -CF 3 -M scrub -MA msteps=1 -E 3 -LR 0.01 -NL
    python main.py --resume output/20261130-101500_classforget

Results go to output/<run>/: config.json (the resolved experiments), results.jsonl (one
line per finished run, written as it ends), summary.csv / summary.md / summary.png, and
per experiment the unlearned model of its last run (<name>.pt, train.py's format) and
its saliency mask (masks/<name>.pt).
"""
import argparse
import contextlib
import copy
import json
import math
import re
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
                   save_checkpoint, seed_everything, setting, settings_problems, timestamp, unique_dir)


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
    lr: float = setting(0.1, "SGD learning rate (momentum 0.9, weight decay 5e-4)", "(0, inf)", flags=("-LR", "--lr"))
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
            return out + [("checkpoint", str(err))]
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
            return [("retrained", str(err))]
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


def resolve(entries, where, data_dir):
    """Experiments from raw dicts (file values with the command line's on top); every problem at once."""
    if not isinstance(entries, list) or not entries or not all(isinstance(x, dict) for x in entries):
        raise UserError(f"{where}: expected a non-empty list of experiment objects")
    problems, experiments, checker = [], [], Checker(data_dir)
    for i, entry in enumerate(entries):
        here = f"{where}: experiment {i}"
        bad = settings_problems(Experiment, entry)
        problems += [f"{here}: {msg}" if k not in KEYS else f"{here}: {k}: {msg}" for k, msg in bad.items()]
        # The rest of the experiment is still checked, with defaults in place of the bad values;
        # what depends on a bad checkpoint or forget key is not (it would only repeat the problem).
        e = Experiment(**{k: v for k, v in entry.items() if k not in bad})
        local = method_problems(e) if not {"method", "method_args"} & set(bad) else []
        if not set(bad) & {"checkpoint", "retrained", "seed", *FORGET_KEYS}:
            local += checker.problems(e)
        problems += [f"{here}: {key}: {msg}" for key, msg in local]
        experiments.append(e)
    if problems:
        raise UserError("\n".join(problems))
    return experiments


def experiment_names(experiments):
    names = []
    for i, e in enumerate(experiments):
        auto = f"{e.method}{'_mask' + format(e.mask_thr, 'g') if e.use_mask else ''}_{e.spec.describe()}"
        names.append(f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "-", e.tag or auto))
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


def unlearn(e, ctx, seed, logger):
    """One run; returns (model, mask, result dict). Evaluation time is not part of RTE.

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
               new_model=lambda: model_from_config(ctx.base_config, device))


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
               "forget": e.spec.describe(), "runs": len(mine)}
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


COLUMNS = ("experiment", "method", "mask", "forget", "runs") + SUMMARY_KEYS + (BEATS, "diverged")
CSV_COLUMNS = COLUMNS[:-2] + CSV_ONLY_KEYS + COLUMNS[-2:]
NUMERIC = SUMMARY_KEYS + CSV_ONLY_KEYS


def cell(v, key):
    if isinstance(v, tuple):
        digits = 3 if key in ("rte_s", "mask_fraction", "mask_zero_fraction") else 2
        return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if not math.isnan(v[0]) else "n/a"
    return str(v)


def csv_line(row):
    vals = []
    for k in CSV_COLUMNS:
        v = row.get(k, "")
        if k in NUMERIC:
            vals += [f"{v[0]:.4f}", f"{v[1]:.4f}"] if v else ["", ""]
        else:
            vals.append(f'"{v}"' if "," in str(v) else str(v))
    return ",".join(vals)


def write_summary(run_dir, table):
    """summary.csv, summary.md and summary.png; returns the Markdown to print."""
    header = [c for k in CSV_COLUMNS for c in ((k, k + "_std") if k in NUMERIC else (k,))]
    atomic_write_text(run_dir / "summary.csv", "\n".join([",".join(header)] + [csv_line(r) for r in table]) + "\n")
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(row.get(k, "n/a" if k in METRIC_KEYS else ""), k) for k in COLUMNS) + " |"
           for row in table]
    line = do_nothing_line(table)
    text = "\n".join(md) + ("\n\n" + line if line else "")
    atomic_write_text(run_dir / "summary.md", text + "\n")
    plots.plot_summary(run_dir / "summary.png", table)
    return text


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
    p.add_argument("--out", default="output", help="parent folder of the run folder (default: output)")
    p.add_argument("--name", help="run folder name (default: <time>_<experiment file>); never reused")
    p.add_argument("--resume", help="an interrupted run folder: do the runs missing from its results")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
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


# What --resume may change: where it computes and whether it logs, not what it computes.
RESUME_MAY_CHANGE = {"--resume", "--device", "-NL"}


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
                        f"change it (only --device and -NL may be given): start a new run instead")
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
    else:
        entries, where = [given], "command line"
    experiments = resolve(entries, where, args.data_dir)
    check_writable(args.out, "--out")
    compute = compute_for(device, args.precision or default_precision())
    label = Path(args.load).stem if args.load else "cli"
    run_dir = unique_dir(args.out, args.name or f"{timestamp()}_{label}")
    config = {"experiments": [asdict(e) for e in experiments], "names": experiment_names(experiments),
              "nexp": args.nexp, "data_dir": args.data_dir, "precision": compute.precision,
              "device_name": device_name(device), "run_id": uuid.uuid4().hex, "command": sys.argv}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    return experiments, {**config, "run_dir": str(run_dir)}


def save_outputs(run_dir, name, e, ctx, model, mask, result):
    config = dict(ctx.base_config, forget=e.spec.to_config(), forget_idx=ctx.split.forget.tolist(),
                  method=e.method, experiment=asdict(e), metrics=result["metrics"],
                  kept_fraction=mask.kept_fraction if mask else None, **ctx.compute.describe())
    save_checkpoint(run_dir / f"{name}.pt", model.state_dict(), config)
    if mask:
        save_checkpoint(run_dir / "masks" / f"{name}.pt", mask.keep,
                        {"name": name, "experiment": asdict(e), "kept_fraction": mask.kept_fraction,
                         "zero_fraction": mask.zero_fraction})


def main(argv=None):
    args = parse_args(argv)
    device = get_device(args.device)
    experiments, config = plan(args, device)
    run_dir = Path(config.get("run_dir") or args.resume)
    names, nexp = config["names"], config["nexp"]
    compute = compute_for(device, config["precision"])
    announce_compute(compute, config["precision"])
    results_path = run_dir / "results.jsonl"
    rows = read_results(results_path, config["run_id"])
    done = {(r["experiment"], r["run"]) for r in rows}
    print(f"run folder: {run_dir} ({len(experiments)} experiments x {nexp} runs, {len(done)} already done)")
    cache, refs = {"data_dir": args.data_dir}, {}
    stamp = {"run_id": config["run_id"], **compute.describe()}
    for i, (name, e) in enumerate(zip(names, experiments)):
        todo = [k for k in range(nexp) if (i, k) not in done]
        ctx = prepare(e, compute, cache)
        refs[i] = {"before": ctx.before, "gold": ctx.gold}
        for k in tqdm(todo, desc=name, unit="run", disable=not todo):
            logger = Logger(not args.no_log, "salun-deepdive", f"{run_dir.name}/{name}/run{k}", asdict(e))
            model, mask, result = unlearn(e, ctx, e.seed + k, logger)
            logger.finish()
            if k == nexp - 1 and result["diverged_at"] is None:
                save_outputs(run_dir, name, e, ctx, model, mask, result)
            elif k == nexp - 1:  # its weights hold NaN/inf: no checkpoint to analyse
                print(f"{name}: diverged at epoch {result['diverged_at']}; no checkpoint saved",
                      file=sys.stderr)
            row = {"experiment": i, "name": name, "run": k, **result, **stamp}
            with open(results_path, "a") as f:  # one whole line per run, flushed as it ends
                f.write(json.dumps(row) + "\n")
                f.flush()
            rows.append(row)
    table = summarize(names, experiments, rows, refs)
    md = write_summary(run_dir, table)
    if (run_dir / "masks").is_dir():
        plots.plot_masks(run_dir)
    print(md)
    print(f"results: {run_dir}")


if __name__ == "__main__":
    cli(main)
