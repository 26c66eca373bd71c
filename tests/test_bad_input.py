"""Bad input at every entry point, in one table: main.py (experiment files, flags,
unsafe, damaged and old checkpoints, --resume), train.py, base_test.py, audit.py and the
latent-space scripts. Each case must end in one line on stderr, exit code 2, no
traceback, and nothing written. The first case of each script runs it as a subprocess,
as a user would; the others call its main function in this process through the same
cli() wrapper (a process start costs seconds, the check is the same). The working
directory is a temporary folder; the checkpoints are conftest's tiny digits models.
"""
import json
import os
from pathlib import Path

import pytest
import torch

import utils
from conftest import ROOT, run_here
from scripted import run


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---------------------------------------------------------------- files the table builds

class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil(path, tmp, ckpts):
    torch.save({"state_dict": {}, "config": {}, "x": Payload(tmp / "MARKER")}, path)


def truncated(path, tmp, ckpts):
    data = ckpts["base"].read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garbled(path, tmp, ckpts):
    data = bytearray(ckpts["base"].read_bytes())
    data[:64] = bytes(64)  # the zip header gone: torch falls back to reading it as a pickle
    path.write_bytes(bytes(data))


def other_dataset(path, tmp, ckpts):
    ck = utils.load_checkpoint(ckpts["gold"])
    utils.save_checkpoint(path, ck["state_dict"], dict(ck["config"], dataset="fashionmnist"))


def old_format(path, tmp, ckpts):
    """A checkpoint as the toolkit wrote them before validation sets were drawn first."""
    ck = utils.load_checkpoint(ckpts["base"])
    utils.save_checkpoint(path, ck["state_dict"], {k: v for k, v in ck["config"].items() if k != "format"})


def nan_lr(path, tmp, ckpts):
    path.write_text(f'[{{"checkpoint": "{ckpts["base"]}", "class_to_forget": 0, "lr": NaN}}]')


DIR = "<dir>"
DROP = object()


def exp(**kw):
    """One experiment of a file: a valid class-0 forgetting of the base model, then `kw`."""
    entry = {"checkpoint": "{base}", "class_to_forget": 0, "epochs": 1, "method": "ft", **kw}
    return [{k: v for k, v in entry.items() if v is not DROP}]


def fill(obj, subs):
    if isinstance(obj, str):
        for key, value in subs.items():
            obj = obj.replace("{" + key + "}", str(value))
        return obj
    if isinstance(obj, list):
        return [fill(x, subs) for x in obj]
    if isinstance(obj, dict):
        return {k: fill(v, subs) for k, v in obj.items()}
    return obj


def make_files(tmp, files, ckpts, subs):
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == DIR:
            path.mkdir(exist_ok=True)
        elif callable(content):
            content(path, tmp, ckpts)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(fill(content, subs)))


# ---------------------------------------------------------------- the table

MAIN_FILE = ("-L", "{tmp}/exp.json", "-NL", "--out", "{tmp}/out")
MAIN_FLAGS = ("-E", "1", "-M", "ft", "-NL", "--out", "{tmp}/out")
TRAIN = ("--dataset", "digits", "--model", "test_resnet", "--epochs", "1", "-NL", "--save-dir", "{tmp}/ckpt")
BASE_TEST = ("--out", "{tmp}/bt", "--no-mia")
IDX = "{tmp}/idx.json"

BAD_INDEX_FILES = [  # (id, content, message): each through main.py
    ("not-a-list", {"0": 1}, "must hold a list of indices, got dict"),
    ("non-integers", [1, 2.5], "holds non-integers, e.g. 2.5"),
    ("duplicates", [3, 7, 3], "index 3 appears more than once"),
    ("out-of-range", [0, 1437], "index 1437 out of range 0..1436"),
    ("empty", [], "is empty: nothing to forget"),
]


def case(id, script, args, files, message):
    return pytest.param(script, args, files, message, id=id)


def as_subprocess(table):
    """The id of each script's first case: those run as a process of their own."""
    first = {}
    for param in table:
        first.setdefault(param.values[0], param.id)
    return set(first.values())


