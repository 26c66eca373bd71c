"""Shared pieces: errors, models by timm name, checkpoints, seeding, device, logging.

A checkpoint is one `.pt` file, `{"state_dict": ..., "config": {...}}`, whose config
holds plain types only, so it always loads with `torch.load(weights_only=True)`.
"""
import contextlib
import functools
import glob
import math
import os
import pickle
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


def cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        for line in str(e).splitlines():  # one line per problem
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name=None):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but no CUDA GPU is available")
    return device


def make_generator(seed, device):
    """A generator on the data's device: shuffling and augmentation draw from it alone."""
    return torch.Generator(device=device).manual_seed(seed)


PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "SALUN_PRECISION"  # the default of every --precision flag (the tests force bf16 with it)


@dataclass
class Compute:
    """Where and how training tensors are computed: device, bf16 autocast, channels_last.

    Only training and unlearning steps use autocast; evaluation and the mask's gradients
    always run in fp32 (see `metrics.predict`), so a checkpoint's numbers do not depend on
    the machine that evaluates it.
    """
    device: torch.device
    bf16: bool
    channels_last: bool

    @property
    def precision(self):
        return "bf16" if self.bf16 else "fp32"

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self):
        return {"precision": self.precision, "device": self.device.type, "device_name": device_name(self.device)}


def _cpu_flags_and_model():
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.lower().startswith(("model name", "hardware", "cpu model"))), "")
    return info, model or platform.processor() or platform.machine()


def _cpu_has_bf16():
    flags, _ = _cpu_flags_and_model()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_name(device):
    """The GPU's name, or the CPU model with its number of cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_flags_and_model()[1]} ({os.cpu_count()} cores)"


def default_precision():
    value = os.environ.get(PRECISION_ENV, "auto")
    if value not in PRECISIONS:
        raise UserError(f"{PRECISION_ENV}={value!r}: use one of {', '.join(PRECISIONS)}")
    return value


def add_precision_flag(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help=f"training precision; evaluation and the mask always run in fp32. auto: bf16 "
                             f"on CUDA and on CPUs with native bf16, fp32 elsewhere (default: "
                             f"${PRECISION_ENV}, else auto)")


def compute_for(device, precision="auto"):
    """The fast path for this device: measured on a 2-core CPU without bf16 units, bf16
    autocast trains ResNet-18 15x slower and channels_last 1.2x faster, so `auto` uses
    bf16 only on CUDA and on CPUs with native bf16; channels_last always."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_bf16()
    else:
        bf16 = precision == "bf16"
    return Compute(device, bf16, True)


def announce_compute(compute, asked):
    """The one line every training script prints at start: what it computes in, and where."""
    why = " (auto)" if asked == "auto" else ""
    print(f"precision: {compute.precision}{why} for training, fp32 for evaluation and the mask; "
          f"device: {compute.device.type}, {device_name(compute.device)}", flush=True)


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value); NaNs are skipped."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


# ---------------------------------------------------------------- models

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
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise UserError(f"pretrained weights for {name} are not available offline and not cached "
                            f"({reason}); train without --pretrained") from None
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
                        f"({str(e).splitlines()[0][:100]}); try a ResNet or ViT") from None
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
                        f"({str(e).splitlines()[0][:120]})") from None
    return model, ckpt["config"]


# ---------------------------------------------------------------- files and checkpoints

def atomic_write(path, write, mode="wb"):
    """Write through a temporary file in the same folder, then rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path):
    """Remove the temporaries of `path` that a killed writer left behind (`.name.PID.tmp`
    whose process is gone); a live writer's temporary is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode="w")


PLAIN = (str, int, float, bool, type(None))


def check_plain(obj, where="config"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, PLAIN):
        raise TypeError(f"{where} holds a {type(obj).__name__}; checkpoint configs take plain types only")


def save_checkpoint(path, state_dict, config):
    check_plain(config)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda f: torch.save({"state_dict": state, "config": config}, f))


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(f"checkpoint {path} refused: it holds objects other than tensors and "
                            f"plain values, and loading it could run code") from None
        # torch's own text starts with advice to switch the safe loader off; keep only the reason
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:100]
        raise UserError(f"checkpoint {path} is truncated or corrupted ({reason})") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is truncated or corrupted "
                        f"({str(e).splitlines()[0][:100] or type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
            and isinstance(ckpt.get("config"), dict)):
        raise UserError(f"{path} is not a SalUn DeepDive checkpoint (needs state_dict and config)")
    return ckpt


def check_writable(folder, what="output folder"):
    """Make sure files can be written in `folder` (or, when it does not exist yet, in the
    folder it would be created in), before any compute. A probe file is created and removed
    (permission bits do not stop root, a read-only mount does), so nothing is left behind."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        probe = existing / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {folder} is not writable ({e.strerror or type(e).__name__} in {existing})") from None


def unique_dir(parent, name):
    """parent/name, or parent/name-2, -3, ... : a run folder is never reused by accident."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path, k = parent / name, 2
    while True:
        try:  # mkdir, not exists(): two runs started in the same second must not share a folder
            path.mkdir()
            return path
        except FileExistsError:
            path, k = parent / f"{name}-{k}", k + 1


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- logging

def _wandb_reachable(timeout=2.0):
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_mode():
    """(mode, why) decided once per process: online only with a key and a reachable server."""
    from dotenv import find_dotenv, load_dotenv
    # usecwd: the .env of the working directory, not of the folder this file lives in
    load_dotenv(find_dotenv(usecwd=True), override=False)
    key = os.environ.get("WANDB_SECRET") or os.environ.get("WANDB_API_KEY")
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if not key:
        return "offline", "no API key (set WANDB_SECRET in .env)"
    if not _wandb_reachable():
        return "offline", "server not reachable"
    os.environ["WANDB_API_KEY"] = key
    return "online", None


def _say(line):
    """One line on stderr, on its own line even while a tqdm bar is drawn."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


class Logger:
    """wandb when asked for and reachable, offline wandb otherwise; never a prompt or a hang."""

    mode = None  # decided by the first logger of the process, announced once

    def __init__(self, enabled, project, name, config):
        self.run = None
        if enabled:
            self.run = self._start(project, name, config)

    @classmethod
    def _start(cls, project, name, config):
        try:
            if cls.mode is None:
                cls.mode, why = wandb_mode()
                if why:
                    _say(f"wandb: logging {cls.mode} ({why}); use -NL to turn it off")
            if cls.mode == "disabled":
                return None
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            return wandb.init(project=project, name=name, config=config, mode=cls.mode,
                              settings=wandb.Settings(init_timeout=30, silent=True))
        except Exception as e:  # logging must never stop an experiment
            cls.mode = "disabled"
            _say(f"wandb unavailable ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}); "
                 f"results are still written to files")
            return None

    def log(self, data, step=None):
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
