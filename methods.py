"""The unlearning methods, each one epoch function, and SalUn's saliency mask.

    mask = saliency_mask(model, run, mask_thr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        loss = METHODS["rl_split"].epoch(model, opt, run, mask)

A `Run` carries what every epoch needs (data, split, batch size, generator, compute).
With a mask, only the kept entries move: after every step the other entries are put
back bit for bit, so neither their gradients nor momentum nor weight decay can move
them (masking the gradients as well, as the original does, would change nothing more).
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
    zero_fraction: float  # of the kept entries, the share whose saliency is exactly 0

    def bind(self, model):
        """Remember the current values of every parameter, to restore what the mask freezes."""
        self._params = [(p, self.keep[n], p.detach().clone()) for n, p in model.named_parameters()
                        if n in self.keep]
        return self

    @torch.no_grad()
    def restore(self):
        for p, keep, p0 in self._params:
            torch.where(keep, p, p0, out=p)


def forget_gradients(model, run):
    """Sum over forget batches of the gradient of the batch-mean cross-entropy (eval mode).

    Always in fp32, whatever the training precision: in bf16 a 0.2 mask of ResNet-18
    differed from the fp32 one in 34,704 entries, so the mask would depend on the machine.
    """
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in params}
    for x, y, _ in batches(run.ds, run.split.forget, run.batch_size,
                           channels_last=run.compute.channels_last):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        for n, p in params:
            total[n] += p.grad
    model.zero_grad(set_to_none=True)
    return total


def select_top(scores, fraction):
    """Boolean mask keeping exactly floor(fraction * n) of the largest of 1-D `scores`.

    A selection, not a sort. Ties at the threshold go to the lowest positions, so the
    result is deterministic even when most scores are equal (on 8x8 inputs two thirds
    of ResNet-18's forget gradients are exactly zero).
    """
    n = scores.numel()
    k = math.floor(fraction * n)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_largest(scores, k)
    keep = scores > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing:
        ties = scores == threshold
        last = nth_true(ties, missing) + 1
        keep[:last] |= ties[:last]
    return keep


def kth_largest(x, k, sample_size=1 << 16):
    """The k-th largest entry of 1-D `x` (1 <= k <= x.numel()), exactly.

    kthvalue over all n entries is one single-threaded quickselect. On millions of
    entries it is several times faster to bracket the answer between two order
    statistics of a fixed random sample (8 standard errors either side of the target
    quantile), confirm the bracket with two counts, and select among the few percent of
    entries inside it; a bracket that misses falls back to the full kthvalue.
    """
    n = x.numel()
    if n <= 16 * sample_size:
        return x.kthvalue(n - k + 1).values
    gen = torch.Generator(device=x.device).manual_seed(0)
    sample = x[torch.randint(n, (sample_size,), device=x.device, generator=gen)].sort().values
    target, margin = (n - k) / n * sample_size, 4 * math.sqrt(sample_size)
    lo = sample[max(int(target - margin), 0)]
    hi = sample[min(int(target + margin) + 1, sample_size - 1)]
    above, at_least = torch.stack([torch.count_nonzero(x > hi), torch.count_nonzero(x >= lo)]).tolist()
    if not above < k <= at_least:
        return x.kthvalue(n - k + 1).values
    if lo == hi:
        return lo
    inside = x[(x >= lo) & (x <= hi)]
    return inside.kthvalue(inside.numel() - (k - above) + 1).values


def nth_true(flags, m, chunk=1 << 16):
    """Position of the m-th True (m >= 1) of 1-D bool `flags`, which has at least m:
    counted per chunk, then located inside one chunk."""
    counts = torch.stack([torch.count_nonzero(c) for c in flags.split(chunk)]).cumsum(0)
    j = int(torch.searchsorted(counts, m))
    before = int(counts[j - 1]) if j else 0
    return j * chunk + int(torch.nonzero(flags[j * chunk:(j + 1) * chunk])[m - before - 1])


def mask_from_gradients(grads, mask_thr):
    """{name: gradient} -> Mask: one global ranking of |gradient| over all entries.

    Entries with exactly zero saliency are kept only when fewer than `mask_thr` of all
    entries have any, and then by position alone; `zero_fraction` says how many.
    """
    scores = torch.cat([g.abs().flatten() for g in grads.values()])
    keep_flat = select_top(scores, mask_thr)
    parts = keep_flat.split([g.numel() for g in grads.values()])
    keep = {n: part.view_as(g) for (n, g), part in zip(grads.items(), parts)}
    counts = torch.stack([torch.count_nonzero(k) for k in keep.values()]
                         + [torch.count_nonzero(keep_flat & (scores == 0))]).tolist()  # one sync
    zeros, counts = counts[-1], counts[:-1]
    fraction = {n: c / k.numel() for (n, k), c in zip(keep.items(), counts)}
    kept = sum(counts)
    return Mask(keep, fraction, kept / keep_flat.numel(), zeros / kept if kept else 0.0)


def saliency_mask(model, run, mask_thr):
    """SalUn's mask for `model` on the run's forget set, bound to the model's current weights."""
    return mask_from_gradients(forget_gradients(model, run), mask_thr).bind(model)


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
