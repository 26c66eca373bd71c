"""The toolkit's one training loop: `fit`, a model of a `Recipe` trained on given indices from a seed.

    model, stem, result = training.fit(ds, split.retain, split.val, Recipe("resnet18", 0.1, 30, 64), 0, compute)

train.py trains base and gold-standard models with it; audit.py its reference models
(auditing.py, references.py), and a `retrain` run of an audit its new models. With a state
file it writes what the next epoch depends on after every epoch, so an interrupted training
resumes to the same final weights.
"""
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import metrics
from methods import make_optimizer, sgd_pass, cross_entropy, Run
from models import create_model
from utils import UserError, atomic_write, make_generator, seed_everything


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
