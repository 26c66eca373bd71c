"""The unlearning methods, in one registry, and SalUn's saliency mask.

    python methods.py            # the table of methods, papers and settings (Markdown)

    mask = saliency_mask(model, run, mask_thr=0.5)        # or None: every weight may move
    method = METHODS["scrub"]
    for loss in method.unlearn(model, run, method.settings(msteps=1), mask):
        ...                                               # one iteration per epoch

A method is a function registered with `@method(name, Settings, paper, code)`: it takes the
model, a `Run` (data, split, batch size, lr, epochs, generator, compute), its settings
(a dataclass of `utils.setting` fields, checked up front by main.py) and the mask, and
yields once per epoch (a one-shot method yields once). The epoch methods share
`sgd_epochs` and `sgd_pass`; a method that needs more (a teacher, an extra class, a
one-shot edit) does it in its own function. Each default is the authors' method as their
code (`code`) runs it; a setting marked as a deviation switches away from it, and the
table lists it.

With a mask, only the kept entries move: after every step the other entries are put
back bit for bit, so neither their gradients nor momentum nor weight decay can move
them (masking the gradients as well, as the original does, would change nothing more).
"""
import copy
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from datasets import batches
from utils import Compute, UserError, describe_setting, setting


@dataclass
class Run:
    ds: object  # datasets.Dataset
    split: object  # datasets.Split
    batch_size: int
    gen: torch.Generator  # on the data's device; shuffles, augments, draws random labels
    compute: Compute
    lr: float = 0.1  # the method's optimizer's (SGD unless the method says); one-shot methods ignore it
    epochs: int = 1
    new_model: object = None  # () -> a newly initialised model of the same architecture
    freeze_bn: bool = False  # BatchNorm layers in eval mode while unlearning: running statistics stay put


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


def batch_gradients(model, run, idx):
    """Yield, per batch over idx, {name: gradient of the batch-mean cross-entropy} (eval mode).

    Always in fp32, whatever the training precision: in bf16 a 0.2 mask of ResNet-18
    differed from the fp32 one in 34,704 entries, so the mask would depend on the machine.
    """
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for x, y, _ in batches(run.ds, idx, run.batch_size, channels_last=run.compute.channels_last):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        yield {n: p.grad for n, p in params}
    model.zero_grad(set_to_none=True)


def forget_gradients(model, run):
    """Sum over forget batches of the gradient of the batch-mean cross-entropy (SalUn's saliency)."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for grads in batch_gradients(model, run, run.split.forget):
        for n, g in grads.items():
            total[n] += g
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


# ---------------------------------------------------------------- the shared loop

def make_optimizer(params, lr):
    """SGD with momentum 0.9 and weight decay 5e-4, as in SalUn; `params` may be a model."""
    params = params.parameters() if isinstance(params, torch.nn.Module) else params
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def train_batches(run, idx):
    """One shuffled, augmented pass of (x, y, i) batches over idx."""
    return batches(run.ds, idx, run.batch_size, gen=run.gen, augment=True, channels_last=run.compute.channels_last)


def step(opt, loss, mask):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if mask is not None:
        mask.restore()


BATCH_NORM = torch.nn.modules.batchnorm._BatchNorm


def train_mode(model, run):
    """Train mode; with run.freeze_bn, BatchNorm layers stay in eval mode. A mask keeps
    parameters in place, but BatchNorm's running statistics are buffers: in train mode
    they follow the unlearning batches (as in SalUn's code) unless frozen."""
    model.train()
    if run.freeze_bn:
        for m in model.modules():
            if isinstance(m, BATCH_NORM):
                m.eval()


def sgd_pass(model, opt, run, idx, loss_fn, mask=None, sched=None):
    """One pass over idx; returns the mean loss, kept on the device.

    loss_fn(logits, x, y, i) -> scalar, where i are the batch's training indices.
    `sched`, a per-step learning-rate schedule, steps after every batch.
    """
    train_mode(model, run)
    total = torch.zeros((), device=run.ds.device)
    steps = 0
    for x, y, i in train_batches(run, idx):
        with run.compute.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), x, y, i)
        step(opt, loss, mask)
        if sched is not None:
            sched.step()
        total += loss.detach()  # no .item() here: the host never waits on the device
        steps += 1
    return total / max(steps, 1)


