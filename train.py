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
written. `fit` is the toolkit's only training loop: audit.py trains its reference models
with it.
"""
import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import datasets
import metrics
from datasets import ForgetSpec
from methods import make_optimizer, sgd_pass, cross_entropy, Run
from models import CHECKPOINT_FORMAT, check_model_name, create_model
from utils import (Logger, UserError, add_precision_flag, announce_compute, atomic_write, atomic_write_text,
                   check_writable, cli, compute_for, default_precision, get_device, make_generator,
                   save_checkpoint, seed_everything)


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


# ---------------------------------------------------------------- the training loop

@dataclass(frozen=True)
class Recipe:
    """How a model is trained: everything but the data and the seed."""
    model: str
    lr: float
    epochs: int
    batch_size: int
    pretrained: bool = False


RESUME_SUFFIX = ".resume"  # not .pt: no script that reads a folder of checkpoints picks it up


def resume_path(path):
    """The file train.py rewrites after every epoch and deletes once `path` is written."""
    return Path(path).with_suffix(RESUME_SUFFIX)


def fit(ds, train_idx, val_idx, recipe, seed, compute, state_path=None, resume=False, stop_after=None,
        name="train", verbose=True, logger=None):
    """The toolkit's one training loop: a model of `recipe` trained on `train_idx` from
    `seed` (initialisation and batch order), SGD with a one-cycle schedule, and the epoch
    with the best accuracy on `val_idx` kept. Returns (model, stem, result) or, when
    `stop_after` stops it early, (None, stem, None).

    With `state_path`, everything the next epoch depends on (weights, optimizer,
    scheduler, best state so far, generator and RNG states) is written there after every
    epoch, atomically; `resume` continues from it, and the weights come out bit for bit
    as without the interruption (on a CPU with the same thread count).
    """
    device = ds.device
    seed_everything(seed)
    model, stem = create_model(recipe.model, ds.num_classes, ds.in_chans, ds.img_size, recipe.pretrained)
    memory_format = torch.channels_last if compute.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    gen = make_generator(seed, device)
    run = Run(ds, None, recipe.batch_size, gen, compute)
    opt = make_optimizer(model, recipe.lr)
    steps = recipe.epochs * math.ceil(len(train_idx) / recipe.batch_size)
    # One cycle: a short warm-up then cosine decay, which fits any epoch budget.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.15,
                                                cycle_momentum=False)
    best = {"acc": -1.0, "epoch": 0, "state": None}
    history, first, key = [], 1, (recipe, seed, compute, train_idx)
    if resume:
        first, best, history = load_state(state_path, model, opt, sched, gen, key)
    every = max(1, recipe.epochs // 10)  # about ten lines per training, so a log shows the curve
    bar = tqdm(range(first, recipe.epochs + 1), desc=name, unit="epoch", disable=not verbose,
               initial=first - 1, total=recipe.epochs)
    for epoch in bar:
        loss = sgd_pass(model, opt, run, train_idx, cross_entropy, sched=sched).item()
        if not math.isfinite(loss):
            raise UserError(f"training diverged at epoch {epoch} (loss {loss}); lower --lr")
        val_acc = metrics.accuracy(metrics.predict(model, ds, val_idx, compute))
        if val_acc > best["acc"]:
            best = {"acc": val_acc, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        history.append({"epoch": epoch, "loss": loss, "val_acc": val_acc})
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_acc:.1f}")
        if verbose and (epoch % every == 0 or epoch == recipe.epochs):
            tqdm.write(f"{name}: epoch {epoch}/{recipe.epochs} loss {loss:.4f} val {val_acc:.2f}% "
                       f"lr {sched.get_last_lr()[0]:.4g}")
        if logger is not None:
            logger.log({"train/loss": loss, "val/acc": val_acc, "lr": sched.get_last_lr()[0]}, step=epoch)
        if state_path is not None and epoch < recipe.epochs:
            save_state(state_path, model, opt, sched, gen, best, history, epoch, key)
        if stop_after is not None and epoch >= stop_after and epoch < recipe.epochs:
            bar.close()
            return None, stem, None
    model.load_state_dict(best["state"])
    return model, stem, {"best_epoch": best["epoch"], "val_acc": best["acc"], "history": history}


def state_key(key):
    """What a resumed training must share with the one that wrote the state."""
    recipe, seed, compute, train_idx = key
    digest = hashlib.sha256(train_idx.cpu().numpy().tobytes()).hexdigest()[:16]
    return {**asdict(recipe), "seed": seed, "precision": compute.precision, "training set": digest}


def save_state(path, model, opt, sched, gen, best, history, epoch, key):
    state = {"key": state_key(key), "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "gen": gen.get_state(), "rng": torch.get_rng_state(),
             "best_acc": best["acc"], "best_epoch": best["epoch"], "best_state": best["state"],
             "history": history}
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path, model, opt, sched, gen, key):
    """Restore what save_state wrote; returns (next epoch, best so far, history)."""
    if not Path(path).is_file():
        raise UserError(f"nothing to resume: {path} not found (train.py writes it after each epoch and "
                        f"deletes it when training ends); run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupted ({str(e).splitlines()[0][:80]}); "
                        f"run without --resume to start over") from None
    if state["key"] != state_key(key):
        changed = ", ".join(k for k, v in state_key(key).items() if state["key"].get(k) != v)
        raise UserError(f"{path} was written by a training with other settings ({changed} differ); "
                        f"resume with the same command, or run without --resume to start over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    best = {"acc": state["best_acc"], "epoch": state["best_epoch"], "state": state["best_state"]}
    return state["epoch"] + 1, best, state["history"]


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
