import math

import pytest
import torch

import datasets
import metrics
from conftest import assert_is_top_saliency_mask, plain_forget_gradients
from datasets import ForgetSpec, make_split
from methods import METHODS, Run, kth_largest, make_optimizer, saliency_mask, select_top
from models import load_model
from utils import compute_for, default_precision, make_generator

CPU = torch.device("cpu")


def brute_force_top(scores, k):
    """The k largest by a full stable sort: among equal scores the lowest positions."""
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected[scores.sort(descending=True, stable=True).indices[:k]] = True
    return expected


def test_select_top_matches_a_brute_force_ranking():
    scores = torch.rand(10_007, generator=torch.Generator().manual_seed(0))
    for frac in (0.01, 0.2, 0.5, 0.999):
        assert torch.equal(select_top(scores, frac), brute_force_top(scores, math.floor(frac * 10_007)))


def test_select_top_keeps_exactly_k_when_most_scores_tie():
    scores = torch.zeros(1000)
    scores[:100] = torch.arange(1, 101, dtype=torch.float)  # 90% exact zeros, as on 8x8 inputs
    for frac in (0.05, 0.2, 0.5, 1.0):
        keep = select_top(scores, frac)
        assert keep.sum() == math.floor(frac * 1000)
        assert torch.equal(keep, select_top(scores, frac))  # deterministic
        assert torch.equal(keep, brute_force_top(scores, math.floor(frac * 1000)))
    keep = select_top(scores, 0.2)
    assert keep[:100].all()  # every non-zero score is kept before any tie


@pytest.mark.parametrize("kind", ["continuous", "mostly zero", "few values", "all equal", "sorted"])
def test_select_top_on_millions_of_scores_agrees_with_a_full_sort(kind):
    """Above 1M entries the threshold is found through a sampled bracket."""
    g = torch.Generator().manual_seed(1)
    n = 1_500_007
    scores = {"continuous": lambda: torch.randn(n, generator=g).abs(),
              "mostly zero": lambda: torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.1),
              "few values": lambda: torch.randint(0, 4, (n,), generator=g).float(),
              "all equal": lambda: torch.ones(n),
              "sorted": lambda: torch.linspace(0, 1, n)}[kind]()
    for frac in (1e-6, 0.2, 0.5, 0.93):
        k = math.floor(frac * n)
        assert torch.equal(select_top(scores, frac), brute_force_top(scores, k)), frac
    assert kth_largest(scores, 12345) == scores.sort(descending=True).values[12344]


def tiny_run(ds, split, seed=0, batch_size=64):
    """A Run in the suite's precision (SALUN_PRECISION=bf16 runs the whole suite in bf16)."""
    return Run(ds, split, batch_size, make_generator(seed, CPU), compute_for(CPU, default_precision()))


def test_mask_keeps_the_floor_thr_n_most_salient_entries(ckpts, digits):
    model, cfg = load_model(ckpts["base"], CPU)
    split = make_split(digits, ForgetSpec(class_to_forget=0), val_idx=cfg["val_idx"])
    mask = saliency_mask(model, tiny_run(digits, split), 0.3)
    grads = plain_forget_gradients(model, digits, split.forget, 64)
    kept = assert_is_top_saliency_mask(mask.keep, grads, 0.3)
    for name, keep in mask.keep.items():
        assert mask.kept_fraction[name] == pytest.approx(keep.float().mean().item())
    assert mask.zero_fraction == pytest.approx(float((kept == 0).float().mean()), abs=1e-3)


@pytest.mark.parametrize("method", ["rl_split", "ga"])
def test_masked_out_weights_are_bit_for_bit_unchanged(ckpts, digits, method):
    model, _ = load_model(ckpts["base"], CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = tiny_run(digits, make_split(digits, ForgetSpec(class_to_forget=0)))
    mask = saliency_mask(model, run, 0.2)
    opt = make_optimizer(model, 0.1)  # momentum 0.9, weight decay 5e-4
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    for _ in range(2):
        METHODS[method].epoch(model, opt, run, mask)
    changed = 0
    for n, p in model.named_parameters():
        frozen = ~mask.keep[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        changed += int((p.detach() != before[n]).sum())
    assert changed > 0


# Settings with a margin: measured on fixture models trained in fp32 and in bf16 with
# several seeds, each setting brought forget accuracy below 40% from above 85%.
EFFECTIVE = {"rl": (0.1, 2), "rl_split": (0.1, 2), "ga": (0.1, 2), "ga_small": (0.05, 2), "ft": (0.5, 3)}


@pytest.mark.parametrize("method", sorted(EFFECTIVE))
def test_each_method_lowers_forget_accuracy(ckpts, digits, method):
    model, cfg = load_model(ckpts["base"], CPU)
    split = make_split(digits, ForgetSpec(class_to_forget=0), val_idx=cfg["val_idx"])
    forget_acc = lambda: metrics.accuracy(metrics.predict(model, digits, split.forget, compute_for(CPU, "fp32")))  # noqa: E731
    assert forget_acc() > 80, "the fixture's base model should know class 0"
    run = tiny_run(digits, split)
    lr, epochs = EFFECTIVE[method]
    opt = make_optimizer(model, lr)
    for _ in range(epochs):
        METHODS[method].epoch(model, opt, run)
    assert forget_acc() < 50, method


def test_random_labels_never_keep_the_true_label(digits):
    from methods import random_labels
    run = tiny_run(digits, make_split(digits, ForgetSpec(class_to_forget=0)))
    y = torch.randint(0, 10, (5000,))
    z = random_labels(run, y)
    assert (z != y).all() and set(z.tolist()) == set(range(10))


def test_forget_membership_is_a_lookup_table(digits):
    split = make_split(digits, ForgetSpec(unlearning_rate=0.1), seed=3)
    assert split.is_forget.dtype == torch.bool and split.is_forget.shape == digits.y_train.shape
    assert torch.equal(torch.nonzero(split.is_forget).flatten(), split.forget)


def test_method_registry():
    assert set(METHODS) >= {"rl", "rl_split", "ga", "ga_small", "ft", "retrain"}
    assert METHODS["retrain"].fresh_model and METHODS["ga"].cosine_lr
    assert datasets.DATASETS.keys() >= {"cifar10", "cifar100", "svhn", "mnist", "fashionmnist", "digits"}
