"""Shared pieces: errors, checkpoints, seeding, device and precision, logging.

A checkpoint is one `.pt` file, `{"state_dict": ..., "config": {...}}`, whose config
holds plain types only, so it always loads with `torch.load(weights_only=True)`.
"""
import contextlib
import glob
import json
import math
import os
import pickle
import platform
import random
import re
import socket
import sys
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


def reason(e, limit=160):
    """An exception's first line for a one-line message, shortened at a word, never mid-word."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(text) <= limit:
        return text
    return text[:text.rfind(" ", 0, limit)].rstrip(" ,;:") + " …"


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
                             f"on CUDA and on CPUs with native bf16, fp32 elsewhere. None: "
                             f"${PRECISION_ENV}, else auto")


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


def parse_noting_changes(parser, argv=None):
    """The parsed arguments, with `changed`: the flags whose value is not their default, by
    their first spelling (what --resume checks against the saved run)."""
    args = parser.parse_args(argv)
    args.changed = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default]
    return args


def changed_on_resume(args, may_change, saved):
    """The flags given with --resume that would change the saved run (an unchanged --precision
    is no change)."""
    return [f for f in args.changed if f not in may_change and not
            (f == "--precision" and args.precision == saved.get("precision"))]


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


# ---------------------------------------------------------------- settings

def setting(default, doc, interval=None, flags=(), deviation=False, search=None):
    """A documented dataclass field, the one place a setting is defined: its type is the
    field's annotation, `interval` ("(0, 1]", "[1, inf)") bounds a number, `flags` are
    its command-line spellings, `deviation` marks a switch away from the published method
    (off by default; the fidelity table lists it), `search` is the range tune.py searches
    by default, (low, high) or (low, high, "log"). A default of None means "not given"; a
    dict default is copied per instance."""
    meta = {"doc": doc, "interval": interval, "flags": tuple(flags), "deviation": deviation, "search": search}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def in_interval(x, interval):
    lo_bracket, lo, hi, hi_bracket = re.fullmatch(r"([\[(])(.+),(.+)([\])])", interval.replace(" ", "")).groups()
    lo, hi = float(lo), float(hi)
    return ((x > lo or (lo_bracket == "[" and x == lo)) and
            (x < hi or (hi_bracket == "]" and x == hi)))


def value_problem(f, value):
    """What is wrong with `value` for dataclass field `f` (a `setting`), or None."""
    want = f.type
    if value is None and f.default is None:
        return None
    ok = (isinstance(value, bool) if want is bool else
          isinstance(value, int) and not isinstance(value, bool) if want is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
          isinstance(value, want))
    if not ok:
        return f"expected {want.__name__}, got {json.dumps(value)}"
    if want is float and not math.isfinite(value):
        return f"must be a finite number, got {json.dumps(value)}"
    interval = f.metadata.get("interval")
    if interval and not in_interval(value, interval):
        return f"{value} outside {interval}"
    return None


def settings_problems(cls, values, what="key"):
    """{name: problem} for the unknown names, wrong types and out-of-range values among
    `values` (a dict) for settings dataclass `cls`."""
    known = {f.name: f for f in fields(cls)}
    out = {}
    for name, value in values.items():
        if name not in known:
            out[name] = f"unknown {what} {name!r} (known: {', '.join(known) or 'none'})"
        elif (problem := value_problem(known[name], value)):
            out[name] = problem
    return out


def describe_setting(f):
    """'float in (0, 1), default 0.99: the retain loss's weight' -- for -h and the README."""
    kind = f.type.__name__ + (f" in {f.metadata['interval']}" if f.metadata.get("interval") else "")
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    search = f.metadata.get("search")
    tuned = f"; tuned in [{search[0]:g}, {search[1]:g}]{' (log)' if search[2:] else ''}" if search else ""
    return f"{kind}, default {default!r}{tuned}: {f.metadata['doc']}" if default is not None else \
        f"{kind}: {f.metadata['doc']}"


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
        raise UserError(f"checkpoint {path} not found" if not path.exists() else f"checkpoint {path} is not a file")
    problem = not_a_checkpoint(path)
    if problem:
        raise UserError(f"{path} is not a checkpoint ({problem})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(f"checkpoint {path} refused: it holds objects other than tensors and "
                            f"plain values, and loading it could run code") from None
        raise UserError(f"checkpoint {path} is corrupted: torch cannot read its contents") from None
    except Exception as e:
        size = path.stat().st_size
        if "central directory" in str(e) or "file read failed" in str(e) or isinstance(e, EOFError):
            raise UserError(f"checkpoint {path} is truncated at byte {size}: it was cut off while being "
                            f"written or copied") from None
        raise UserError(f"checkpoint {path} is corrupted ({size} bytes): torch cannot read it "
                        f"({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
            and isinstance(ckpt.get("config"), dict)):
        raise UserError(f"{path} is not a SalUn DeepDive checkpoint (needs state_dict and config)")
    return ckpt


def not_a_checkpoint(path):
    """Why the file cannot be one of torch's checkpoints (a zip archive), or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK"):
        return None
    if not head:
        return "it is empty"
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "it is not a zip archive, the format torch saves in"


# ---------------------------------------------------------------- saliency masks on disk

def pack_bits(keep):
    """A bool tensor as uint8, eight entries per byte (most significant bit first)."""
    flat = keep.detach().flatten().cpu().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed, shape):
    n = math.prod(shape)
    bits = (packed.unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
    return bits.flatten()[:n].bool().view(shape)


def save_mask(path, keep, config):
    """A saliency mask ({parameter: bool tensor}) at one bit per weight."""
    shapes = {k: list(v.shape) for k, v in keep.items()}
    save_checkpoint(path, {k: pack_bits(v) for k, v in keep.items()}, dict(config, packed_shapes=shapes))


def load_mask(path):
    """(keep, config) of a mask written by save_mask, or of an older one stored as bool tensors."""
    ckpt = load_checkpoint(path)
    state, config = ckpt["state_dict"], ckpt["config"]
    shapes = config.get("packed_shapes")
    if shapes is not None and shapes.keys() == state.keys() and all(t.dtype == torch.uint8 for t in state.values()):
        keep = {k: unpack_bits(t, shapes[k]) for k, t in state.items()}
    else:
        keep = state
    if not keep or any(t.dtype != torch.bool for t in keep.values()):
        raise UserError(f"{path} is not a saliency mask (it holds model weights, not one bit per weight)")
    return keep, config


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
            _say(f"wandb unavailable ({reason(e)}); "
                 f"results are still written to files")
            return None

    def log(self, data, step=None):
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
