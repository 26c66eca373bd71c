"""The unlearning methods, each one epoch function, and SalUn's saliency mask.

    mask = saliency_mask(model, run, mask_thr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        loss = METHODS["rl_split"].epoch(model, opt, run, mask)

A `Run` carries what every epoch needs (data, split, batch size, generator, compute).
With a mask, only the kept entries move: gradients are masked (as SalUn does) and,
after every step, the other entries are put back bit for bit, so momentum and weight
decay cannot leak into them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datasets import batches
from utils import Compute


@dataclass
class Run:
    ds: object  # datasets.Dataset
    split: object  # datasets.Split
    batch_size: int
    gen: torch.Generator  # on the data's device; shuffles, augments, draws random labels
    compute: Compute


# ---------------------------------------------------------------- the saliency mask

@dataclass
class Mask:
    keep: dict  # parameter name -> bool tensor of the parameter's shape
    kept_fraction: dict  # parameter name -> fraction of its entries kept
    total_fraction: float

    def bind(self, model):
        """Remember the current values of every parameter, to restore what the mask freezes."""
        self._params = [(p, self.keep[n], p.detach().clone()) for n, p in model.named_parameters()
                        if n in self.keep]
        return self

    @torch.no_grad()
    def mask_grads(self):
        for p, keep, _ in self._params:
            if p.grad is not None:
                p.grad.mul_(keep)

    @torch.no_grad()
    def restore(self):
        for p, keep, p0 in self._params:
            p.copy_(torch.where(keep, p, p0))


def forget_gradients(model, run):
    """Sum over forget batches of the gradient of the batch-mean cross-entropy (eval mode)."""
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in params}
    for x, y, _ in batches(run.ds, run.split.forget, run.batch_size,
                           channels_last=run.compute.channels_last):
        model.zero_grad(set_to_none=True)
        with run.compute.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        for n, p in params:
            total[n] += p.grad
    model.zero_grad(set_to_none=True)
    return total


def select_top(scores, fraction):
    """Boolean mask keeping exactly floor(fraction * n) of the largest scores.

    One selection (kthvalue), not a sort. Ties at the threshold go to the lowest
    positions, so the result is deterministic even when most scores are equal (on 8x8
    inputs two thirds of ResNet-18's forget gradients are exactly zero).
    """
    n = scores.numel()
    k = math.floor(fraction * n)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(n - k + 1).values  # the k-th largest
    keep = scores > threshold
    ties = torch.nonzero(scores == threshold).flatten()
    keep[ties[:k - int(keep.sum())]] = True
    return keep


def saliency_mask(model, run, mask_thr):
    """SalUn's mask: one global ranking of |forget gradient| over all parameters."""
    grads = forget_gradients(model, run)
    keep_flat = select_top(torch.cat([g.abs().flatten() for g in grads.values()]), mask_thr)
    keep, fraction, start = {}, {}, 0
    for n, g in grads.items():
        part = keep_flat[start:start + g.numel()]
        keep[n] = part.view_as(g)
        fraction[n] = part.float().mean().item()
        start += g.numel()
    return Mask(keep, fraction, keep_flat.float().mean().item()).bind(model)


# ---------------------------------------------------------------- the epoch loop

def sgd_pass(model, opt, run, idx, loss_fn, mask=None, sched=None):
    """One shuffled, augmented pass over idx; returns the mean loss, kept on the device.

    loss_fn(logits, y, i) -> scalar, where i are the batch's training indices.
    """
    model.train()
    total = torch.zeros((), device=run.ds.device)
    steps = 0
    for x, y, i in batches(run.ds, idx, run.batch_size, gen=run.gen, augment=True,
                           channels_last=run.compute.channels_last):
        with run.compute.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mask is not None:
            mask.mask_grads()
        opt.step()
        if mask is not None:
            mask.restore()
        if sched is not None:
            sched.step()
        total += loss.detach()  # no .item() here: the host never waits on the device
        steps += 1
    return total / max(steps, 1)


def cross_entropy(logits, y, _i):
    return F.cross_entropy(logits, y)


def random_labels(run, y):
    """A uniformly drawn label other than the true one."""
    shift = torch.randint(1, run.ds.num_classes, y.shape, device=y.device, generator=run.gen)
    return (y + shift) % run.ds.num_classes


# ---------------------------------------------------------------- the methods

def rl(model, opt, run, mask=None):
    """Random labels on forget samples, true labels on retain, in one pass over both."""
    def loss(logits, y, i):
        y = torch.where(run.split.is_forget[i], random_labels(run, y), y)
        return F.cross_entropy(logits, y)
    return sgd_pass(model, opt, run, run.split.train, loss, mask)


def rl_split(model, opt, run, mask=None):
    """Random labels on the forget set, then a pass over retain (the SalUn paper's recipe)."""
    forget_loss = sgd_pass(model, opt, run, run.split.forget,
                           lambda logits, y, i: F.cross_entropy(logits, random_labels(run, y)), mask)
    retain_loss = sgd_pass(model, opt, run, run.split.retain, cross_entropy, mask)
    return (forget_loss + retain_loss) / 2


def ga(model, opt, run, mask=None):
    """Per-sample loss: -CE on forget samples, +CE on retain, over one pass of both."""
    def loss(logits, y, i):
        ce = F.cross_entropy(logits, y, reduction="none")
        return torch.where(run.split.is_forget[i], -ce, ce).mean()
    return sgd_pass(model, opt, run, run.split.train, loss, mask)


def ga_small(model, opt, run, mask=None):
    """Gradient ascent on the forget set only."""
    return sgd_pass(model, opt, run, run.split.forget, lambda logits, y, i: -F.cross_entropy(logits, y), mask)


def ft(model, opt, run, mask=None):
    """Fine-tune on the retain set."""
    return sgd_pass(model, opt, run, run.split.retain, cross_entropy, mask)


@dataclass(frozen=True)
class Method:
    epoch: object
    fresh_model: bool = False  # start from a newly initialised model (retraining)
    cosine_lr: bool = False  # anneal the learning rate over the epochs


METHODS = {
    "rl": Method(rl),
    "rl_split": Method(rl_split),
    "ga": Method(ga, cosine_lr=True),
    "ga_small": Method(ga_small),
    "ft": Method(ft),
    "retrain": Method(ft, fresh_model=True),
}


def make_optimizer(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