def sgd_epochs(run, epoch, opt=None, cosine_lr=False):
    """The loop of the epoch methods: yields epoch(k), the mean loss of epoch k, for
    k < run.epochs; with cosine_lr, `opt`'s learning rate is annealed over the epochs."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, run.epochs) if cosine_lr else None
    for k in range(run.epochs):
        yield epoch(k)
        if sched is not None:
            sched.step()


def cross_entropy(logits, _x, y, _i):
    return F.cross_entropy(logits, y)


def random_labels(run, y, other_classes=False):
    """Uniformly drawn labels: from all classes, the true one included (SalUn's code), or
    with `other_classes` from the classes other than the true one."""
    k = run.ds.num_classes
    if not other_classes:
        return torch.randint(0, k, y.shape, device=y.device, generator=run.gen)
    return (y + torch.randint(1, k, y.shape, device=y.device, generator=run.gen)) % k


def frozen_copy(model):
    """A copy that never trains: a teacher, or the original model to compare with."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_kl(student, teacher, temperature):
    """KL(teacher || student) of the temperature-softened outputs, times T^2 (Hinton et
    al.), averaged over the batch: SCRUB's distillation loss (its code's DistillKL)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher.float() / t, 1), log_target=True,
                    reduction="batchmean") * t * t


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Method:
    unlearn: object  # (model, run, settings, mask) -> iterator, one item (the loss or None) per epoch
    settings: type  # its settings dataclass
    paper: str
    code: str = ""  # the authors' code this implementation follows
    fresh_model: bool = False  # starts from a newly initialised model (retraining)
    # tune.py's range for an experiment key where this method needs another (None: the method
    # does not use the key, and it is not searched)
    search: dict = field(default_factory=dict)

    @property
    def summary(self):
        return " ".join(self.unlearn.__doc__.split("\n\n")[0].split())


@dataclass
class NoSettings:
    pass


METHODS = {}


def method(name, settings=NoSettings, paper="", code="", fresh_model=False, search=None):
    """Register an unlearning function under `name`, with its paper and the authors' code."""
    def register(fn):
        METHODS[name] = Method(fn, settings, paper, code, fresh_model, search or {})
        return fn
    return register


# ---------------------------------------------------------------- SalUn's own comparisons

@dataclass
class RandomLabelSettings:
    other_classes: bool = setting(False, "draw a forget sample's random label from the other classes only; "
                                         "SalUn's code draws from all classes, the true one included", deviation=True)


@method("rl", RandomLabelSettings, "random labels (Golatkar et al., CVPR 2020) as SalUn's code runs it for "
                                   "CIFAR-100 (and for CIFAR-10 before April 2024)",
        code="OPTML-Group/Unlearn-Saliency `unlearn/RL.py`")
def rl(model, run, s, mask):
    """One pass per epoch over forget and retain together, shuffled, forget samples relabelled at random."""
    def loss(logits, x, y, i):
        return F.cross_entropy(logits, torch.where(run.split.is_forget[i], random_labels(run, y, s.other_classes), y))
    opt = make_optimizer(model, run.lr)
    return sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.train, loss, mask))


@method("rl_split", RandomLabelSettings, "random labels as SalUn's code runs it for CIFAR-10 and SVHN "
                                         "(Fan et al., ICLR 2024)",
        code="OPTML-Group/Unlearn-Saliency `unlearn/RL.py`")
