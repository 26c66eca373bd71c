"""Train a base model, or a gold-standard model retrained without a forget set.

    python train.py                                              # resnet18 on cifar10
    python train.py --model resnet18 --dataset cifar100 --cf 7   # without class 7
    python train.py --dataset svhn --unlr 0.1                    # without a random 10%
    python train.py --dataset svhn --itf checkpoints/resnet18_svhn_rf0.1_forget.json
    python train.py --dataset digits --epochs 15 -NL             # seconds, offline
    python train.py --dataset svhn --unlr 0.1 --resume           # after an interruption

Writes <save-dir>/<model>_<dataset>_<comment>.pt (the best epoch on validation) and
<model>_<dataset>_<comment>_forget.json (the sorted forgotten training indices). While it
trains, <name>.resume beside them holds the state after the last finished epoch (weights,
optimizer, schedule, best epoch so far, random states); `--resume` continues from it with
the same final weights as an uninterrupted run, and it is deleted once the checkpoint is
written. The training loop is training.py's `fit`.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import datasets
import metrics
from datasets import ForgetSpec
from models import CHECKPOINT_FORMAT, check_model_name
from training import Recipe, fit, resume_path
from utils import (Logger, UserError, add_precision_flag, announce_compute, atomic_write_text, check_writable, cli,
                   compute_for, default_precision, get_device, save_checkpoint)


def build_parser():
    p = argparse.ArgumentParser(description="Train a base or gold-standard (retrained) model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", help="any timm model name")
    p.add_argument("--dataset", default="cifar10", help=", ".join(datasets.DATASETS))
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of SGD")
    p.add_argument("-CF", "--cf", type=int, default=None, metavar="CLASS",
                   help="class to leave out of training; None: no class")
    p.add_argument("-UL", "--unlr", type=float, default=None, metavar="FRACTION",
                   help="fraction of the training set to leave out, at random, in (0, 1); None: none")
    p.add_argument("-IF", "--itf", default=None, metavar="JSON",
                   help="forget-index JSON: leave exactly these samples out; None: no index file")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="samples per SGD step (main.py's default too)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the split and the batches")
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR, help="dataset download folder")
    p.add_argument("--save-dir", default="checkpoints", help="folder of the checkpoint and its forget file")
    p.add_argument("--comment", default=None,
                   help="checkpoint name suffix; None: base, cf<c>, rf<r> or itf_<file>")
    p.add_argument("--pretrained", action="store_true", help="start from timm's ImageNet weights")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    add_precision_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training of the same command from <save-dir>/<name>.resume")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch, keeping <name>.resume for a later --resume (a training "
                        "split over several sessions); None: train to the end")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def forget_spec(args, num_classes=None):
    spec = ForgetSpec(class_to_forget=args.cf, unlearning_rate=args.unlr, idxs_to_forget=args.itf)
    problems = spec.problems(num_classes)
    if args.unlr == 0:
        problems = [("unlearning_rate", "0 leaves nothing out; to train a base model, leave --unlr out")]
    if problems:
        raise UserError("\n".join(f"{datasets.FORGET_FLAGS.get(key, key)}: {msg}" for key, msg in problems))
    return spec


def default_comment(spec):
    if spec.class_to_forget is not None:
        return f"cf{spec.class_to_forget}"
    if spec.unlearning_rate is not None:
        return f"rf{spec.unlearning_rate:g}"
    if spec.idxs_to_forget is not None:
        return "itf_" + Path(spec.idxs_to_forget).stem.removesuffix("_forget")
    return "base"


def check_args(args):
    """Everything that can be wrong with the command line, before any data is read."""
    if args.epochs < 1 or args.batch_size < 1 or not 0 < args.lr < math.inf:
        raise UserError("--epochs, --batch-size and --lr must be positive (and --lr finite)")
    datasets.check_dataset_name(args.dataset)
    check_model_name(args.model)
    spec = forget_spec(args)
    name = f"{args.model}_{args.dataset}_{args.comment or default_comment(spec)}"
    path = Path(args.save_dir) / f"{name}.pt"
    if path.exists() and not args.overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --comment")
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be at least 1, got {args.stop_after}")
    if args.resume and not resume_path(path).is_file():
        raise UserError(f"nothing to resume: {resume_path(path)} not found (train.py writes it after each epoch "
                        f"and deletes it when training ends); run without --resume")
    check_writable(args.save_dir, "--save-dir")
    args.precision = args.precision or default_precision()
    return spec, name, path


# ---------------------------------------------------------------- the script

def train(args, spec, name, path):
    device = get_device(args.device)
    compute = compute_for(device, args.precision)
    announce_compute(compute, args.precision)
    ds = datasets.load_dataset(args.dataset, args.data_dir, device)
    forget_spec(args, ds.num_classes)
    split = datasets.make_split(ds, spec, seed=args.seed)
    recipe = Recipe(args.model, args.lr, args.epochs, args.batch_size, args.pretrained)
    config = {"format": CHECKPOINT_FORMAT, "model": args.model, "dataset": args.dataset,
              "num_classes": ds.num_classes, "in_chans": ds.in_chans, "img_size": ds.img_size,
              "n_train": len(ds.y_train), "stem": None, "seed": args.seed, "pretrained": args.pretrained,
              "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "forget": spec.to_config(),
              "forget_idx": split.forget.tolist(), "val_idx": torch.nonzero(split.in_val).flatten().tolist(),
              "method": "train", **compute.describe()}
    logger = Logger(not args.no_log, "salun-deepdive", name, config)
    state = resume_path(path)
    # retain: everything but the forget set and the held-out validation set
    model, config["stem"], fitted = fit(ds, split.retain, split.val, recipe, args.seed, compute, state_path=state,
                                        resume=args.resume, stop_after=args.stop_after, name=name, logger=logger)
    if model is None:
        logger.finish()
        return None
    test = metrics.predict(model, ds, torch.arange(len(ds.y_test), device=device), compute, test=True)
    outs = metrics.test_splits(test, split.forget_class)
    result = {"best_epoch": fitted["best_epoch"], "val_acc": fitted["val_acc"],
              "test_top1": metrics.accuracy(outs["test"]), "test_top5": metrics.top5_accuracy(outs["test"])}
    if "test_forgotten" in outs:
        result["test_forgotten_acc"] = metrics.accuracy(outs["test_forgotten"])
    config["metrics"] = result
    save_checkpoint(path, model.state_dict(), config)
    atomic_write_text(path.with_name(f"{name}_forget.json"), json.dumps(split.forget.tolist()))
    state.unlink(missing_ok=True)
    logger.log({f"final/{k}": v for k, v in result.items()})
    logger.finish()
    return result


def main(argv=None):
    args = parse_args(argv)
    spec, name, path = check_args(args)
    start = time.time()
    try:
        r = train(args, spec, name, path)
    except KeyboardInterrupt:
        if resume_path(path).is_file():
            print(f"{name}: {resume_path(path)} holds the last finished epoch; continue with the same command "
                  f"and --resume", file=sys.stderr)
        raise
    if r is None:
        print(f"{name}: stopped after epoch {args.stop_after} of {args.epochs}; {resume_path(path)} holds its "
              f"state; continue with the same command and --resume (without --stop-after)")
        return
    what = "test (remaining classes)" if args.cf is not None else "test"
    line = f"{name}: {what} top-1 {r['test_top1']:.2f}% top-5 {r['test_top5']:.2f}%"
    if "test_forgotten_acc" in r:
        line += f", class {args.cf} test {r['test_forgotten_acc']:.2f}%"
    print(f"{line}; val {r['val_acc']:.2f}% (epoch {r['best_epoch']}); "
          f"{time.time() - start:.0f}s; saved {path}")


if __name__ == "__main__":
    cli(main)
