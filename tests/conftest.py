"""Shared fixtures: the repository on sys.path, a script runner, tiny trained checkpoints.

The checkpoints use timm's `test_resnet` (a few hundred thousand weights) on digits so
that the end-to-end tests take seconds; the demo and README use ResNet-18.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """Run one of the toolkit's scripts as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """A tiny base model and its gold standard without class 0, trained once per session."""
    d = tmp_path_factory.mktemp("ckpts")
    common = ("--dataset", "digits", "--model", "test_resnet", "--epochs", "4", "--batch-size", "64",
              "--lr", "0.2", "-NL", "--save-dir", d)
    for extra in ((), ("--cf", "0")):
        r = run_script("train.py", *common, *extra)
        assert r.returncode == 0, r.stderr
    return {"dir": d, "base": d / "test_resnet_digits_base.pt", "gold": d / "test_resnet_digits_cf0.pt"}


@pytest.fixture(scope="session")
def digits():
    import datasets
    return datasets.load_dataset("digits")