def rl_split(model, run, s, mask):
    """Per epoch, a pass over the forget set with random labels, then a pass over retain."""
    opt = make_optimizer(model, run.lr)

    def epoch(k):
        forget = sgd_pass(model, opt, run, run.split.forget,
                          lambda logits, x, y, i: F.cross_entropy(logits, random_labels(run, y, s.other_classes)),
                          mask)
        return (forget + sgd_pass(model, opt, run, run.split.retain, cross_entropy, mask)) / 2
    return sgd_epochs(run, epoch)


@method("ga", paper="the original SalUn DeepDive README's own method (no paper implements it); "
                     "SalUn's \"GA\" is ga_small", code="none")
def ga(model, run, s, mask):
    """One pass over forget and retain: -CE on forget samples, +CE on retain; cosine-annealed lr."""
    def loss(logits, x, y, i):
        ce = F.cross_entropy(logits, y, reduction="none")
        return torch.where(run.split.is_forget[i], -ce, ce).mean()
    opt = make_optimizer(model, run.lr)
    return sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.train, loss, mask), opt, cosine_lr=True)


@method("ga_small", paper="gradient ascent (Thudi et al., EuroS&P 2022): SalUn's and deepunlearn's \"GA\"",
        code="OPTML-Group/Unlearn-Saliency `unlearn/GA.py`")
def ga_small(model, run, s, mask):
    """Gradient ascent (-CE) on the forget set only."""
    opt = make_optimizer(model, run.lr)
    return sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.forget,
                                              lambda logits, x, y, i: -F.cross_entropy(logits, y), mask))


@method("ft", paper="fine-tuning (Warnecke et al., NDSS 2023)", code="OPTML-Group/Unlearn-Saliency `unlearn/FT.py`")
def ft(model, run, s, mask):
    """Fine-tune on the retain set."""
    opt = make_optimizer(model, run.lr)
    return sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.retain, cross_entropy, mask))


@method("retrain", paper="exact unlearning: the gold standard",
        code="OPTML-Group/Unlearn-Saliency `unlearn/retrain.py`", fresh_model=True)
def retrain(model, run, s, mask):
    """Train a newly initialised model on the retain set."""
    return ft(model, run, s, mask)


# ---------------------------------------------------------------- peers

@dataclass
class NegGradPlusSettings:
    alpha: float = setting(0.95, "weight of the retain loss; the forget loss is ascended with 1 - alpha", "(0, 1)",
                           search=(0.5, 0.999))


@method("neggrad_plus", NegGradPlusSettings, "NegGrad+ (Kurmanji et al., NeurIPS 2023)", code="meghdadk/SCRUB")
def neggrad_plus(model, run, s, mask):
    """Each step descends alpha·CE on a retain batch and ascends (1 - alpha)·CE on a forget batch."""
    opt = make_optimizer(model, run.lr)

    def epoch(k):
        train_mode(model, run)
        total, steps = torch.zeros((), device=run.ds.device), 0
        for (xr, yr, _), (xf, yf, _) in zip(train_batches(run, run.split.retain), endless(run, run.split.forget)):
            with run.compute.autocast():
                retain, forget = model(xr), model(xf)
            loss = s.alpha * F.cross_entropy(retain.float(), yr) - (1 - s.alpha) * F.cross_entropy(forget.float(), yf)
            step(opt, loss, mask)
            total += loss.detach()
            steps += 1
        return total / max(steps, 1)
    return sgd_epochs(run, epoch)


def endless(run, idx):
    """Training batches over idx, reshuffled at every pass, for as long as they are asked for."""
    while len(idx):
        yield from train_batches(run, idx)


@dataclass
class ScrubSettings:
    msteps: int = setting(2, "epochs that begin with a max-step (raise the KL divergence on the forget set)",
                          "[0, inf)", search=(1, 5))
    alpha: float = setting(0.001, "weight of the KL divergence in the min-steps", "[0, inf)", search=(1e-4, 1.0, "log"))
    gamma: float = setting(0.99, "weight of the cross-entropy in the min-steps", "[0, inf)")
    temperature: float = setting(4.0, "distillation temperature", "(0, inf)", search=(1.0, 8.0))