BAD_INPUT = [
    # main.py, experiment files (test_main.py covers the file's shape, unknown keys, wrong
    # bool/int types, two specs, class 10, a missing checkpoint, mask_thr, lr < 0, epochs 0)
    case("main-unlearning-rate-1", "main.py", MAIN_FILE,
         {"exp.json": exp(class_to_forget=DROP, unlearning_rate=1.0)},
         "experiment 0: unlearning_rate: 1.0 outside (0, 1)"),
    case("main-lr-0", "main.py", MAIN_FILE, {"exp.json": exp(lr=0)}, "experiment 0: lr: 0 outside (0, inf)"),
    case("main-epochs-negative", "main.py", MAIN_FILE, {"exp.json": exp(epochs=-2)},
         "experiment 0: epochs: -2 outside [1, inf)"),
    case("main-method-args-misspelt", "main.py", MAIN_FILE,
         {"exp.json": exp(method="neggrad_plus", method_args={"alpah": 0.9})},
         "experiment 0: method_args: alpah: neggrad_plus has no setting 'alpah' (its settings: alpha)"),
    case("main-method-args-wrong-type", "main.py", MAIN_FILE, {"exp.json": exp(method="scrub", method_args={"msteps": 1.5})},
         "experiment 0: method_args: msteps: scrub: expected int, got 1.5"),
    case("main-method-args-not-an-object", "main.py", MAIN_FILE, {"exp.json": exp(method_args=[1])},
         "experiment 0: method_args: expected dict, got [1]"),
    case("main-method-arg-flag-out-of-range", "main.py", ("-c", "{base}", "-CF", "0", "-M", "ssd", "-MA", "alpha=-1",
                                                          *MAIN_FLAGS[4:]), {},
         "command line: -MA/--method-arg: alpha: ssd: -1 outside (0, inf)"),
    case("main-lr-string", "main.py", MAIN_FILE, {"exp.json": exp(lr="0.1")},
         'experiment 0: lr: expected float, got "0.1"'),
    case("main-no-forget-spec", "main.py", MAIN_FILE, {"exp.json": exp(class_to_forget=DROP)},
         "give exactly one of class_to_forget, unlearning_rate, idxs_to_forget (got none)"),
    case("main-retrained-other-dataset", "main.py", MAIN_FILE,
         {"other.pt": other_dataset, "exp.json": exp(retrained="{tmp}/other.pt")},
         "experiment 0: retrained: {tmp}/other.pt was trained on fashionmnist, the checkpoint on digits"),
    case("main-idx-missing", "main.py", MAIN_FILE, {"exp.json": exp(class_to_forget=DROP, idxs_to_forget=IDX)},
         "experiment 0: idxs_to_forget: index file {tmp}/idx.json not found"),
    *[case(f"main-idx-{id}", "main.py", MAIN_FILE,
           {"idx.json": content, "exp.json": exp(class_to_forget=DROP, idxs_to_forget=IDX)},
           ("experiment 0: idxs_to_forget: index file {tmp}/idx.json", message))
      for id, content, message in BAD_INDEX_FILES],
    # main.py, flags and unsafe or damaged checkpoints
    case("main-nexp-0", "main.py", ("-c", "{base}", "-CF", "0", "--nexp", "0", *MAIN_FLAGS), {},
         "--nexp must be at least 1, got 0"),
    case("main-flags-class-out-of-range", "main.py", ("-c", "{base}", "-CF", "10", *MAIN_FLAGS), {},
         "command line: -CF/--cf: class 10 out of range 0..9"),
    case("main-resume-not-a-run", "main.py", ("--resume", "{tmp}", "-NL"), {}, "is not a run folder (no config.json)"),
    case("main-evil-checkpoint", "main.py", ("-c", "{tmp}/evil.pt", "-CF", "0", *MAIN_FLAGS), {"evil.pt": evil},
         "command line: checkpoint {tmp}/evil.pt refused: it holds objects other than tensors"),
    case("main-evil-retrained", "main.py", MAIN_FILE, {"evil.pt": evil, "exp.json": exp(retrained="{tmp}/evil.pt")},
         "experiment 0: retrained: checkpoint {tmp}/evil.pt refused"),
    case("main-truncated-checkpoint", "main.py", ("-c", "{tmp}/half.pt", "-CF", "0", *MAIN_FLAGS),
         {"half.pt": truncated}, "command line: checkpoint {tmp}/half.pt is truncated at byte "),
    case("main-lr-nan", "main.py", MAIN_FILE, {"exp.json": nan_lr},
         "experiment 0: lr: must be a finite number, got NaN"),
    case("main-flag-lr-inf", "main.py", ("-c", "{base}", "-CF", "0", "-LR", "inf", "-NL", "--out", "{tmp}/out"), {},
         "command line: -LR/--lr: must be a finite number, got Infinity"),
    case("main-out-not-writable", "main.py", ("-c", "{base}", "-CF", "0", "-E", "1", "-NL", "--out", "/proc/salun"),
         {}, "--out /proc/salun is not writable"),
    case("main-old-format", "main.py", ("-c", "{tmp}/old.pt", "-CF", "0", *MAIN_FLAGS), {"old.pt": old_format},
         "command line: checkpoint {tmp}/old.pt has the old split format 1"),
    case("main-idx-names-validation", "main.py", MAIN_FILE,
         {"idx.json": [5, 59], "exp.json": exp(class_to_forget=DROP, idxs_to_forget=IDX)},
         "experiment 0: idxs_to_forget: index file {tmp}/idx.json names 1 validation sample(s) of this model "
         "(e.g. index 59)"),
    case("main-resume-other-flags", "main.py", ("--resume", "{tmp}/run", "--nexp", "3", "-NL"),
         {"run/config.json": {"experiments": [], "names": [], "nexp": 1}},
         "--resume continues {tmp}/run exactly as it was configured; --nexp would change it"),
    case("main-resume-older-folder", "main.py", ("--resume", "{tmp}/run", "-NL"),
         {"run/config.json": {"experiments": [], "names": [], "nexp": 1, "data_dir": "data"}},
         "{tmp}/run was written by an older version of main.py"),
    # main.py, messages that say what to do
    case("main-nothing-given", "main.py", ("-NL", "--out", "{tmp}/out"), {},
         "nothing to unlearn: give an experiment list (-L FILE), or a checkpoint (-c) and what to forget"),
    case("main-shared-missing-checkpoint", "main.py", MAIN_FILE,  # one line for the three experiments
         {"exp.json": exp(checkpoint="{tmp}/resnet18_digits_cf3.pt") * 3},
         "exp.json: experiments 0-2: checkpoint {tmp}/resnet18_digits_cf3.pt not found; train.py makes it: "
         "python train.py --model resnet18 --dataset digits --cf 3 --save-dir {tmp}"),
    case("main-text-file-checkpoint", "main.py", ("-c", "{tmp}/notes.pt", "-CF", "0", *MAIN_FLAGS),
         {"notes.pt": b"hello\n"},
         "command line: -c/--checkpoint: {tmp}/notes.pt is not a checkpoint (it is a text file)"),
    case("main-flag-unlr-0", "main.py", ("-c", "{base}", "-UL", "0", *MAIN_FLAGS), {},
         "command line: -UL/--unlr: 0.0 outside (0, 1)"),
    case("main-resume-missing", "main.py", ("--resume", "{tmp}/nope", "-NL"), {}, "run folder {tmp}/nope not found"),
    # train.py (test_train.py covers --cf 10, --unlr 1.5, two specs, a missing --itf,
    # an unknown dataset, a misspelt model, --epochs 0, and --overwrite)
    case("train-itf-duplicates", "train.py", (*TRAIN, "--itf", IDX), {"idx.json": [3, 7, 3]},
         "index 3 appears more than once"),  # the other index-file cases share main.py's reader
    case("train-itf-names-validation", "train.py", (*TRAIN, "--itf", IDX), {"idx.json": [59]},
         "index file {tmp}/idx.json names 1 validation sample(s) of this model (e.g. index 59)"),
    case("train-save-dir-not-writable", "train.py", (*TRAIN[:-1], "/proc/salun"), {},
         "--save-dir /proc/salun is not writable"),
    case("train-unknown-model", "train.py", (*TRAIN, "--model", "no_such_net"),
         {}, "unknown model 'no_such_net'; see timm.list_models() (e.g. resnet18"),
    case("train-unknown-dataset", "train.py", (*TRAIN, "--dataset", "mnist2"),
         {}, "unknown dataset 'mnist2'; known: cifar10, cifar100, svhn, mnist, fashionmnist, digits"),
    # base_test.py
    case("base-test-evil", "base_test.py", ("-c", "{base}", "{tmp}/evil.pt", *BASE_TEST), {"evil.pt": evil},
         "checkpoint {tmp}/evil.pt refused"),
    case("base-test-garbled", "base_test.py", ("-c", "{tmp}/garbled.pt", *BASE_TEST), {"garbled.pt": garbled},
         "{tmp}/garbled.pt is not a checkpoint (it is not a zip archive, the format torch saves in)"),
    case("base-test-class-out-of-range", "base_test.py", ("-c", "{base}", "--cf", "10", *BASE_TEST), {},
         "--cf: class 10 out of range 0..9"),
    case("base-test-unlr", "base_test.py", ("-c", "{base}", "--unlr", "1.5", *BASE_TEST), {},
         "--unlr: 1.5 outside (0, 1)"),
    case("base-test-out-not-writable", "base_test.py", ("-c", "{base}", "--out", "/proc/salun/bt"), {},
         "--out /proc/salun/bt is not writable"),
    case("base-test-old-format", "base_test.py", ("-c", "{tmp}/old.pt", *BASE_TEST), {"old.pt": old_format},
         "checkpoint {tmp}/old.pt has the old split format 1 (its validation set depends on its forget set); "
         "retrain it with train.py"),
    case("base-test-itf-duplicates", "base_test.py", ("-c", "{base}", "--itf", IDX, *BASE_TEST),
         {"idx.json": [5, 5]}, "index 5 appears more than once"),
    # audit.py (test_audit.py covers its own checks)
    case("audit-cpus-per-run-without-ray", "audit.py", ("-c", "{base}", "-CF", "0", "--cpus-per-run", "1", "-NL",
                                                        "--out", "{tmp}/out", "--models-dir", "{tmp}/pool"), {},
         "--cpus-per-run is for --executor ray only"),
    # the latent-space scripts
    case("features-empty-folder", "feature_extraction.py", ("-D", "{tmp}/ck", "-S", "10", "--out", "{tmp}/feat"),
         {"ck": DIR}, "no checkpoints (*.pt) in {tmp}/ck"),
    case("features-wrong-file", "feature_extraction.py", ("-D", "{tmp}/ck", "-S", "10", "--out", "{tmp}/feat"),
         {"ck/notes.pt": b"not a checkpoint\n"}, "{tmp}/ck/notes.pt is not a checkpoint (it is a text file)"),
    case("features-evil-file", "feature_extraction.py", ("-D", "{tmp}/ck", "-S", "10", "--out", "{tmp}/feat"),
         {"ck/evil.pt": evil}, "checkpoint {tmp}/ck/evil.pt refused"),
    case("wasserstein-empty-folder", "wasserstein.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft": DIR}, "no features files (*.json) in {tmp}/ft"),
    case("wasserstein-wrong-file", "wasserstein.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft/a.json": {"all_features": [[1, 2]]}}, "{tmp}/ft/a.json is not a features file (no all_labels, proto)"),
    case("tsne-empty-folder", "tsne_vis.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft": DIR}, "no features files (*.json) in {tmp}/ft"),
    case("tsne-wrong-file", "tsne_vis.py", ("--folders", "{tmp}/ft", "--out", "{tmp}/img"),
         {"ft/a.json": b"[1, 2"}, "{tmp}/ft/a.json is not valid JSON"),
]


SUBPROCESS = as_subprocess(BAD_INPUT)


@pytest.mark.parametrize("script, args, files, message", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ckpts, tmp_path, script, args, files, message, request):
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} is not written yet")
    subs = {"tmp": tmp_path, "base": ckpts["base"], "gold": ckpts["gold"]}
    make_files(tmp_path, files, ckpts, subs)
    before = tree(tmp_path)
    if request.node.callspec.id in SUBPROCESS:
        r = run(script, *fill(list(args), subs), cwd=tmp_path, timeout=120)
    else:
        r = run_here(script, *fill(list(args), subs), cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in (message,) if isinstance(message, str) else message:
        assert fill(part, subs) in lines[0]
    assert tree(tmp_path) == before  # no output/, checkpoints/, features/, images/, --out
    assert not (tmp_path / "MARKER").exists()  # an unsafe checkpoint never ran its code

