"""models.py: timm models by name, adapted to small images; model checkpoints."""
import time

import pytest
import timm
import torch

import models
from models import create_model
from utils import UserError, save_checkpoint


@pytest.mark.parametrize("size, chans", [(8, 1), (28, 1), (32, 3)])
def test_small_image_stem_keeps_resolution(size, chans):
    model, stem = create_model("resnet18", 10, chans, size)
    assert stem == "resnet_3x3"
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    x = torch.zeros(2, chans, size, size)
    assert model.eval()(x).shape == (2, 10)
    # layer1 sees the full image: nothing was shrunk by the stem
    assert model.layer1(model.act1(model.bn1(model.conv1(x)))).shape[-1] == size


def test_large_images_keep_the_imagenet_stem():
    model, stem = create_model("resnet18", 10, 3, 96)
    assert stem == "none" and model.conv1.stride == (2, 2)


def test_vit_is_built_for_the_image_size():
    model, stem = create_model("test_vit", 10, 1, 28)
    assert stem == "vit_img_size" and model.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_unknown_model_lists_close_names():
    with pytest.raises(UserError, match="resnet18"):
        create_model("resnet18x", 10, 3, 32)


def test_pretrained_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=1.5: False)
    start = time.time()
    with pytest.raises(UserError, match="pretrained weights"):
        create_model("resnet18", 10, 3, 32, pretrained=True)
    assert time.time() - start < 2


CONV_SHAPES = [(size, k, s, p, d) for size in (1, 2, 3, 5) for k in (1, 2, 3, 5) for s in (1, 2)
               for p in (0, 1, 2) for d in (1, 2) if size + 2 * p - d * (k - 1) - 1 >= 0]


def test_trimmed_conv_matches_conv2d_outputs_and_gradients():
    torch.manual_seed(0)
    trimmed = 0
    for size, k, s, p, d in CONV_SHAPES:
        ref = torch.nn.Conv2d(3, 4, k, s, p, d).double()
        conv = torch.nn.Conv2d(3, 4, k, s, p, d).double()
        conv.load_state_dict(ref.state_dict())
        conv.__class__ = models.TrimmedConv2d
        x = torch.randn(2, 3, size, size + 1, dtype=torch.double)  # rows and columns differ
        x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ref(x_ref), conv(x_new)
        g = torch.randn_like(a)
        a.backward(g)
        b.backward(g)
        where = (size, k, s, p, d)
        assert a.shape == b.shape and torch.allclose(a, b), where
        assert torch.allclose(ref.weight.grad, conv.weight.grad), where
        assert torch.allclose(ref.bias.grad, conv.bias.grad) and torch.allclose(x_ref.grad, x_new.grad), where
        trimmed += models.trim_plan((size, size + 1), (k, k), (s, s), (p, p), (d, d)) is not None
    assert trimmed >= 10  # the grid exercises the trimmed path, not only the fallback


def test_resnet18_on_8x8_uses_only_the_centre_tap_in_its_last_stage():
    model, _ = create_model("resnet18", 10, 1, 8)
    plain = timm.create_model("resnet18", num_classes=10, in_chans=1)
    models.adapt_to_small_images(plain, 8)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(type(m) is models.TrimmedConv2d for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv = model.layer4[1].conv1  # 3x3, padding 1, on a 1x1 map
    assert models.trim_plan((1, 1), conv.kernel_size, conv.stride, conv.padding, conv.dilation) == (
        (slice(1, 2), slice(1, 2)), (0, 0))
    x = torch.randn(4, 1, 8, 8)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))


def test_old_split_format_is_refused_with_advice(tmp_path):
    model, _ = create_model("test_resnet", 10, 1, 8)
    save_checkpoint(tmp_path / "old.pt", model.state_dict(), {"model": "test_resnet", "val_idx": []})
    with pytest.raises(UserError, match="old split format 1.*retrain it with train.py"):
        models.load_model(tmp_path / "old.pt", torch.device("cpu"))