@method("scrub", ScrubSettings, "SCRUB (Kurmanji et al., NeurIPS 2023)", code="meghdadk/SCRUB")
def scrub(model, run, s, mask):
    """The model is a student of a frozen copy of itself: max-steps move it away from the
    teacher on the forget set (first `msteps` epochs), min-steps keep it close on retain
    (KL + CE, every epoch)."""
    teacher = frozen_copy(model)
    opt = make_optimizer(model, run.lr)

    def kl(logits, x):
        with torch.no_grad(), run.compute.autocast():
            t = teacher(x)
        return distill_kl(logits, t, s.temperature)

    def epoch(k):
        losses = []
        if k < s.msteps:
            losses.append(sgd_pass(model, opt, run, run.split.forget, lambda lo, x, y, i: -kl(lo, x), mask))
        losses.append(sgd_pass(model, opt, run, run.split.retain,
                               lambda lo, x, y, i: s.gamma * F.cross_entropy(lo, y) + s.alpha * kl(lo, x), mask))
        return sum(losses) / len(losses)
    return sgd_epochs(run, epoch)


@dataclass
class SSDSettings:
    alpha: float = setting(10.0, "selection: a parameter is dampened when its forget-set importance exceeds "
                                 "alpha times its training-set importance", "(0, inf)", search=(1.0, 100.0, "log"))
    lam: float = setting(1.0, "dampening: a selected parameter is multiplied by "
                              "min(lam * I_train / I_forget, 1)", "(0, inf)", search=(0.1, 10.0, "log"))


def importances(model, run, idx):
    """Diagonal Fisher information: the mean over batches of the squared gradient."""
    total, n = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}, 0
    for grads in batch_gradients(model, run, idx):
        for name, g in grads.items():
            total[name] += g * g
        n += 1
    return {name: t / max(n, 1) for name, t in total.items()}


@method("ssd", SSDSettings, "Selective Synaptic Dampening (Foster et al., AAAI 2024)",
        code="if-loops/selective-synaptic-dampening", search={"lr": None, "epochs": None})
def ssd(model, run, s, mask):
    """One shot, no training: the parameters far more important to the forget set than to
    the training set (Fisher importances) are scaled down. lr and epochs are unused."""
    on_train = importances(model, run, run.split.train)
    on_forget = importances(model, run, run.split.forget)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in on_forget:
                continue
            selected = on_forget[name] > s.alpha * on_train[name]
            if mask is not None:
                selected &= mask.keep[name]
            factor = (s.lam * on_train[name] / on_forget[name]).clamp(max=1)
            p.copy_(torch.where(selected, p * factor, p))
    yield None


@dataclass
class L1SparseSettings:
    alpha: float = setting(5e-4, "L1 strength at the first epoch, decaying linearly to 0 after the last",
                           "[0, inf)", search=(1e-5, 1e-2, "log"))


@method("l1_sparse", L1SparseSettings, "l1-sparse unlearning (Jia et al., NeurIPS 2023)",
        code="OPTML-Group/Unlearn-Sparse")
def l1_sparse(model, run, s, mask):
    """Fine-tune on retain with an L1 penalty on all weights whose strength decays linearly to zero."""
    opt = make_optimizer(model, run.lr)
    params = [p for p in model.parameters() if p.requires_grad]

    def epoch(k):
        strength = s.alpha * (1 - k / run.epochs)
        return sgd_pass(model, opt, run, run.split.retain,
                        lambda lo, x, y, i: F.cross_entropy(lo, y) + strength * sum(p.abs().sum() for p in params),
                        mask)
    return sgd_epochs(run, epoch)


