"""What an unlearning experiment is: its keys, their checks and resolution, its name, its flags.

    experiments.resolve(json.loads(Path("exp/demo.json").read_text()), "exp/demo.json", "data")
    experiments.experiment_names(experiments)      # ["00_rl_split_class-0", ...]
    experiments.add_experiment_flags(parser)       # -c, -CF, -M, -MA, ...: one flag per field

An experiment is one entry of an experiment file (main.py's and audit.py's -L), or the
same keys given as flags. The `Experiment` fields are the one source of its keys: their
types, ranges, flags, help and defaults. `resolve` checks a whole list against its
checkpoints and data before anything is computed and names every problem at once. Every
script that takes experiments (main.py, audit.py) reads them through this module.
"""
import argparse
import json
import re
import textwrap
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import datasets
from datasets import ForgetSpec
from methods import METHODS
from models import load_model_checkpoint
from utils import UserError, setting, settings_problems


@dataclass
class Experiment:
    """One unlearning experiment: every key of an experiment file, its type, range, flags and help."""
    checkpoint: str = setting("checkpoints/resnet18_cifar10_base.pt", "the model to unlearn from (train.py's "
                              "checkpoint)", flags=("-c", "--checkpoint"))
    class_to_forget: int = setting(None, "forget every training sample of this class",
                                   flags=("-CF", "--cf", "--class-to-forget"))
    unlearning_rate: float = setting(None, "forget a random fraction of the training set, drawn once from `seed`",
                                     "(0, 1)", flags=("-UL", "--unlr", "--unlearning-rate"))
    idxs_to_forget: str = setting(None, "forget the training indices listed in this JSON file",
                                  flags=("-IF", "--itf", "--idxs-to-forget"))
    use_mask: bool = setting(False, "update only the salient weights (SalUn's mask)", flags=("-UM", "--use-mask"))
    mask_thr: float = setting(0.5, "fraction of all weights the mask keeps", "(0, 1]", flags=("-MT", "--mask-thr"))
    lr: float = setting(0.1, "learning rate of the method's optimizer (SGD with momentum 0.9, weight decay 5e-4; "
                                 "Adam for bad_teacher)", "(0, inf)", flags=("-LR", "--lr"), search=(1e-4, 1.0, "log"))
    epochs: int = setting(10, "unlearning epochs", "[1, inf)", flags=("-E", "--epochs"), search=(1, 10))
    method: str = setting("rl_split", "the unlearning method: " + ", ".join(METHODS), flags=("-M", "--method"))
    method_args: dict = setting({}, "the method's own settings (python methods.py lists them)",
                                flags=("-MA", "--method-arg"))
    tag: str = setting(None, "a name for the experiment (default: built from method, mask and forget set)",
                       flags=("-T", "--tag"))
    retrained: str = setting(None, "gold-standard checkpoint trained without the same forget set, for the gap",
                             flags=("-R", "--retrained"))
    seed: int = setting(0, "first run's seed; run k uses seed + k", flags=("--seed",))
    forget_seed: int = setting(None, "the seed a random forget set (-UL) is drawn from, when it is not `seed` (a "
                                     "study reported on fresh seeds keeps the forget set it was tuned on)",
                               flags=("--forget-seed",))
    batch_size: int = setting(64, "samples per step", "[1, inf)", flags=("--batch-size",))
    freeze_bn: bool = setting(False, "keep BatchNorm running statistics as they were (BatchNorm in eval mode while "
                                     "unlearning); by default they move, as in SalUn's code, mask or not",
                              flags=("--freeze-bn",))

    @property
    def spec(self):
        return ForgetSpec(self.class_to_forget, self.unlearning_rate, self.idxs_to_forget)

    @property
    def split_seed(self):
        """The seed the forget set is drawn from (the runs draw from seed + k)."""
        return self.seed if self.forget_seed is None else self.forget_seed


KEYS = {f.name: f for f in fields(Experiment)}
FORGET_KEYS = ("class_to_forget", "unlearning_rate", "idxs_to_forget")


# ---------------------------------------------------------------- reading and checking experiments

def method_problems(e):
    """The method must be known and its `method_args` fit its settings."""
    if e.method not in METHODS:
        return [("method", f"unknown method {e.method!r}; known: {', '.join(METHODS)}")]
    settings = fields(METHODS[e.method].settings)
    known = ", ".join(f.name for f in settings) or "none"
    return [(f"method_args: {name}", f"{e.method} has no setting {name!r} (its settings: {known})"
             if problem.startswith("unknown") else f"{e.method}: {problem}")
            for name, problem in settings_problems(METHODS[e.method].settings, e.method_args).items()]


