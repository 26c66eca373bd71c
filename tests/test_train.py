import json

import pytest
import torch

import datasets
import experiments
import train as train_script
import models
import utils
from conftest import run_here
from scripted import run
from datasets import ForgetSpec

TINY = ("--dataset", "digits", "--model", "test_resnet", "--epochs", "1", "-NL")


def train(tmp_path, *extra):
    """train.py in this process; the test of an interrupted training runs it as a process of its own."""
    r = run_here("train.py", *TINY, "--save-dir", tmp_path, *extra)
    assert r.returncode == 0, r.stderr
    return r


def test_checkpoints_from_train_load_weights_only_and_reproduce_their_split(ckpts, digits):
    for key, forget_class in (("base", None), ("gold", 0)):
        ck = torch.load(ckpts[key], weights_only=True)
        cfg = ck["config"]
        assert cfg["dataset"] == "digits" and cfg["num_classes"] == 10 and cfg["stem"] == "resnet_deep_stride1"
        assert cfg["forget"]["class_to_forget"] == forget_class
        split = datasets.make_split(digits, ForgetSpec(class_to_forget=forget_class), seed=cfg["seed"])
        assert torch.nonzero(split.in_val).flatten().tolist() == cfg["val_idx"]  # the same held-out samples
        assert split.forget.tolist() == cfg["forget_idx"]
        assert cfg["format"] == models.CHECKPOINT_FORMAT
        assert cfg["precision"] in ("fp32", "bf16") and cfg["device"] == "cpu" and cfg["device_name"]
        forget_json = json.loads(ckpts[key].with_name(ckpts[key].stem + "_forget.json").read_text())
        assert forget_json == cfg["forget_idx"] == sorted(forget_json)


def test_gold_standard_never_saw_the_class(ckpts):
    cfg = torch.load(ckpts["gold"], weights_only=True)["config"]
    assert cfg["metrics"]["test_forgotten_acc"] == 0.0
    assert cfg["metrics"]["test_top1"] > 50


def test_random_forgetting_is_reproducible_and_itf_reuses_it(tmp_path):
    train(tmp_path, "--unlr", "0.1", "--seed", "1", "--comment", "a")
    train(tmp_path, "--unlr", "0.1", "--seed", "1", "--comment", "b")
    a = json.loads((tmp_path / "test_resnet_digits_a_forget.json").read_text())
    b = json.loads((tmp_path / "test_resnet_digits_b_forget.json").read_text())
    assert a == b and len(a) == int(0.1 * (1437 - 143)) and a == sorted(a)
    r = train(tmp_path, "--itf", tmp_path / "test_resnet_digits_a_forget.json", "--seed", "1")
    again = json.loads((tmp_path / "test_resnet_digits_itf_test_resnet_digits_a_forget.json").read_text())
    assert again == a
    assert "top-1" in r.stdout


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    train(tmp_path, "--comment", "x")
    path = tmp_path / "test_resnet_digits_x.pt"
    before = path.read_bytes()
    r = run_here("train.py", *TINY, "--save-dir", tmp_path, "--comment", "x")
    assert r.returncode == 2 and "--overwrite" in r.stderr and path.read_bytes() == before
    train(tmp_path, "--comment", "x", "--overwrite", "--seed", "3")
    assert path.read_bytes() != before