@dataclass
class BadTeacherSettings:
    retain_fraction: float = setting(0.3, "share of the retain set, drawn once, distilled from the original model "
                                          "alongside the forget set", "(0, 1]", search=(0.1, 1.0))
    temperature: float = setting(1.0, "distillation temperature", "(0, inf)", search=(1.0, 8.0))
    redraw_retain: bool = setting(False, "draw the retain share anew every epoch (the authors draw it once)",
                                  deviation=True)
    sgd: bool = setting(False, "use the toolkit's SGD (momentum 0.9, weight decay 5e-4) instead of the authors' "
                               "Adam (which they run at lr 1e-4)", deviation=True)


@method("bad_teacher", BadTeacherSettings, "Bad Teacher (Chundawat et al., AAAI 2023)",
        code="vikram2000b/bad-teaching-unlearning", search={"lr": (1e-5, 1e-2, "log")})
def bad_teacher(model, run, s, mask):
    """The model distils from the original model on retain samples and from a randomly
    initialised model on forget samples, with Adam (use lr 1e-4, the authors')."""
    good, bad = frozen_copy(model), frozen_copy(run.new_model())
    opt = make_optimizer(model, run.lr) if s.sgd else torch.optim.Adam(model.parameters(), lr=run.lr)

    def loss(logits, x, y, i):
        with torch.no_grad(), run.compute.autocast():
            teacher = torch.where(run.split.is_forget[i][:, None], bad(x), good(x)).float()
        # The authors' F.kl_div with its default reduction, "mean": over batch x classes, no T^2.
        return F.kl_div(F.log_softmax(logits / s.temperature, 1), F.softmax(teacher / s.temperature, 1),
                        reduction="sum") / logits.numel()

    def retain_share():
        retain = run.split.retain
        drawn = torch.randperm(len(retain), generator=run.gen, device=run.gen.device).to(retain.device)
        return retain[drawn[:math.ceil(s.retain_fraction * len(retain))]]

    part = retain_share()

    def epoch(k):
        nonlocal part
        if s.redraw_retain and k:
            part = retain_share()
        return sgd_pass(model, opt, run, torch.cat([run.split.forget, part]), loss, mask)
    return sgd_epochs(run, epoch)


@dataclass
class BoundaryShrinkSettings:
    eps: float = setting(0.1, "FGSM step in [0, 1] pixel space; the perturbed image is clipped to [0, 1] and "
                              "rounded to 1/255", "(0, inf)", search=(0.01, 0.5, "log"))
    exclude_own_class: bool = setting(False, "never relabel a sample with its own class (the authors' code keeps "
                                             "the true label when the attack fails)", deviation=True)
    normalised_space: bool = setting(False, "take the step in the model's normalised input space, without "
                                            "clipping or rounding", deviation=True)


def fgsm(model, ds, x, y, eps, compute, normalised_space=False):
    """One FGSM step on normalised batch x against `model`, returned normalised: in [0, 1]
    pixel space, clipped and rounded to whole 1/255 levels as the authors' code does.
    The pixel gradient's sign is the normalised one's (a positive per-channel scale)."""
    x = x.detach().requires_grad_(True)
    with compute.autocast():
        ce = F.cross_entropy(model(x).float(), y)
    (grad,) = torch.autograd.grad(ce, x)
    if normalised_space:
        return (x + eps * grad.sign()).detach()
    pixels = (ds.to_pixels(x.detach()) + eps * grad.sign()).clamp(0, 1)
    return ds.from_pixels(torch.round(pixels * 255) / 255)


@method("boundary_shrink", BoundaryShrinkSettings, "Boundary Shrink (Chen et al., CVPR 2023)",
        code="the authors' Boundary-Unlearning-Code; OPTML-Group/Unlearn-Saliency `unlearn/boundary_sh.py`")
