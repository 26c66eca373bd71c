"""Known answers for every method: one epoch on a tiny model and a single fixed batch per
pass equals the update written out here from the method's paper and its authors' code
(loss, labels, optimizer, which parameters move). The optimizers are written out too:
SalUn's SGD (momentum 0.9, weight decay 5e-4) and Adam's first step."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import methods
from datasets import Split, as_flags
from methods import METHODS, Run
from models import load_model
from utils import compute_for, make_generator

CPU = torch.device("cpu")
LR = 0.05


@pytest.fixture(scope="module")
def setting(ckpts, digits):
    """The fixture's base model, digits without augmentation, 8 forget samples of class 0
    and 24 retain samples: every pass is one batch of at most 64."""
    ds = dataclasses.replace(digits, crop_pad=0).to(CPU)
    model, cfg = load_model(ckpts["base"], CPU)
    y, n = ds.y_train, len(ds.y_train)
    forget, retain = torch.nonzero(y == 0).flatten()[:8], torch.nonzero(y != 0).flatten()[:24]
    is_forget = as_flags(forget, n)
    in_val = ~(is_forget | as_flags(retain, n))
    split = Split(forget, retain, torch.nonzero(in_val & (y != 0)).flatten(),
                  torch.nonzero(in_val & (y == 0)).flatten(), is_forget, in_val, forget_class=0)
    fresh = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in fresh.parameters():  # a "randomly initialised" model, fixed for the test
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return ds, model, split, fresh


def run_method(setting, name, lr=LR, **settings):
    """The method's model after one epoch, in fp32."""
    ds, base, split, fresh = setting
    model = copy.deepcopy(base)
    run = Run(ds, split, 64, make_generator(0, CPU), compute_for(CPU, "fp32"), lr=lr, epochs=1,
              new_model=lambda: copy.deepcopy(fresh))
    m = METHODS[name]
    list(m.unlearn(model, run, m.settings(**settings), None))
    return model


def batch(setting, idx):
    ds = setting[0]
    return ds.prepare(ds.x_train[idx]), ds.y_train[idx]


class SGD:
    """torch.optim.SGD's update with SalUn's settings, written out: d = g + 5e-4 p;
    b = d on the first step, then 0.9 b + d; p -= lr b."""

    def __init__(self, model, lr=LR):
        self.params, self.lr, self.buf = [p for p in model.parameters() if p.requires_grad], lr, {}

    def step(self, loss):
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            for k, (p, g) in enumerate(zip(self.params, grads)):
                if g is None:
                    continue
                d = g + 5e-4 * p
                self.buf[k] = d if k not in self.buf else 0.9 * self.buf[k] + d
                p -= self.lr * self.buf[k]


def expected_model(setting):
    model = copy.deepcopy(setting[1])
    model.train()
    return model


def assert_same_weights(got, want, rtol=1e-4, atol=1e-6):
    for (n, p), q in zip(got.named_parameters(), want.parameters()):
        assert torch.allclose(p, q, rtol=rtol, atol=atol), n


def ce_on(model, setting, idx, labels=None):
    x, y = batch(setting, idx)
    return F.cross_entropy(model(x), y if labels is None else labels)


@pytest.fixture
def recorded(monkeypatch):
    """Every training batch a method draws and every random label it draws, in order."""
    seen = {"batches": [], "labels": []}
    train_batches, random_labels = methods.train_batches, methods.random_labels

    def record_batches(run, idx):
        for b in train_batches(run, idx):
            seen["batches"].append(b)
            yield b

    def record_labels(*args, **kw):
        seen["labels"].append(random_labels(*args, **kw))
        return seen["labels"][-1]
    monkeypatch.setattr(methods, "train_batches", record_batches)
    monkeypatch.setattr(methods, "random_labels", record_labels)
    return seen


# ---------------------------------------------------------------- fine-tuning and gradient ascent

def test_ft_is_one_sgd_step_of_cross_entropy_on_retain(setting):
    want = expected_model(setting)
    SGD(want).step(ce_on(want, setting, setting[2].retain))
    assert_same_weights(run_method(setting, "ft"), want)