class Checker:
    """Checks experiments against their checkpoints and data; caches what it loads."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self.configs, self.labels = {}, {}

    def config(self, path):
        if path not in self.configs:
            self.configs[path] = load_model_checkpoint(path)["config"]
        return self.configs[path]

    def train_labels(self, name):
        if name not in self.labels:
            self.labels[name] = datasets.load_dataset(name, self.data_dir).y_train
        return self.labels[name]

    def problems(self, e):
        out = []
        given = [k for k, v in e.spec.to_config().items() if v is not None]
        if len(given) != 1:
            out.append(("forget spec", f"give exactly one of {', '.join(FORGET_KEYS)} "
                                       f"(got {', '.join(given) or 'none'})"))
        try:
            cfg = self.config(e.checkpoint)
        except UserError as err:
            return out + [("checkpoint", str(err) + missing_checkpoint_hint(e.checkpoint))]
        if out:
            return out
        out = e.spec.problems(cfg["num_classes"])
        if out:
            return out
        labels = self.train_labels(cfg["dataset"])
        try:
            forget = datasets.forget_indices(e.spec, labels, e.split_seed,
                                             datasets.as_flags(cfg["val_idx"], len(labels)))
        except UserError as err:
            return [("idxs_to_forget", str(err))]
        if e.retrained is not None:
            out += self.gold_problems(e, cfg, forget)
        return out

    def gold_problems(self, e, cfg, forget):
        try:
            gold = self.config(e.retrained)
        except UserError as err:
            return [("retrained", str(err) + missing_checkpoint_hint(e.retrained))]
        if gold["dataset"] != cfg["dataset"]:
            return [("retrained", f"{e.retrained} was trained on {gold['dataset']}, "
                                  f"the checkpoint on {cfg['dataset']}")]
        if gold["val_idx"] != cfg["val_idx"]:
            return [("retrained", f"{e.retrained} holds out another validation set than {e.checkpoint} "
                                  f"(seeds {gold['seed']} and {cfg['seed']}); train both with one --seed")]
        if gold["forget_idx"] != forget.tolist():
            return [("retrained", f"{e.retrained} was retrained without {len(gold['forget_idx'])} samples, "
                                  f"not the {len(forget)} this experiment forgets ({e.spec.describe()})")]
        return []


def train_command(path):
    """The train.py command that writes checkpoint `path`, read from its name
    (<model>_<dataset>_<base | cf<c> | rf<r> | itf_<stem>>.pt), or None."""
    path = Path(path)
    found = re.fullmatch(rf"(.+)_({'|'.join(datasets.DATASETS)})_(base|cf\d+|rf[0-9.]+|itf_.+)", path.stem)
    if not found:
        return None
    model, dataset, comment = found.groups()
    flags = {"b": "", "c": f" --cf {comment[2:]}", "r": f" --unlr {comment[2:]}",
             "i": f" --itf {path.parent / comment[4:]}_forget.json"}[comment[0]]
    folder = "" if path.parent == Path("checkpoints") else f" --save-dir {path.parent}"
    return f"python train.py --model {model} --dataset {dataset}{flags}{folder}"


def missing_checkpoint_hint(path):
    command = train_command(path)
    return f"; train.py makes it: {command}" if command and not Path(path).exists() else ""


def flag_names(key):
    """'-c/--checkpoint' for an Experiment key (and 'method_args: x' for one of its parts):
    how the command line spells it."""
    head, _, rest = key.partition(": ")
    flags = KEYS[head].metadata.get("flags") if head in KEYS else None
    name = "/".join(flags[:2]) if flags else head
    return f"{name}: {rest}" if rest else name


def span(indices):
    """'experiment 3', 'experiments 0-19' or 'experiments 0, 2, 5'."""
    if len(indices) == 1:
        return f"experiment {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"experiments {indices[0]}-{indices[-1]}"
    return "experiments " + ", ".join(map(str, indices))


def problem_lines(problems, where):
    """One line per distinct problem, naming every experiment that has it; on the command
    line, keys are named by their flags."""
    grouped = {}
    for i, key, msg in problems:
        grouped.setdefault((key, msg), []).append(i)
    lines = []
    for (key, msg), indices in grouped.items():
        label = key
        if where == "command line":  # keys as the flags the user typed, also inside the message
            label = "" if key == "forget spec" else flag_names(key)
            msg = re.sub(r"\b(" + "|".join(k for k in KEYS if "_" in k) + r")\b", lambda m: flag_names(m[1]), msg)
        text = f"{label}: {msg}" if label and not msg.startswith(key.split(": ")[0] + " ") else msg
        lines.append(f"{where}: {text}" if where == "command line" else f"{where}: {span(indices)}: {text}")
    return lines


def resolve(entries, where, data_dir):
    """Experiments from raw dicts (file values with the command line's on top); every problem at once."""
    if not isinstance(entries, list) or not entries or not all(isinstance(x, dict) for x in entries):
        raise UserError(f"{where}: expected a non-empty list of experiment objects")
    problems, experiments, checker = [], [], Checker(data_dir)
    for i, entry in enumerate(entries):
        bad = settings_problems(Experiment, entry)
        problems += [(i, k if k in KEYS else "", msg) for k, msg in bad.items()]
        # The rest of the experiment is still checked, with defaults in place of the bad values;
        # what depends on a bad checkpoint or forget key is not (it would only repeat the problem).
        e = Experiment(**{k: v for k, v in entry.items() if k not in bad})
        local = method_problems(e) if not {"method", "method_args"} & set(bad) else []
        if not set(bad) & {"checkpoint", "retrained", "seed", *FORGET_KEYS}:
            local += checker.problems(e)
        problems += [(i, key, msg) for key, msg in local]
        experiments.append(e)
    if problems:
        raise UserError("\n".join(problem_lines(problems, where)))
    return experiments


def method_settings(e):
    """The method's settings with their defaults filled in: {name: value}."""
    return asdict(METHODS[e.method].settings(**e.method_args))


VARYING = (("lr", "lr"), ("epochs", "E"), ("batch_size", "bs"), ("seed", "seed"))  # key, short name


def experiment_names(experiments):
    """'<index>_<method>[_mask<thr>]_<forget set>', then whatever else differs between the
    experiments of the list (lr, epochs, batch size, method settings, seed, checkpoint), so
    that every row of a sweep says what it is; a `tag` replaces all but the index."""
    varying = [(k, short) for k, short in VARYING if len({getattr(e, k) for e in experiments}) > 1]
    given = [{(k, json.dumps(v)) for k, v in e.method_args.items()} for e in experiments]
    common = set.intersection(*given) if given else set()
    many_checkpoints = len({e.checkpoint for e in experiments}) > 1
    names = []
    for i, (e, args) in enumerate(zip(experiments, given)):
        parts = [e.method + (f"_mask{e.mask_thr:g}" if e.use_mask else "") + ("_bnfrozen" if e.freeze_bn else ""),
                 e.spec.describe()]
        parts += [f"{short}{getattr(e, k):g}" for k, short in varying]
        parts += [f"{k}{json.loads(v)}" for k, v in sorted(args - common)]
        if many_checkpoints:
            parts.append(Path(e.checkpoint).stem)
        names.append(f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_.+-]+", "-", e.tag or "_".join(parts)))
    return names


# ---------------------------------------------------------------- experiments on the command line

def method_arg(text):
    """-MA name=value: the value read as JSON when it is JSON (0.9, 3, true), else as text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_experiment_flags(p):
    """One flag per Experiment key, its help and default taken from the field. Flags are
    None unless given, so that only what the user typed overrides the file."""
    g = p.add_argument_group("experiment (each overrides the same key of every experiment in -L)")
    for f in fields(Experiment):
        default = f.default_factory() if f.type is dict else f.default
        notes = ([f"in {f.metadata['interval']}"] if f.metadata["interval"] else []) + \
            ([f"default: {default}"] if default not in (None, {}) else []) + (["repeatable"] if f.type is dict else [])
        kw = dict(dest=f.name, default=None, help=f.metadata["doc"] + (f" ({'; '.join(notes)})" if notes else ""))
        if f.type is bool:
            g.add_argument(*f.metadata["flags"], action="store_true", **kw)
        elif f.type is dict:
            g.add_argument(*f.metadata["flags"], action="append", type=method_arg, metavar="NAME=VALUE", **kw)
        else:
            g.add_argument(*f.metadata["flags"], type=f.type, metavar=f.type.__name__.upper(), **kw)


def methods_help():
    lines = ["methods (-M) and their settings (-MA name=value, or method_args in a file):"]
    for name, m in METHODS.items():
        settings = ", ".join(f"{f.name}={f.default}" for f in fields(m.settings)) or "no settings"
        lines += textwrap.wrap(f"{name}: {m.summary} [{settings}]", 100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines + ["python methods.py prints the table of methods, papers and settings."])


def overrides(args):
    """The experiment keys given on the command line."""
    given = {f.name: getattr(args, f.name) for f in fields(Experiment) if getattr(args, f.name) is not None}
    if "method_args" in given:
        given["method_args"] = dict(given["method_args"])
    return given


def with_overrides(entry, given):
    """An experiment of the file with the command line's keys on top; -MA settings are
    added to the file's method_args rather than replacing them."""
    out = {**entry, **given}
    if "method_args" in given and isinstance(entry.get("method_args"), dict):
        out["method_args"] = {**entry["method_args"], **given["method_args"]}
    return out


def load_list(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"experiment file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def from_args(args):
    """(entries, where): the experiments of -L with the keys typed on the command line on top
    of each one, or the one experiment that the command line gives."""
    given = overrides(args)
    if not args.load:
        return [given], "command line"
    entries = load_list(args.load)
    if isinstance(entries, list):
        entries = [with_overrides(x, given) if isinstance(x, dict) else x for x in entries]
    return entries, args.load