def boundary_shrink(model, run, s, mask):
    """Each forget sample is relabelled with the class the original model predicts for a
    one-step FGSM perturbation of it (its nearest-but-wrong class, or its own when the
    attack fails), and the model is fine-tuned on the forget set with those labels."""
    original = frozen_copy(model)
    opt = make_optimizer(model, run.lr)

    def loss(logits, x, y, i):
        adv = fgsm(original, run.ds, x, y, s.eps, run.compute, s.normalised_space)
        with torch.no_grad(), run.compute.autocast():
            neighbour = original(adv).float()
        if s.exclude_own_class:
            neighbour.scatter_(1, y[:, None], float("-inf"))
        return F.cross_entropy(logits, neighbour.argmax(1))
    return sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.forget, loss, mask))


class ExtraClass(torch.nn.Module):
    """A classifier head with one more output while training; in eval mode the head alone,
    so that every evaluation sees the model as it will be once the class is removed."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.extra = torch.nn.Linear(head.in_features, 1).to(head.weight.device)

    def forward(self, x):
        return torch.cat([self.head(x), self.extra(x)], 1) if self.training else self.head(x)


def classifier_name(model):
    """The dotted name of the model's linear classifier: timm's default_cfg names it ('fc' for a
    ResNet, 'head.fc' for a ByobNet, 'head' for a ViT)."""
    name = getattr(model, "default_cfg", {}).get("classifier", "fc")
    try:
        head = model.get_submodule(name)
    except AttributeError:
        head = None
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"boundary_expanding needs a linear classifier head; {type(model).__name__} has none "
                        f"at {name!r}")
    return name


def set_submodule(model, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@method("boundary_expanding", paper="Boundary Expanding (Chen et al., CVPR 2023)",
        code="the authors' Boundary-Unlearning-Code; OPTML-Group/Unlearn-Saliency `unlearn/boundary_ex.py`")
def boundary_expanding(model, run, s, mask):
    """A temporary extra output class absorbs the forget samples during fine-tuning on
    them; it is removed afterwards. Its weights are outside the mask: they are free."""
    name = classifier_name(model)
    head = model.get_submodule(name)
    set_submodule(model, name, ExtraClass(head))
    opt = make_optimizer(model, run.lr)
    extra_class = run.ds.num_classes

    def loss(logits, x, y, i):
        return F.cross_entropy(logits, torch.full_like(y, extra_class))
    try:
        yield from sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.forget, loss, mask))
    finally:
        set_submodule(model, name, head)


@dataclass
class LastLayersSettings:
    k: int = setting(2, "how many of the model's last Conv/Linear layers, counted from the output, are trained "
                        "(Goel et al.); BatchNorm layers among them train too", "[1, inf)", search=(1, 10))
    stages: bool = setting(False, "count k in top-level stages with weights instead (for a ResNet, fc is the "
                                  "last and layer4 the one before), deepunlearn's block variant", deviation=True)


LAYER_TYPES = (torch.nn.Conv2d, torch.nn.Linear)


def last_layers(model, s):
    """(names of the modules to train, names of the Conv/Linear layers among them).

    Goel et al.'s count: the Conv2d, BatchNorm and Linear modules in definition order, walked
    back from the output; every one passed trains, and the walk stops at the k-th Conv/Linear.
    With `s.stages`, the last k top-level modules with weights, whole."""
    if s.stages:
        stages = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
        if s.k >= len(stages):
            raise UserError(f"k={s.k}, but {type(model).__name__} has {len(stages)} stages with weights "
                            f"({', '.join(stages)}); k must leave at least one frozen")
        tail = [(f"{stage}.{n}" if n else stage, m) for stage in stages[-s.k:]
                for n, m in model.get_submodule(stage).named_modules()]
    else:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES + (BATCH_NORM,))]
        count = sum(isinstance(m, LAYER_TYPES) for _, m in found)
        if s.k >= count:
            raise UserError(f"k={s.k}, but {type(model).__name__} has {count} Conv/Linear layers; "
                            f"k must leave at least one frozen")
        tail, seen = [], 0
        for n, m in reversed(found):
            tail.append((n, m))
            seen += isinstance(m, LAYER_TYPES)
            if seen == s.k:
                break
    return [n for n, _ in tail], [n for n, m in tail if isinstance(m, LAYER_TYPES)]


def train_last_layers(model, run, trained, mask):
    """Train the parameters of the modules named in `trained` on retain; no other parameter
    moves. The whole model is in train mode, as in the authors' code, so BatchNorm
    statistics move everywhere unless the experiment freezes them."""
    owned = {id(p) for n in trained for p in model.get_submodule(n).parameters(recurse=False)}
    held = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    for p in held:
        p.requires_grad_(False)  # no gradient computed for them: cheaper, and nothing can move them
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], run.lr)
    try:
        yield from sgd_epochs(run, lambda k: sgd_pass(model, opt, run, run.split.retain, cross_entropy, mask))
    finally:
        for p in held:
            p.requires_grad_(True)


@method("cf_k", LastLayersSettings, "CF-k, catastrophic forgetting of the last k layers (Goel et al., 2022)",
        code="shash42/Evaluating-Inexact-Unlearning (`resetFinalResnet`)")
def cf_k(model, run, s, mask):
    """Fine-tune only the last k layers on retain; the others stay frozen."""
    trained, _ = last_layers(model, s)
    return train_last_layers(model, run, trained, mask)


@dataclass
class ExactLastLayersSettings(LastLayersSettings):
    model_init: bool = setting(False, "re-initialise with the architecture's own initialisation (a newly "
                                      "created model's values) instead of the authors' Kaiming normal", deviation=True)


def kaiming_reinit(layer, gen):
    """Goel et al.'s re-initialisation: Kaiming normal weights (fan in, ReLU gain), zero bias."""
    w = layer.weight
    new = {"weight": torch.randn(w.shape, generator=gen, device=gen.device).to(w) * math.sqrt(2.0 / w[0].numel())}
    if layer.bias is not None:
        new["bias"] = torch.zeros_like(layer.bias)
    return new