def test_ga_small_ascends_cross_entropy_on_the_forget_set(setting):
    want = expected_model(setting)
    SGD(want).step(-ce_on(want, setting, setting[2].forget))
    assert_same_weights(run_method(setting, "ga_small"), want)


def test_ga_descends_retain_and_ascends_forget_in_one_batch_mean(setting):
    split = setting[2]
    train = torch.cat([split.forget, split.retain])
    want = expected_model(setting)
    x, y = batch(setting, train)
    ce = F.cross_entropy(want(x), y, reduction="none")
    SGD(want).step(torch.where(split.is_forget[train], -ce, ce).mean())
    assert_same_weights(run_method(setting, "ga"), want)


def test_neggrad_plus_weighs_retain_by_alpha_0_95_and_forget_by_0_05(setting):
    split = setting[2]
    assert METHODS["neggrad_plus"].settings().alpha == 0.95  # Kurmanji et al.'s code
    want = expected_model(setting)
    SGD(want).step(0.95 * ce_on(want, setting, split.retain) - 0.05 * ce_on(want, setting, split.forget))
    assert_same_weights(run_method(setting, "neggrad_plus"), want)


def test_l1_sparse_adds_alpha_times_the_l1_norm_of_all_weights(setting):
    want = expected_model(setting)
    l1 = sum(p.abs().sum() for p in want.parameters())
    SGD(want).step(ce_on(want, setting, setting[2].retain) + 5e-4 * l1)
    assert_same_weights(run_method(setting, "l1_sparse"), want)


# ---------------------------------------------------------------- random labels (SalUn's RL)

def test_random_labels_come_from_all_classes_by_default_and_from_the_others_on_request(digits):
    run = Run(digits, None, 64, make_generator(0, CPU), compute_for(CPU, "fp32"))
    y = torch.randint(0, 10, (50_000,), generator=torch.Generator().manual_seed(7))
    same = (methods.random_labels(run, y) == y).float().mean().item()
    assert same == pytest.approx(0.1, abs=0.01)  # SalUn: randint(0, num_classes), the true one 1/K of the time
    other = methods.random_labels(run, y, other_classes=True)
    assert (other != y).all() and set(other.tolist()) == set(range(10))


def test_rl_split_is_a_step_on_random_labels_then_a_step_on_retain(setting, recorded):
    got = run_method(setting, "rl_split")
    (xf, _, _), (xr, yr, _) = recorded["batches"]
    want = expected_model(setting)
    sgd = SGD(want)
    sgd.step(F.cross_entropy(want(xf), recorded["labels"][0]))
    sgd.step(F.cross_entropy(want(xr), yr))
    assert_same_weights(got, want)


def test_rl_relabels_only_the_forget_samples_of_one_shuffled_pass(setting, recorded):
    split = setting[2]
    got = run_method(setting, "rl")
    ((x, y, i),) = recorded["batches"]
    assert sorted(i.tolist()) == sorted(split.forget.tolist() + split.retain.tolist())
    want = expected_model(setting)
    SGD(want).step(F.cross_entropy(want(x), torch.where(split.is_forget[i], recorded["labels"][0], y)))
    assert_same_weights(got, want)


# ---------------------------------------------------------------- teachers

def kl(student, teacher, t):
    """KL(softmax(teacher / t) || softmax(student / t)) summed over classes, per sample."""
    p = F.softmax(teacher / t, 1)
    return (p * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))).sum(1)


def test_scrub_max_step_then_min_step_with_the_distillation_loss_times_t_squared(setting):
    split = setting[2]
    teacher = copy.deepcopy(setting[1]).eval()
    want = expected_model(setting)
    sgd, t = SGD(want), 4.0
    (xf, _), (xr, yr) = batch(setting, split.forget), batch(setting, split.retain)
    with torch.no_grad():
        tf, tr = teacher(xf), teacher(xr)
    sgd.step(-kl(want(xf), tf, t).mean() * t * t)
    logits = want(xr)
    sgd.step(0.99 * F.cross_entropy(logits, yr) + 0.001 * kl(logits, tr, t).mean() * t * t)
    assert_same_weights(run_method(setting, "scrub", msteps=1), want)


