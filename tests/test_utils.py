import os
import pickle

import pytest
import torch

import utils
from models import create_model
from utils import UserError, load_checkpoint, mean_std, save_checkpoint


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model, _ = create_model("test_resnet", 10, 1, 8)
    config = {"model": "test_resnet", "val_idx": [1, 2], "forget": {"class_to_forget": None}, "lr": 0.1}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model.state_dict(), config)
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == config
    ck = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(ck["state_dict"][k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left


def test_config_must_be_plain(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.pt", {}, {"device": torch.device("cpu")})
    assert not (tmp_path / "m.pt").exists()


class Payload:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": {}, "x": Payload(marker)}, path)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(UserError):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_are_reported(tmp_path):
    model, _ = create_model("test_resnet", 10, 1, 8)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model.state_dict(), {})
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=f"^checkpoint {path} is truncated at byte {len(data) // 2}: it was cut off"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not a SalUn DeepDive checkpoint"):
        load_checkpoint(path)
    path.write_text("epoch 3: loss 0.1\n")
    with pytest.raises(UserError, match=r"is not a checkpoint \(it is a text file\)$"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"is not a checkpoint \(it is empty\)$"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="^checkpoint .*missing.pt not found$"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 2), (64, 3, 3, 3)])
def test_packed_mask_reads_back_bit_for_bit(tmp_path, shape):
    torch.manual_seed(sum(shape))
    keep = {"a.weight": torch.rand(shape) < 0.3, "b": torch.ones(shape, dtype=torch.bool),
            "c": torch.zeros(shape, dtype=torch.bool)}
    utils.save_mask(tmp_path / "m.pt", keep, {"name": "m"})
    stored = load_checkpoint(tmp_path / "m.pt")["state_dict"]
    assert all(t.dtype == torch.uint8 for t in stored.values())
    assert stored["b"].numel() == -(-torch.Size(shape).numel() // 8)  # one bit per entry
    back, config = utils.load_mask(tmp_path / "m.pt")
    assert config["name"] == "m" and back.keys() == keep.keys()
    assert all(back[k].dtype == torch.bool and torch.equal(back[k], keep[k]) for k in keep)


def test_pack_bits_by_hand():
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert utils.pack_bits(bits).tolist() == [0b10110001, 0b10000000]


def test_masks_stored_as_bool_tensors_still_read_and_weights_are_refused(tmp_path):
    keep = {"w": torch.tensor([[True, False], [False, True]])}
    save_checkpoint(tmp_path / "old.pt", keep, {"name": "old"})
    back, _ = utils.load_mask(tmp_path / "old.pt")
    assert torch.equal(back["w"], keep["w"])
    save_checkpoint(tmp_path / "w.pt", {"w": torch.zeros(2)}, {})
    with pytest.raises(UserError, match="is not a saliency mask"):
        utils.load_mask(tmp_path / "w.pt")


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([2.0, float("nan")]) == (2.0, 0.0)


def test_unique_dir_never_reuses(tmp_path):
    a, b = utils.unique_dir(tmp_path, "run"), utils.unique_dir(tmp_path, "run")
    assert a != b and a.is_dir() and b.is_dir()


def test_device_choice():
    assert utils.get_device("cpu").type == "cpu"
    with pytest.raises(UserError):
        utils.get_device("tpu")


def test_precision_is_a_setting_recorded_with_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert utils.compute_for(cpu, "fp32").precision == "fp32"
    assert utils.compute_for(cpu, "bf16").precision == "bf16"
    monkeypatch.setattr(utils, "_cpu_has_bf16", lambda: True)
    assert utils.compute_for(cpu, "auto").bf16
    monkeypatch.setattr(utils, "_cpu_has_bf16", lambda: False)
    assert not utils.compute_for(cpu, "auto").bf16
    described = utils.compute_for(cpu, "bf16").describe()
    assert described["precision"] == "bf16" and described["device"] == "cpu" and described["device_name"]
    with pytest.raises(UserError, match="unknown precision"):
        utils.compute_for(cpu, "fp16")
    monkeypatch.setenv(utils.PRECISION_ENV, "bf16")
    assert utils.default_precision() == "bf16"
    monkeypatch.setenv(utils.PRECISION_ENV, "half")
    with pytest.raises(UserError, match="SALUN_PRECISION"):
        utils.default_precision()


def test_check_writable_creates_nothing_and_names_the_folder(tmp_path):
    utils.check_writable(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        utils.check_writable(tmp_path / "file" / "out", "--out")
    with pytest.raises(UserError, match="--save-dir /proc/salun.* is not writable"):
        utils.check_writable("/proc/salun", "--save-dir")  # not even root may create files there


def test_intervals_by_hand():
    assert utils.in_interval(0.5, "(0, 1)") and not utils.in_interval(0, "(0, 1)") and not utils.in_interval(1, "(0, 1)")
    assert utils.in_interval(1, "(0, 1]") and utils.in_interval(0, "[0, 1)") and not utils.in_interval(1.5, "[0, 1]")
    assert utils.in_interval(10**9, "[1, inf)") and not utils.in_interval(0, "[1, inf)")


def test_settings_are_checked_from_their_fields():
    from dataclasses import dataclass

    @dataclass
    class S:
        rate: float = utils.setting(0.5, "a rate", "(0, 1)")
        k: int = utils.setting(2, "a count", "[1, inf)")
        name: str = utils.setting(None, "optional text")
        flag: bool = utils.setting(False, "a switch")

    assert utils.settings_problems(S, {"rate": 0.2, "k": 3, "name": None, "flag": True}) == {}
    assert utils.settings_problems(S, {"rate": 1, "k": 2.0, "flag": 1, "kk": 1, "name": 3}) == {
        "rate": "1 outside (0, 1)", "k": "expected int, got 2.0", "flag": "expected bool, got 1",
        "kk": "unknown key 'kk' (known: rate, k, name, flag)", "name": 'expected str, got 3'}
    assert utils.settings_problems(S, {"rate": float("nan")}) == {"rate": "must be a finite number, got NaN"}
    assert utils.settings_problems(S, {"k": True}) == {"k": "expected int, got true"}  # a bool is not a count
    f = {f.name: f for f in __import__("dataclasses").fields(S)}
    assert utils.describe_setting(f["rate"]) == "float in (0, 1), default 0.5: a rate"
    assert utils.describe_setting(f["name"]) == "str: optional text"


def test_reason_keeps_a_message_whole_or_cuts_it_at_a_word():
    assert utils.reason(ValueError("short\nsecond line")) == "short"
    assert utils.reason(KeyError()) == "KeyError"
    long = utils.reason(RuntimeError("failed finding central directory. This is an internal error " * 5), limit=60)
    assert long == "failed finding central directory. This is an internal error …"
