"""Shared fixtures: the repository on sys.path, two script runners, tiny trained checkpoints.

The checkpoints use timm's `test_resnet` (a few hundred thousand weights) on digits so
that the end-to-end tests take seconds; the demo and README use ResNet-18. They are
trained once per session, in this process: the tests of train.py's command line run it
as a process of its own.
"""
import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# `make test` runs the suite on two pytest-xdist workers, one file at a time each: one torch
# thread per worker (and per script it starts), as two processes of two threads on two cores
# slow each other several times over. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# pytest-xdist hands out whole files in collection order: the longest first, so that the two
# workers finish together.
LONGEST_FIRST = ("test_ray.py", "test_audit.py", "test_tune.py", "test_bench.py", "test_main.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """Run one of the toolkit's scripts as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def run_here(script, *args, cwd=None):
    """A script's main function in this process, through the cli() wrapper that its command line
    runs it with and with its sys.argv: the exit code, stdout and stderr as run_script returns
    them, without the seconds a process start costs. For what a script prints and writes;
    run_script is the user's path."""
    import utils
    module = importlib.import_module(script.removesuffix(".py"))
    entry = getattr(module, "main_", None) or module.main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.chdir(cwd or ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "argv", [str(ROOT / script), *map(str, args)]):
        try:
            utils.cli(lambda: entry([*map(str, args)]))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def train_tiny(folder, *extra):
    """train.py on digits with timm's test_resnet, in the suite's precision (SALUN_PRECISION)."""
    r = run_here("train.py", "--dataset", "digits", "--model", "test_resnet", "--epochs", "4",
                 "--batch-size", "64", "--lr", "0.2", "-NL", "--save-dir", folder, *extra)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """A tiny base model and its gold standard without class 0, trained once per session."""
    d = tmp_path_factory.mktemp("ckpts")
    for extra in ((), ("--cf", "0")):
        train_tiny(d, *extra)
    return {"dir": d, "base": d / "test_resnet_digits_base.pt", "gold": d / "test_resnet_digits_cf0.pt"}


@pytest.fixture(scope="session")
def more_golds(ckpts):
    """Gold standards of the same base model without class 3 and without a random 10%."""
    train_tiny(ckpts["dir"], "--cf", "3")
    train_tiny(ckpts["dir"], "--unlr", "0.1")
    return {"cf3": ckpts["dir"] / "test_resnet_digits_cf3.pt", "rf": ckpts["dir"] / "test_resnet_digits_rf0.1.pt"}


def plain_forget_gradients(model, ds, forget, batch_size):
    """SalUn's saliency written out directly: the sum over forget batches of the gradient
    of the batch-mean cross-entropy, in eval mode and fp32."""
    import torch
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for start in range(0, len(forget), batch_size):
        i = forget[start:start + batch_size]
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(ds.prepare(ds.x_train[i])), ds.y_train[i]).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad
    return total


def assert_is_top_saliency_mask(keep, grads, fraction):
    """`keep` holds floor(fraction * n) entries, and none of them is less salient than an entry left out."""
    import math
    import torch
    n = sum(g.numel() for g in grads.values())
    assert set(keep) == set(grads) and sum(int(k.sum()) for k in keep.values()) == math.floor(fraction * n)
    kept = torch.cat([grads[k][keep[k]].abs() for k in grads])
    dropped = torch.cat([grads[k][~keep[k]].abs() for k in grads])
    assert kept.min() >= dropped.max() - 1e-6 * kept.max()
    return kept


@pytest.fixture(scope="session")
def digits():
    import datasets
    return datasets.load_dataset("digits")
