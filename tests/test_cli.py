"""Command lines: every script's -h shows each default, and the forget flags read alike."""
import argparse
import importlib

import pytest

from conftest import run_here

SCRIPTS = ("train.py", "base_test.py", "feature_extraction.py", "tsne_vis.py", "wasserstein.py",
           "mask_vis.py", "bench.py", "audit.py", "tune.py")


@pytest.fixture(scope="module")
def helps():
    """`<script> -h` of every script as argparse prints it, in this process (each script's
    own process is tested elsewhere), wide enough that argparse wraps nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "1000")
        return {script: run_here(script, "-h") for script in SCRIPTS}


def options(script):
    """The script's optional arguments, from its own parser."""
    parser = importlib.import_module(script.removesuffix(".py")).build_parser()
    return [a for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default(script, helps):
    r = helps[script]
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    opts = options(script)
    assert opts or script == "mask_vis.py"
    for action in opts:
        assert action.help, f"{script} {action.option_strings[-1]} has no help text"
        if action.default is None or action.default is False:
            continue
        said = " ".join(action.help.split())
        shown = said % {"default": action.default} if "%(default)" in said else f"{said} (default: {action.default})"
        assert shown in text, f"{script} {action.option_strings[-1]}: {shown!r} not in -h"


FORGET_FLAGS = [("-CF", "--cf", "3"), ("-UL", "--unlr", "0.1"), ("-IF", "--itf", "forget.json")]


@pytest.mark.parametrize("script,required", [("train.py", []), ("base_test.py", ["-c", "a.pt"])])
@pytest.mark.parametrize("short,long,value", FORGET_FLAGS)
def test_forget_flags_have_the_readme_spelling(script, required, short, long, value):
    parse = importlib.import_module(script.removesuffix(".py")).parse_args
    a, b = parse([*required, short, value]), parse([*required, long, value])
    assert vars(a) == vars(b) != vars(parse(required))
