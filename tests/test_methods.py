import math
from dataclasses import fields

import pytest
import torch

import datasets
import metrics
from conftest import assert_is_top_saliency_mask, plain_forget_gradients
from datasets import ForgetSpec, make_split
from methods import METHODS, Run, kth_largest, saliency_mask, select_top
from models import load_model, model_from_config
from utils import compute_for, default_precision, make_generator, value_problem

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


def tiny_run(ds, split, cfg=None, seed=0, batch_size=64, lr=0.1, epochs=1):
    """A Run in the suite's precision (SALUN_PRECISION=bf16 runs the whole suite in bf16)."""
    new_model = (lambda: model_from_config(cfg, CPU)) if cfg else None
    return Run(ds, split, batch_size, make_generator(seed, CPU), compute_for(CPU, default_precision()), lr=lr,
               epochs=epochs, new_model=new_model)


def unlearn(name, model, run, mask=None, **settings):
    """Every epoch of method `name`; returns the losses it yielded."""
    m = METHODS[name]
    return list(m.unlearn(model, run, m.settings(**settings), mask))


def test_mask_keeps_the_floor_thr_n_most_salient_entries(ckpts, digits):
    model, cfg = load_model(ckpts["base"], CPU)
    split = make_split(digits, ForgetSpec(class_to_forget=0), val_idx=cfg["val_idx"])
    mask = saliency_mask(model, tiny_run(digits, split), 0.3)
    grads = plain_forget_gradients(model, digits, split.forget, 64)
    kept = assert_is_top_saliency_mask(mask.keep, grads, 0.3)
    for name, keep in mask.keep.items():
        assert mask.kept_fraction[name] == pytest.approx(keep.float().mean().item())
    assert mask.zero_fraction == pytest.approx(float((kept == 0).float().mean()), abs=1e-3)


UNLEARNING = sorted(set(METHODS) - {"retrain"})  # retrain starts from a new model: nothing to keep


# Per method, (lr, epochs, settings) with a margin: measured on fixture-like models (test_resnet,
# 4 epochs) trained in fp32 and in bf16 with seeds 0, 1 and 2, each brought forget accuracy
# on class 0 from above 85% to below 10%. These are stronger than the
# README's settings for ResNet-18: the fixture is smaller and forgets less easily with
# some methods (cf_k's default k=2 and ssd's default alpha left it at 70-100%).
# boundary_expanding at lr 0.1 left an fp32 fixture at 77-80% on an AVX-512 CPU; at 0.2 it
# reached 0-4% there in fp32 and bf16 (seeds 0 and 1). bad_teacher runs Adam, as its authors.
# boundary_shrink keeps a sample's own label where its FGSM step fails, as its authors: at eps
# 0.1 about half the digits forget set kept class 0; at eps 0.3, lr 0.05, 3 epochs three
# fixtures (trained in fp32 and bf16, with 1 and 2 threads) went to 0-18% in both precisions
# (lr 0.03, 2 epochs left one at 76%).
EFFECTIVE = {"rl": (0.1, 2, {}), "rl_split": (0.1, 2, {}), "ga": (0.1, 2, {}), "ga_small": (0.05, 2, {}),
             "ft": (0.5, 3, {}), "neggrad_plus": (0.1, 2, {}), "scrub": (0.1, 2, {}), "l1_sparse": (0.5, 3, {}),
             "bad_teacher": (0.001, 2, {}), "boundary_shrink": (0.05, 3, {"eps": 0.3}),
             "boundary_expanding": (0.2, 3, {}),
             "cf_k": (0.5, 3, {"k": 3}), "eu_k": (0.1, 2, {}), "ssd": (0.1, 1, {"alpha": 0.5, "lam": 0.1})}


@pytest.mark.parametrize("method", UNLEARNING)
def test_with_a_0_2_mask_at_most_a_fifth_of_the_weights_move_and_the_rest_not_at_all(ckpts, digits, method):
    model, cfg = load_model(ckpts["base"], CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = tiny_run(digits, make_split(digits, ForgetSpec(class_to_forget=0), val_idx=cfg["val_idx"]), cfg)
    mask = saliency_mask(model, run, 0.2)
    unlearn(method, model, run, mask, **EFFECTIVE[method][2])
    assert dict(model.named_parameters()).keys() == before.keys()  # boundary_expanding's extra class is gone
    changed = total = 0
    for n, p in model.named_parameters():
        frozen = ~mask.keep[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        changed += int((p.detach() != before[n]).sum())
        total += p.numel()
    assert 0 < changed <= math.floor(0.2 * total)
    assert all(p.requires_grad for p in model.parameters())  # cf_k / eu_k unfreeze what they froze


def test_every_unlearning_method_has_a_forgetting_test():
    assert EFFECTIVE.keys() == set(UNLEARNING)


@pytest.mark.parametrize("method", sorted(EFFECTIVE))
def test_each_method_lowers_forget_accuracy(ckpts, digits, method):
    model, cfg = load_model(ckpts["base"], CPU)
    split = make_split(digits, ForgetSpec(class_to_forget=0), val_idx=cfg["val_idx"])
    forget_acc = lambda: metrics.accuracy(metrics.predict(model, digits, split.forget, compute_for(CPU, "fp32")))  # noqa: E731
    assert forget_acc() > 80, "the fixture's base model should know class 0"
    lr, epochs, settings = EFFECTIVE[method]
    losses = unlearn(method, model, tiny_run(digits, split, cfg, lr=lr, epochs=epochs), **settings)
    assert len(losses) == (1 if method == "ssd" else epochs)
    assert forget_acc() < 50, method


def test_forget_membership_is_a_lookup_table(digits):
    split = make_split(digits, ForgetSpec(unlearning_rate=0.1), seed=3)
    assert split.is_forget.dtype == torch.bool and split.is_forget.shape == digits.y_train.shape
    assert torch.equal(torch.nonzero(split.is_forget).flatten(), split.forget)


def test_every_method_documents_its_settings():
    for name, m in METHODS.items():
        assert m.summary and m.paper and m.code, name
        for f in fields(m.settings):
            assert f.metadata["doc"] and f.type in (int, float, bool, str), (name, f.name)
            assert value_problem(f, f.default) is None, (name, f.name)  # the default is in range
            if f.metadata["deviation"]:  # the published method by default; a deviation is opt-in
                assert f.type is bool and f.default is False, (name, f.name)
    assert METHODS["retrain"].fresh_model
    assert datasets.DATASETS.keys() >= {"cifar10", "cifar100", "svhn", "mnist", "fashionmnist", "digits"}


def test_boundary_expanding_finds_a_classifier_nested_in_a_head_module():
    """timm names a ByobNet's classifier 'head.fc' (a ResNet's 'fc'): the extra class goes there and
    comes back out."""
    import methods
    from models import create_model
    model, _ = create_model("test_byobnet", 10, 1, 28)
    assert methods.classifier_name(model) == "head.fc"
    head = model.get_submodule("head.fc")
    methods.set_submodule(model, "head.fc", methods.ExtraClass(head))
    assert model.train()(torch.zeros(2, 1, 28, 28)).shape == (2, 11)
    methods.set_submodule(model, "head.fc", head)
    assert model.head.fc is head
    resnet, _ = create_model("test_resnet", 10, 1, 8)
    assert methods.classifier_name(resnet) == "fc"