@method("eu_k", ExactLastLayersSettings, "EU-k, exact unlearning of the last k layers (Goel et al., 2022)",
        code="shash42/Evaluating-Inexact-Unlearning (`resetFinalResnet`, `_reinit`)")
def eu_k(model, run, s, mask):
    """Re-initialise the last k Conv/Linear layers and train the last k layers on retain;
    the others stay frozen. BatchNorm layers are not reset. With a mask, only the kept
    entries are re-initialised."""
    trained, layers = last_layers(model, s)
    fresh = run.new_model() if s.model_init else None
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            new = (dict(fresh.get_submodule(name).named_parameters(recurse=False)) if fresh is not None
                   else kaiming_reinit(layer, run.gen))
            for pname, p in layer.named_parameters(recurse=False):
                keep = mask.keep.get(f"{name}.{pname}") if mask is not None else None
                p.copy_(new[pname] if keep is None else torch.where(keep, new[pname].to(p), p))
    yield from train_last_layers(model, run, trained, mask)


# ---------------------------------------------------------------- the table

def method_table():
    """The Markdown table of every method: paper, the authors' code it follows, what it
    does, its settings with defaults and tune.py's ranges, and the opt-in deviations from
    the published method."""
    rows = ["| method | paper | authors' code | what it does | settings (default; tune.py's range) "
            "| deviations (opt-in) |", "|---|---|---|---|---|---|"]
    for name, m in METHODS.items():
        own = [f for f in fields(m.settings) if not f.metadata.get("deviation")]
        deviations = [f for f in fields(m.settings) if f.metadata.get("deviation")]
        settings = "<br>".join(f"`{f.name}`: {describe_setting(f)}" for f in own) or "-"
        switches = "<br>".join(f"`{f.name}=true`: {f.metadata['doc']}" for f in deviations) or "none"
        rows.append(f"| `{name}` | {m.paper} | {m.code} | {m.summary} | {settings} | {switches} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(method_table())
