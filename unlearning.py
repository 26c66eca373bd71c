"""One unlearning run: an experiment's shared context (data, split, base model, reference
metrics), then `unlearn` on a copy of the base model.

    ctx = unlearning.prepare(experiment, compute, cache)   # cache: {"data_dir": ...} and what runs share
    model, mask, result = unlearning.unlearn(experiment, ctx, seed, logger)

The same code runs a study's runs in main.py's process and on Ray workers (study.py),
the unlearning runs of audit.py (auditing.py) and tune.py's trials (tuning.py, with its
own judge of each epoch). RTE counts the saliency gradients, the mask and the method's
epochs, never the evaluations between them.
"""
import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch

import datasets
import metrics
from methods import METHODS, Run, cross_entropy, forget_gradients, make_optimizer, mask_from_gradients, sgd_pass
from models import load_model, model_from_config
from utils import make_generator, seed_everything


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


def prepare(e, compute, cache, references=True):
    """The experiment's Context. `cache` keeps what experiments share: datasets, base
    models, the reference evaluations (the same checkpoint on the same split is evaluated
    once), the forget-set gradients the masks are cut from, and which (checkpoint,
    method, batch size) has been warmed up. Without `references`, the base and gold models
    are not evaluated (a tuning trial, which may not read the test set)."""
    device = compute.device
    if ("model", e.checkpoint) not in cache:
        cache["model", e.checkpoint] = load_model(e.checkpoint, device)
    base, cfg = cache["model", e.checkpoint]
    if cfg["dataset"] not in cache:
        cache[cfg["dataset"]] = datasets.load_dataset(cfg["dataset"], cache["data_dir"], device)
    ds = cache[cfg["dataset"]]
    split = datasets.make_split(ds, e.spec, seed=e.split_seed, val_idx=cfg["val_idx"])

    def evaluated(path, model=None):
        key = ("report", path, e.checkpoint, repr(e.spec), e.split_seed)  # what the split depends on
        if key not in cache:
            model = model if model is not None else load_model(path, device)[0]
            cache[key] = metrics.report(metrics.evaluate(model, ds, split, compute))
        return cache[key]

    def gradients(model, run):
        """The base model's gradients depend only on the checkpoint, the forget set and the
        batch size, so every masked run on them shares one computation and its time."""
        if METHODS[e.method].fresh_model:  # a model trained from scratch has its own
            return timed_gradients(model, run)
        key = ("gradients", e.checkpoint, repr(e.spec), e.split_seed, e.batch_size)
        if key not in cache:
            cache[key] = timed_gradients(model, run)
        return cache[key]

    before = evaluated(e.checkpoint, base) if references else None
    gold = evaluated(e.retrained) if e.retrained and references else None
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


CURVE_SAMPLE = 2000  # samples per split (and of the test set) at a curve point between epochs


class Report:
    """main.py's evaluation of a run: a curve point after each epoch, from at most
    CURVE_SAMPLE samples per split, and one full evaluation, with the attacks, of the final
    model (the last epoch's curve point is that evaluation)."""

    def __init__(self, ctx, sample=CURVE_SAMPLE):
        self.ctx, self.sample, self.outs, self.whole = ctx, sample, None, False

    def point(self, model, epoch, last):
        """The curve point after `epoch`; `last`: the method's last epoch."""
        ctx = self.ctx
        self.outs = metrics.evaluate(model, ctx.ds, ctx.split, ctx.compute, sample=None if last else self.sample)
        self.whole = last
        return metrics.report(self.outs, mia=False)

    def final(self, model):
        ctx = self.ctx
        if not self.whole:  # a method that ended before its last epoch (one shot)
            self.outs = metrics.evaluate(model, ctx.ds, ctx.split, ctx.compute)
        m = metrics.report(self.outs)
        return m, ({"gap": metrics.gap(m, ctx.gold)} if ctx.gold else {})


def unlearn(e, ctx, seed, logger, on_epoch=None, judge=None):
    """One run; returns (model, mask, result dict). Evaluation time is not part of RTE.
    `judge` evaluates the model after each epoch and at the end (default: a `Report`);
    `on_epoch(epoch, loss, metrics)`, when given, sees every evaluated epoch (a progress bar).

    A run whose loss becomes NaN or infinite stops there; its result has no metrics
    (`diverged_at` says when), so no mean ever includes it.
    """
    device = ctx.ds.device
    judge = judge or Report(ctx)
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
    history, diverged_at = [], None
    with contextlib.closing(method.unlearn(model, run, method.settings(**e.method_args), mask)) as epochs:
        for epoch, loss in enumerate(epochs, 1):
            loss = None if loss is None else float(loss)
            sync(device)
            spent += time.perf_counter() - start
            if loss is not None and not math.isfinite(loss):
                diverged_at = epoch
                break
            m = judge.point(model, epoch, epoch >= e.epochs)
            if m is not None:
                history.append({"epoch": epoch, "loss": loss, **m})
                logger.log({"loss": loss, **m} if loss is not None else m, step=epoch)
                if on_epoch:
                    on_epoch(epoch, loss, m)
            start = time.perf_counter()
    final, extra = judge.final(model) if diverged_at is None else (None, {})
    result = {"seed": seed, "metrics": final, "rte_s": spent, "diverged_at": diverged_at,
              "mask_fraction": mask.total_fraction if mask else 1.0,
              "mask_zero_fraction": mask.zero_fraction if mask else None, "history": history, **extra}
    return model, mask, result


def make_run(e, ctx, seed):
    device = ctx.ds.device
    return Run(ctx.ds, ctx.split, e.batch_size, make_generator(seed, device), ctx.compute, lr=e.lr, epochs=e.epochs,
               new_model=lambda: model_from_config(ctx.base_config, device), freeze_bn=e.freeze_bn)
