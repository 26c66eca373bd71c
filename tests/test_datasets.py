import gzip
import json
import struct
import time

import pytest
import torch

import datasets
from conftest import run_script
from datasets import ForgetSpec, make_split, read_idx, read_index_file
from utils import UserError


def test_digits_is_uint8_nchw_with_fixed_split(digits):
    assert digits.x_train.dtype == torch.uint8 and digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    again = datasets.load_dataset("digits")
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_train, digits.y_train)


SPECS = [ForgetSpec(), ForgetSpec(class_to_forget=3), ForgetSpec(unlearning_rate=0.1)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("given_val", [False, True])
def test_split_partitions_the_training_set_and_forgets_no_validation_sample(digits, spec, given_val):
    val_idx = list(range(0, 1437, 7)) if given_val else None  # a checkpoint's own held-out set
    s = make_split(digits, spec, seed=5, val_idx=val_idx)
    parts = [set(x.tolist()) for x in (s.forget, s.retain, s.val, s.val_forgotten)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(digits.y_train)
    assert not parts[0] & (parts[2] | parts[3])  # no forget sample was held out
    assert set(s.train.tolist()) == parts[0] | parts[1]
    assert s.is_forget.sum() == len(s.forget)
    if given_val:
        assert parts[2] | parts[3] == set(val_idx)


def test_validation_set_depends_on_the_seed_alone(digits):
    """A base model and its gold standards, trained with one seed, hold out the same samples."""
    splits = [make_split(digits, spec, seed=4) for spec in SPECS]
    for s in splits[1:]:
        assert torch.equal(s.in_val, splits[0].in_val)
    assert not torch.equal(make_split(digits, ForgetSpec(), seed=5).in_val, splits[0].in_val)
    assert int(splits[0].in_val.sum()) == int(0.1 * len(digits.y_train))


def test_class_and_rate_specs(digits):
    s = make_split(digits, ForgetSpec(class_to_forget=3))
    assert torch.equal(s.forget, torch.nonzero((digits.y_train == 3) & ~s.in_val).flatten())
    assert (digits.y_train[s.retain] != 3).all() and (digits.y_train[s.val] != 3).all()
    assert (digits.y_train[s.val_forgotten] == 3).all() and len(s.val_forgotten) > 0
    r = make_split(digits, ForgetSpec(unlearning_rate=0.1), seed=1)
    n_val = int(0.1 * len(digits.y_train))
    assert len(r.val) == n_val and len(r.val_forgotten) == 0
    assert len(r.forget) == int(0.1 * (len(digits.y_train) - n_val))  # of what the base model trained on


def test_same_seed_same_split_other_seed_other_split(digits):
    a, b = (make_split(digits, ForgetSpec(unlearning_rate=0.2), seed=7) for _ in range(2))
    c = make_split(digits, ForgetSpec(unlearning_rate=0.2), seed=8)
    assert torch.equal(a.forget, b.forget) and torch.equal(a.val, b.val)
    assert not torch.equal(a.forget, c.forget)


def test_index_spec_may_not_name_a_validation_sample(digits, tmp_path):
    f = tmp_path / "f.json"
    f.write_text(json.dumps([9, 2, 40]))
    s = make_split(digits, ForgetSpec(idxs_to_forget=str(f)), val_idx=[3, 4])
    assert s.forget.tolist() == [2, 9, 40] and s.val.tolist() == [3, 4]
    assert not {2, 3, 4, 9, 40} & set(s.retain.tolist())
    with pytest.raises(UserError, match="names 1 validation sample.*index 2"):
        make_split(digits, ForgetSpec(idxs_to_forget=str(f)), val_idx=[2, 3, 4])
    with pytest.raises(UserError, match="validation sample"):
        make_split(digits, ForgetSpec(), val_idx=[2, 3], forget_idx=[3, 9])


@pytest.mark.parametrize("content, message", [
    ({"a": 1}, "must hold a list"), ([], "empty"), ([1, "x"], "non-integers"), ([1, True], "non-integers"),
    ([1.5], "non-integers"), ([0, 5000], "out of range"), ([-1], "out of range"), ([3, 3], "more than once"),
])
def test_index_file_validation(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        read_index_file(f, 1437)


def test_index_file_not_json(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("[1, 2,")
    with pytest.raises(UserError, match="not valid JSON"):
        read_index_file(f, 10)


def test_forget_spec_problems():
    assert ForgetSpec(class_to_forget=1, unlearning_rate=0.1).problems()[0][0] == "forget spec"
    assert ForgetSpec(class_to_forget=10).problems(10)[0][0] == "class_to_forget"
    assert ForgetSpec(unlearning_rate=1.0).problems()[0][0] == "unlearning_rate"
    assert ForgetSpec(class_to_forget=9).problems(10) == []


def write_idx(path, array):
    dims = array.shape
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}i", *dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_gz_idx_reader_and_folder_loader(tmp_path):
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.uint8)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    assert torch.equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    ds = datasets.load_dataset("fashionmnist", tmp_path)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.y_test.tolist() == list(range(6))
    assert ds.classes[0] == "T-shirt/top"


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3i", 10, 28, 28) + b"\0" * 100)
    with pytest.raises(UserError, match="truncated"):
        read_idx(path)


def test_missing_dataset_is_one_line_exit_2(tmp_path):
    start = time.time()
    r = run_script("train.py", "--dataset", "cifar10", "--data-dir", tmp_path / "empty", "-NL",
                   "--save-dir", tmp_path, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar10" in lines[0] and str(tmp_path / "empty") in lines[0]
    assert time.time() - start < 30
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("pad,flip", [(2, True), (2, False), (0, True), (0, False)])
def test_crop_and_flip_match_a_per_sample_reference(pad, flip):
    x = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8)
    out = datasets.crop_and_flip(x, pad, flip, torch.Generator().manual_seed(3)).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    shift = torch.randint(0, 2 * pad + 1, (2, 64), generator=g) if pad else torch.zeros(2, 64, dtype=int)
    flipped = torch.rand(64, generator=g) < 0.5 if flip else torch.zeros(64, dtype=bool)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(64):
        dy, dx = int(shift[0, i]), int(shift[1, i])
        want = padded[i, :, dy:dy + 6, dx:dx + 5]
        assert torch.equal(out[i], want.flip(2) if flipped[i] else want)
    assert out.dtype == torch.uint8
    assert flipped.any() == flip and bool((shift != pad).any()) == bool(pad)


def test_prepare_normalises_with_the_training_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (500, 3, 4, 6), dtype=torch.uint8, generator=g)
    ds = datasets.Dataset("toy", x, torch.zeros(500, dtype=torch.long), x[:2], torch.zeros(2, dtype=torch.long),
                          ["a"], flip=True, crop_pad=1).to("cpu")
    want = (x.float() / 255 - (x.float() / 255).mean((0, 2, 3), keepdim=True)) \
        / (x.float() / 255).std((0, 2, 3), keepdim=True)
    for channels_last in (False, True):
        got = ds.prepare(ds.x_train, channels_last=channels_last)
        assert got.shape == x.shape and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    aug = ds.prepare(ds.x_train[:16], g, augment=True)
    assert aug.shape == (16, 3, 4, 6) and aug.is_contiguous()


def test_batches_cover_indices_once_and_never_end_in_one(digits):
    idx = torch.arange(65)
    seen = [i for _, _, i in datasets.batches(digits, idx, 32)]
    assert torch.equal(torch.cat(seen), idx)
    shuffled = [len(i) for _, _, i in datasets.batches(digits, idx, 32, gen=torch.Generator().manual_seed(0))]
    assert shuffled == [32, 32]