def test_bad_teacher_is_an_adam_step_on_the_element_wise_mean_kl(setting):
    """Chundawat et al.'s code: F.kl_div's default reduction (the mean over batch x classes),
    the bad teacher on forget samples and the original on retain ones, Adam."""
    split, fresh = setting[2], setting[3]
    good = copy.deepcopy(setting[1]).eval()
    bad = copy.deepcopy(fresh).eval()
    idx = torch.cat([split.forget, split.retain])
    x, _ = batch(setting, idx)
    want = expected_model(setting)
    with torch.no_grad():
        teacher = torch.where(split.is_forget[idx][:, None], bad(x), good(x))
    logits = want(x)
    loss = kl(logits, teacher, 1.0).sum() / logits.numel()
    params = list(want.parameters())
    grads = torch.autograd.grad(loss, params)
    lr = 1e-4
    with torch.no_grad():  # Adam's first step: m_hat = g, v_hat = g^2
        for p, g in zip(params, grads):
            p -= lr * g / (g.abs() + 1e-8)
    got = run_method(setting, "bad_teacher", lr=lr, retain_fraction=1.0)
    # The step is lr * g / (|g| + 1e-8): lr * sign(g) wherever |g| is well above 1e-8. A gradient
    # entry that is a small remainder of large terms of both signs can change sign with the order of
    # the sums alone (one at 7e-4 of its tensor's largest did, with one torch thread): the step is
    # compared where |g| is at least 1% of the tensor's largest, and everywhere else checked to be at
    # most lr, as Adam's first step always is.
    compared = 0
    for (n, p), q, p0, g in zip(got.named_parameters(), want.parameters(), setting[1].parameters(), grads):
        clear = g.abs() > 1e-2 * g.abs().max()
        compared += int(clear.sum())
        assert torch.allclose(p[clear], q[clear], rtol=1e-4, atol=1e-7), n
        assert ((p - p0).abs() <= lr * (1 + 1e-3) + 1e-7).all(), n
    assert compared > 0.3 * sum(p.numel() for p in params)  # a third of the weights, the larger gradients
    # Adam's step hardly sees the loss's scale; SGD's shows it is the mean over batch x classes
    want = expected_model(setting)
    logits = want(x)
    SGD(want).step(kl(logits, teacher, 1.0).sum() / logits.numel())
    assert_same_weights(run_method(setting, "bad_teacher", retain_fraction=1.0, sgd=True), want)


# ---------------------------------------------------------------- boundary shrink

def test_boundary_shrink_labels_come_from_a_pixel_space_fgsm_step_clipped_and_rounded(setting):
    """Chen et al. (and SalUn's boundary_sh.py): x' = round(255 clip(x + 0.1 sign(grad), 0, 1)) / 255
    in [0, 1] pixels; the new label is the original model's argmax over all classes at x'."""
    ds, base, split, _ = setting
    assert METHODS["boundary_shrink"].settings().eps == 0.1  # the authors' bound
    eps = 0.102  # pixels sit on 1/255 steps: 0.1 = 25.5 steps puts every rounding on a tie
    original = copy.deepcopy(base).eval()
    u = ds.x_train[split.forget].float() / 255
    stats = ds.x_train.float() / 255
    mean, std = stats.mean((0, 2, 3))[:, None, None], stats.std((0, 2, 3)).clamp_min(1e-3)[:, None, None]
    y = ds.y_train[split.forget]
    x = ((u - mean) / std).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(original(x), y), x)
    adv = torch.round((u + eps * g.sign()).clamp(0, 1) * 255) / 255
    with torch.no_grad():
        labels = original((adv - mean) / std).argmax(1)
    assert (labels == y).any() and (labels != y).any()  # own class kept where the attack fails
    want = expected_model(setting)
    SGD(want).step(F.cross_entropy(want((u - mean) / std), labels))
    assert_same_weights(run_method(setting, "boundary_shrink", eps=eps), want)


# ---------------------------------------------------------------- last layers (Goel et al.)

