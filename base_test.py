"""Evaluate checkpoints without unlearning them: the same metrics as main.py.

    python base_test.py -c checkpoints/resnet18_digits_base.pt checkpoints/resnet18_digits_cf0.pt
    python base_test.py -c checkpoints/resnet18_cifar10_base.pt --cf 0   # on another forget set

Each checkpoint is evaluated on its own split (its forget set and validation indices),
or on the forget spec given with --cf / --unlr / --itf. Prints one table and writes
it as JSON under --out (default output/).
"""
import argparse
import json
import math
from pathlib import Path

import datasets
import metrics
from datasets import ForgetSpec
from models import load_model, load_model_checkpoint
from utils import UserError, atomic_write_text, check_writable, cli, compute_for, get_device, timestamp


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate checkpoints: accuracy/loss per split, UA/RA/TA/VA, MIAs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--checkpoints", nargs="+", required=True, default=argparse.SUPPRESS,
                   help="checkpoint files to evaluate")
    p.add_argument("-CF", "--cf", type=int, default=None, metavar="CLASS",
                   help="evaluate as if forgetting this class; with none of -CF/-UL/-IF, each checkpoint's "
                        "own forget set")
    p.add_argument("-UL", "--unlr", type=float, default=None, metavar="FRACTION",
                   help="evaluate as if forgetting a random fraction (drawn from --seed)")
    p.add_argument("-IF", "--itf", default=None, metavar="JSON",
                   help="evaluate as if forgetting the indices in this JSON file")
    p.add_argument("--seed", type=int, default=None, help="draws the --unlr forget set; None: the checkpoint's seed")
    p.add_argument("--no-mia", action="store_true", help="skip the membership-inference attacks")
    p.add_argument("--out", default="output", help="folder the script writes under: <out>/base_test_<time>.json")
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR, help="dataset download folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def split_for(ds, cfg, spec, seed):
    """The checkpoint's own split, unless a forget spec was given; its validation set always."""
    if spec.is_empty:
        own = ForgetSpec(class_to_forget=cfg["forget"].get("class_to_forget"))
        return datasets.make_split(ds, own, val_idx=cfg["val_idx"], forget_idx=cfg["forget_idx"])
    return datasets.make_split(ds, spec, seed=cfg["seed"] if seed is None else seed, val_idx=cfg["val_idx"])


def evaluate_checkpoint(path, spec, args, device, cache):
    model, cfg = load_model(path, device)
    if cfg["dataset"] not in cache:
        cache[cfg["dataset"]] = datasets.load_dataset(cfg["dataset"], args.data_dir, device)
    ds = cache[cfg["dataset"]]
    problems = spec.problems(ds.num_classes)
    if problems:
        raise UserError("\n".join(f"{path}: {datasets.FORGET_FLAGS.get(key, key)}: {msg}" for key, msg in problems))
    split = split_for(ds, cfg, spec, args.seed)
    outs = metrics.evaluate(model, ds, split, compute_for(device, "fp32"))
    return {"checkpoint": str(path), "dataset": cfg["dataset"], "model": cfg["model"],
            "forget": split.forget_class if split.forget_class is not None else len(split.forget),
            "splits": metrics.split_table(outs), **metrics.report(outs, mia=not args.no_mia)}


def fmt(v):
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" if isinstance(v, float) else str(v)


def print_table(rows):
    split_names = [s for s in metrics.SPLITS if any(s in r["splits"] for r in rows)]
    extra = [k for k in ("UA", "RA", "TA", "VA", "TA_forgotten", "VA_forgotten", "MIA", "loss_MIA_AUC",
                         "loss_MIA_forget")
             if any(k in r for r in rows)]
    head = ["checkpoint"] + [f"{s} acc/loss" for s in split_names] + extra
    body = [[Path(r["checkpoint"]).stem] +
            [f"{fmt(r['splits'][s]['acc'])} / {fmt(r['splits'][s]['loss'])}" if s in r["splits"] else "-"
             for s in split_names] + [fmt(r.get(k, float("nan"))) for k in extra] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    for line in [head] + body:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def main(argv=None):
    args = parse_args(argv)
    spec = ForgetSpec(args.cf, args.unlr, args.itf)
    problems = spec.problems()
    if problems:
        raise UserError("\n".join(f"{datasets.FORGET_FLAGS.get(key, key)}: {msg}" for key, msg in problems))
    for path in args.checkpoints:
        load_model_checkpoint(path)  # every checkpoint checked before any is evaluated
    check_writable(args.out, "--out")
    out = Path(args.out) / f"base_test_{timestamp()}.json"
    device = get_device(args.device)
    cache = {}
    rows = [evaluate_checkpoint(path, spec, args, device, cache) for path in args.checkpoints]
    print_table(rows)
    atomic_write_text(out, json.dumps(rows, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    cli(main)