@pytest.mark.parametrize("args, message", [
    (("--cf", "10"), "out of range"),
    (("--unlr", "1.5"), "outside"),
    (("--unlr", "0"), "--unlr: 0 leaves nothing out; to train a base model, leave --unlr out"),
    (("--cf", "1", "--unlr", "0.1"), "exactly one"),
    (("--itf", "missing.json"), "not found"),
    (("--dataset", "imagenet"), "known: cifar10"),
    (("--model", "resnet18x"), "unknown model"),
    (("--epochs", "0"), "positive"),
    (("--lr", "nan"), "--lr finite"),
    (("--lr", "inf"), "--lr finite"),
])
def test_bad_arguments_end_in_one_line_and_exit_2(tmp_path, args, message, capsys):
    """In this process, through the same cli() wrapper the script uses (test_bad_input.py
    runs such cases as subprocesses)."""
    with pytest.raises(SystemExit) as e:
        utils.cli(lambda: train_script.main([*TINY, "--save-dir", str(tmp_path), *map(str, args)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_fashionmnist_from_the_debian_folder_when_installed(tmp_path):
    folder = "/usr/share/datasets/fashion-mnist"
    if not datasets._find_idx(folder, "FashionMNIST"):
        pytest.skip("apt-get install dataset-fashion-mnist to run this")
    ds = datasets.load_dataset("fashionmnist", folder)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.max() == 9


def test_base_and_gold_standards_share_one_validation_set(ckpts, more_golds, digits):
    """Trained with one seed, a base model and its gold standards (classes 0 and 3, a random
    10%) hold out the same samples; no forgotten sample is one of them; and each gold model's
    forget set is exactly the one main.py forgets from the base model."""
    base = utils.load_checkpoint(ckpts["base"])["config"]
    specs = {ckpts["gold"]: ForgetSpec(class_to_forget=0), more_golds["cf3"]: ForgetSpec(class_to_forget=3),
             more_golds["rf"]: ForgetSpec(unlearning_rate=0.1)}
    assert base["forget_idx"] == []
    for path, spec in specs.items():
        gold = utils.load_checkpoint(path)["config"]
        assert gold["val_idx"] == base["val_idx"] and gold["seed"] == base["seed"]
        assert gold["forget_idx"] and not set(gold["forget_idx"]) & set(base["val_idx"])
        e = experiments.Experiment(checkpoint=str(ckpts["base"]), retrained=str(path), seed=base["seed"],
                                   batch_size=64, **spec.to_config())
        assert experiments.Checker("data").problems(e) == []  # main.py accepts it as the gold standard
        split = datasets.make_split(digits, e.spec, seed=e.seed, val_idx=base["val_idx"])  # as unlearning.prepare
        assert split.forget.tolist() == gold["forget_idx"]


def test_an_interrupted_training_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    """Stopped after epoch 1 of 3 (--stop-after), then --resume: the same final weights,
    buffers and metrics as one uninterrupted run; the resume file is gone at the end."""
    recipe = ("--dataset", "digits", "--model", "test_resnet", "--epochs", "3", "--batch-size", "64",
              "--lr", "0.2", "-NL", "--cf", "3")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    r = run("train.py", *recipe, "--save-dir", whole, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/3 loss" in r.stdout + r.stderr and "epoch 3/3 loss" in r.stdout + r.stderr  # the curve in a log
    r = run("train.py", *recipe, "--save-dir", parts, "--stop-after", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = parts / "test_resnet_digits_cf3.resume"
    assert "--resume" in r.stdout and state.is_file() and not (parts / "test_resnet_digits_cf3.pt").exists()
    assert torch.load(state, weights_only=True)["epoch"] == 1
    r = run("train.py", *recipe, "--save-dir", parts, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not state.exists()
    a = torch.load(whole / "test_resnet_digits_cf3.pt", weights_only=True)
    b = torch.load(parts / "test_resnet_digits_cf3.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["config"]["metrics"] == b["config"]["metrics"]


def test_resume_refuses_a_missing_state_and_another_command(tmp_path, capsys):
    """In this process, through the cli() wrapper the script uses."""
    def train_here(*args):
        with pytest.raises(SystemExit) as e:
            utils.cli(lambda: train_script.main([*TINY, "--epochs", "2", "--save-dir", str(tmp_path), *args]))
        return e.value.code, capsys.readouterr().err

    code, err = train_here("--resume")
    assert code == 2 and "nothing to resume" in err and len(err.strip().splitlines()) == 1
    train_script.main([*TINY, "--epochs", "2", "--save-dir", str(tmp_path), "--stop-after", "1"])
    assert (tmp_path / "test_resnet_digits_base.resume").is_file()
    capsys.readouterr()
    code, err = train_here("--lr", "0.05", "--resume")
    assert code == 2 and "other settings (lr differ)" in err and len(err.strip().splitlines()) == 1, err