def goel_tail(model, k):
    """resetFinalResnet's walk: Conv2d, BatchNorm and Linear modules in definition order,
    from the last back to the k-th Conv/Linear; returns (every module passed, the Conv/Linear ones)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear))]
    tail, seen = [], 0
    for n, m in reversed(found):
        tail.append(n)
        seen += isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        if seen == k:
            return tail, [t for t in tail if isinstance(model.get_submodule(t), (torch.nn.Conv2d, torch.nn.Linear))]


def owned(model, names):
    return {f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters(recurse=False)}


def test_cf_k_trains_only_the_last_k_conv_or_linear_layers_and_the_batchnorms_between(setting):
    base = setting[1]
    tail, layers = goel_tail(base, 3)
    assert len(layers) == 3 and len(tail) > 3  # BatchNorm layers lie between them
    want = expected_model(setting)
    trained = owned(want, tail)
    for n, p in want.named_parameters():
        p.requires_grad_(n in trained)
    SGD(want).step(ce_on(want, setting, setting[2].retain))
    got = run_method(setting, "cf_k", k=3)
    assert_same_weights(got, want)
    before = dict(base.named_parameters())
    for n, p in got.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trained), n
    assert all(p.requires_grad for p in got.parameters())


def test_eu_k_reinitialises_the_last_k_layers_kaiming_normal_and_nothing_else(setting):
    """_reinit: kaiming_normal_ (fan in, ReLU gain: std sqrt(2 / fan_in)) weights, zero bias;
    BatchNorm layers are not reset. At lr 0 the model is the re-initialised one."""
    base = setting[1]
    tail, layers = goel_tail(base, 2)
    got = run_method(setting, "eu_k", lr=0.0)
    reset = owned(base, layers)
    before = dict(base.named_parameters())
    for n, p in got.named_parameters():
        assert torch.equal(p, before[n]) == (n not in reset), n
    for name in layers:
        layer = got.get_submodule(name)
        w = layer.weight
        assert w.std().item() == pytest.approx(math.sqrt(2 / w[0].numel()), rel=0.1), name
        assert abs(w.mean().item()) < 0.2 * w.std().item()
        assert layer.bias is None or torch.equal(layer.bias, torch.zeros_like(layer.bias))


# ---------------------------------------------------------------- SSD

def test_ssd_dampens_by_the_fisher_ratio_where_forget_importance_exceeds_alpha_times_train(setting):
    """Foster et al.: I = E[g^2] (the mean over batches of squared batch gradients; one batch
    each here); where I_f > alpha I_t, theta *= min(lambda I_t / I_f, 1)."""
    split = setting[2]
    alpha, lam = 0.5, 0.1
    model = copy.deepcopy(setting[1]).eval()

    def importance(idx):
        params = list(model.parameters())
        return [g * g for g in torch.autograd.grad(ce_on(model, setting, idx), params)]
    on_train = importance(torch.cat([split.forget, split.retain]))
    on_forget = importance(split.forget)
    want = copy.deepcopy(model)
    with torch.no_grad():
        for p, it, ifo in zip(want.parameters(), on_train, on_forget):
            p.copy_(torch.where(ifo > alpha * it, p * (lam * it / ifo).clamp(max=1), p))
    got = run_method(setting, "ssd", alpha=alpha, lam=lam)
    assert_same_weights(got, want)
    assert any(not torch.equal(p, q) for p, q in zip(got.parameters(), model.parameters()))


# ---------------------------------------------------------------- BatchNorm statistics

def test_batchnorm_statistics_move_unless_frozen(setting):
    ds, base, split, fresh = setting

    def buffers_after(freeze):
        model = copy.deepcopy(base)
        run = Run(ds, split, 64, make_generator(0, CPU), compute_for(CPU, "fp32"), lr=LR, new_model=None,
                  freeze_bn=freeze)
        list(METHODS["ft"].unlearn(model, run, METHODS["ft"].settings(), None))
        return {n: b for n, b in model.named_buffers() if "running" in n}
    start = {n: b for n, b in base.named_buffers() if "running" in n}
    moved, frozen = buffers_after(False), buffers_after(True)
    assert start and all(torch.equal(frozen[n], b) for n, b in start.items())
    assert any(not torch.equal(moved[n], b) for n, b in start.items())
