"""Models by timm name, adapted to small images, and model checkpoints.

    model, stem = create_model("resnet18", num_classes=10, in_chans=1, img_size=8)
    model, config = load_model("checkpoints/resnet18_digits_base.pt", device)
"""
import functools
import os
import socket

import torch
import torch.nn.functional as F

from utils import UserError, load_checkpoint, reason

def _hub_reachable(timeout=1.5):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_name(name):
    import timm
    if not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
        raise UserError(f"unknown model {name!r}; {hint} (e.g. resnet18, resnet50, vit_tiny_patch16_224)")


def create_model(name, num_classes, in_chans, img_size, pretrained=False):
    """A timm model by name, adapted to small images (see adapt_to_small_images)."""
    check_model_name(name)
    if pretrained:
        if os.environ.get("HF_HUB_OFFLINE") != "1" and not _hub_reachable():
            # Without this, the hub client retries for most of a minute before giving up.
            os.environ["HF_HUB_OFFLINE"] = "1"
            import huggingface_hub.constants
            huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            model = _build(name, True, num_classes, in_chans, img_size)
        except Exception as e:
            raise UserError(f"pretrained weights for {name} are not available offline and not cached "
                            f"({reason(e)}); train without --pretrained") from None
    else:
        model = _build(name, False, num_classes, in_chans, img_size)
    stem = adapt_to_small_images(model, img_size)
    for m in model.modules():
        if type(m) is torch.nn.Conv2d:  # same parameters and state_dict, see TrimmedConv2d
            m.__class__ = TrimmedConv2d
    try:  # a family whose downsampling outruns a small image fails here, not mid-training
        with torch.no_grad():
            model.eval()(torch.zeros(2, in_chans, img_size, img_size))
    except RuntimeError as e:
        raise UserError(f"model {name} cannot take {img_size}x{img_size} images "
                        f"({reason(e)}); try a ResNet or ViT") from None
    return model.train(), stem


def _build(name, pretrained, num_classes, in_chans, img_size):
    import timm
    kwargs = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    if img_size <= 64:
        # ViT-like models take the image size, and a patch that divides it into >= 7x7 tokens
        patch = max(d for d in range(1, img_size + 1) if img_size % d == 0 and d <= max(1, img_size // 7))
        try:
            return timm.create_model(name, img_size=img_size, patch_size=patch, **kwargs)
        except TypeError:  # the family has no such arguments (e.g. ResNets)
            pass
    return timm.create_model(name, **kwargs)


def adapt_to_small_images(model, img_size):
    """Keep a small image from being shrunk to nothing by an ImageNet stem.

    Rule: for images <= 64 px, a ResNet-like model (a `conv1` and a `maxpool`) gets a
    3x3 stride-1 first conv and no max-pool, as in the CIFAR literature (a deep stem
    keeps its 3x3 convs with the first stride set to 1). ViT-like
    models were already built for the image size (img_size, a patch giving >= 7x7 tokens).
    Other families are used as timm builds them; create_model rejects one that cannot
    take the image size. Returns what was done, for the config.
    """
    if img_size > 64:
        return "none"
    conv = getattr(model, "conv1", None)
    if isinstance(conv, torch.nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
        return "resnet_3x3"
    if isinstance(conv, torch.nn.Sequential) and hasattr(model, "maxpool"):
        # deep stems (resnet-d, -t): already 3x3 convs; the first one just stops striding
        first = next(m for m in conv if isinstance(m, torch.nn.Conv2d))
        first.stride = (1, 1)
        model.maxpool = torch.nn.Identity()
        return "resnet_deep_stride1"
    if hasattr(model, "patch_embed"):
        return "vit_img_size"
    return "none"


def output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@functools.lru_cache(maxsize=None)
def trim_plan(sizes, kernels, strides, paddings, dilations):
    """For a convolution over a map of `sizes`: the kernel slices and the padding that
    leave out the taps which only ever meet zero padding; None when every tap is used."""
    slices, pads = [], []
    for n, k, s, p, d in zip(sizes, kernels, strides, paddings, dilations):
        outputs = range(output_size(n, k, s, p, d))
        used = [i for i in range(k) if any(0 <= o * s - p + i * d < n for o in outputs)]
        if not used:
            return None
        first, last = used[0], used[-1]
        pad = p - first * d
        if pad < 0 or output_size(n, last - first + 1, s, pad, d) != len(outputs):
            return None
        slices.append(slice(first, last + 1))
        pads.append(pad)
    if all(sl == slice(0, k) for sl, k in zip(slices, kernels)):
        return None
    return tuple(slices), tuple(pads)


class TrimmedConv2d(torch.nn.Conv2d):
    """A Conv2d that leaves out the kernel taps which only ever multiply zero padding.

    On small maps most of a kernel can be such taps: on 8x8 digits ResNet-18's last stage
    sees a 1x1 map, where only the centre of each 3x3 kernel meets the input. The CPU
    convolution library still computes the whole weight gradient there, about 15x the
    cost of the forward pass and 40% of a training step. Convolving with the used taps
    alone gives the same outputs and gradients (the left-out taps' gradient is zero, as
    it was); the parameters and state_dict are those of the Conv2d.
    """

    def _conv_forward(self, x, weight, bias):
        plan = None
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            plan = trim_plan(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.padding,
                             self.dilation)
        if plan is None:
            return super()._conv_forward(x, weight, bias)
        (rows, cols), padding = plan
        return F.conv2d(x, weight[:, :, rows, cols], bias, self.stride, padding, self.dilation,
                        self.groups)


def model_from_config(config, device):
    model, _ = create_model(config["model"], config["num_classes"], config["in_chans"],
                            config["img_size"])
    return model.to(device)


# Format 2: the validation set is drawn from the whole training set before any forget
# set, so a base model and its gold standard share it. Format-1 checkpoints drew it after
# the forget set: their gold standards trained on the base model's validation samples.
CHECKPOINT_FORMAT = 2


def load_model_checkpoint(path):
    """A model checkpoint of the current format (a mask or an older model is refused)."""
    ckpt = load_checkpoint(path)
    version = ckpt["config"].get("format", 1)
    if version != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has the old split format {version} (its validation set "
                        f"depends on its forget set); retrain it with train.py")
    return ckpt


def load_model(path, device, models=None):
    """(model with the checkpoint's weights, the checkpoint's config).

    `models`, a dict, keeps one built model per architecture, into which each checkpoint
    is loaded in turn (building a model costs more than loading its weights); the model
    returned then holds the last checkpoint's weights only until the next load.
    """
    ckpt = load_model_checkpoint(path)
    cfg = ckpt["config"]
    arch = (cfg["model"], cfg["num_classes"], cfg["in_chans"], cfg["img_size"])
    models = {} if models is None else models
    if arch not in models:
        models[arch] = model_from_config(cfg, device)
    model = models[arch]
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path}: weights do not fit {ckpt['config']['model']} "
                        f"({reason(e)})") from None
    return model, ckpt["config"]
