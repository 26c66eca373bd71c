"""Tuning: each experiment's settings searched with Optuna on data model selection may read.

    tuner = tuning.plan(args, device)           # checked, the run folder made, nothing computed
    studies = tuning.run(tuner, compute, args)  # the trials, locally or on Ray workers
    tuning.write_outputs(tuner, studies)        # tuned.json, tuning.md, tuning.csv, tuning/<name>.png

What a search covers comes from the settings' own declarations (`utils.setting(search=...)`:
lr and epochs in experiments.py, each method's settings in methods.py, a method's own range
for lr or epochs in its registration); an experiment of the file may narrow, widen (within the
setting's interval), fix or drop any of them, and add any other numeric setting, under its
"search" key. A trial is one `unlearning.unlearn` run whose judge (`Selection`) evaluates only
the forget set, the validation set and a fixed sample of retain: never a test sample. Its
objective is the weighted mean gap to the gold standard over UA, RA, VA and val_MIA
(`metrics.selection_objective`; equal weights, as deepunlearn's; an experiment's "objective"
key sets others). A trial that fails or diverges counts as the worst value (100).

The run folder holds config.json, optuna.log (Optuna's journal: one study per experiment,
so --resume continues an interrupted tuning and a larger --trials adds trials to it), and at
the end tuned.json, ready for main.py on fresh seeds. The first trial runs the experiment's own
settings (when they lie in the searched ranges), so that a tuned experiment is never worse on
the objective than the one it started from. The sampler is TPE, drawn anew before
every trial from the experiment's seed and the number of trials before it, so a tuning is the
same on one machine whether or not it was interrupted, and with one Ray worker as locally.
"""
import csv
import io
import json
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

import metrics
import plots
from executors import EXECUTOR_FLAGS, CachingWorker, Workers, start_ray, worker_init
from experiments import FORGET_KEYS, KEYS, Experiment, experiment_names, from_args, overrides, problem_lines, resolve
from methods import METHODS
from models import load_model
from unlearning import prepare, unlearn
from utils import (Logger, UserError, atomic_write_text, changed_on_resume, check_writable, compute_for,
                   default_precision, device_name, in_interval, timestamp, unique_dir, value_problem)

WORST = 100.0  # a trial that failed or diverged: every gap is at most 100 points
DEFAULT_WEIGHTS = {k: 1.0 for k in metrics.SELECTION_KEYS}
RETAIN_SAMPLE = 1000  # retain samples a trial evaluates
TUNABLE_KEYS = ("lr", "epochs", "batch_size", "mask_thr")  # the experiment keys a search may cover
PRUNE_STARTUP = 5  # Optuna's MedianPruner judges a trial only once this many trials have completed
FILE_KEYS = ("search", "objective")  # keys of a tuning file's experiment that main.py does not take


# ---------------------------------------------------------------- what a search covers

@dataclass
class Dim:
    """One searched setting: `key` is an experiment key or "method_args.<name>"."""
    key: str
    low: float
    high: float
    log: bool
    integer: bool

    def distribution(self):
        import optuna
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def describe(self):
        return f"{self.key} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")


def searchable(e):
    """{name: field} of every setting a search on experiment e may cover (method settings by
    their own name), and {name: declared range or None} of those searched by default."""
    method = METHODS[e.method]
    known = {k: KEYS[k] for k in TUNABLE_KEYS}
    known.update({f.name: f for f in fields(method.settings) if f.type in (int, float)})
    declared = {k: f.metadata.get("search") for k, f in known.items()}
    declared.update({k: v for k, v in method.search.items() if k in declared})
    return known, {k: v for k, v in declared.items() if v}


def dim_problem(name, f, given, declared_log=False):
    """What is wrong with a file's range `given` for setting f (searched on a log scale when
    it says so or its declaration does), or None."""
    if not (isinstance(given, list) and len(given) in (2, 3) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in given[:2])
            and given[2:] in ([], ["log"])):
        return f"expected [low, high], [low, high, \"log\"], a fixed value or null, got {json.dumps(given)}"
    low, high = given[:2]
    if not low < high:
        return f"empty or inverted range [{low:g}, {high:g}]"
    if f.type is int and not (float(low).is_integer() and float(high).is_integer()):
        return f"{name} is an integer; got [{low:g}, {high:g}]"
    interval = f.metadata.get("interval")
    if interval and not (in_interval(low, interval) and in_interval(high, interval)):
        return f"[{low:g}, {high:g}] reaches outside {name}'s own interval {interval}"
    if (given[2:] or declared_log) and low <= 0:
        return f"{name} is searched on a log scale, which must start above 0; got [{low:g}, {high:g}]"
    return None


def search_space(e, search):
    """(dims, fixed, problems): the searched settings, the fixed ones ({key: value}), and what
    is wrong with the file's "search" object."""
    known, declared = searchable(e)
    if not isinstance(search, dict):
        return [], {}, [("search", f"expected an object of setting: range, got {json.dumps(search)}")]
    problems, ranges, fixed = [], dict(declared), {}
    for name, given in search.items():
        if name not in known:
            problems.append((f"search: {name}", f"{e.method} has no setting {name!r} to search (searchable: "
                                                f"{', '.join(known)})"))
        elif given is None:
            ranges.pop(name, None)
        elif isinstance(given, list):
            declared_log = bool(declared.get(name, ())[2:])
            problem = dim_problem(name, known[name], given, declared_log)
            if problem:
                problems.append((f"search: {name}", problem))
            else:
                ranges[name] = (given[0], given[1], "log") if given[2:] or declared_log else tuple(given)
        else:
            problem = value_problem(known[name], given)
            if problem:
                problems.append((f"search: {name}", problem))
            else:
                ranges.pop(name, None)
                fixed[key_of(e, name)] = given
    dims = [Dim(key_of(e, name), r[0], r[1], bool(r[2:]), known[name].type is int) for name, r in ranges.items()]
    return dims, fixed, problems


def value_of(e, key):
    """An experiment's value of a searched key ("lr", "method_args.alpha"), defaults filled in."""
    if "." not in key:
        return getattr(e, key)
    return asdict(METHODS[e.method].settings(**e.method_args))[key.split(".", 1)[1]]


def key_of(e, name):
    return name if name in TUNABLE_KEYS else f"method_args.{name}"


def weights_problems(weights):
    if not isinstance(weights, dict):
        return [("objective", f"expected an object of metric: weight, got {json.dumps(weights)}")]
    out = [("objective", f"unknown metric {k!r} (the objective's: {', '.join(metrics.SELECTION_KEYS)})")
           for k in weights if k not in metrics.SELECTION_KEYS]
    out += [("objective", f"the weight of {k} must be a number of at least 0, got {json.dumps(w)}")
            for k, w in weights.items() if k in metrics.SELECTION_KEYS and not (
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0)]
    if not out and not any(weights.get(k, 1.0) for k in metrics.SELECTION_KEYS):
        out.append(("objective", "every weight is 0: nothing to tune for"))
    return out


def with_params(e, params):
    """Experiment e with a trial's (or a fixed) settings: {"lr": ..., "method_args.alpha": ...}."""
    top = {k: v for k, v in params.items() if "." not in k}
    own = {k.split(".", 1)[1]: v for k, v in params.items() if "." in k}
    return replace(e, **top, method_args={**e.method_args, **own})


# ---------------------------------------------------------------- a new tuning, or an interrupted one

RESUME_MAY_CHANGE = {"--resume", "--device", "-NL", "--trials", "--report", "--report-seed", "--representations",
                     *EXECUTOR_FLAGS}


@dataclass
class Tuner:
    """A tuning's plan: its experiments, what each searches, and where it is written."""
    run_dir: Path
    experiments: list  # with the fixed settings applied
    names: list
    spaces: list  # [dims] per experiment
    weights: list  # [{metric: weight}] per experiment
    config: dict


def plan(args, device):
    """The Tuner: every experiment and search checked, the run folder made, nothing computed."""
    if args.resume:
        return resume_plan(args)
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.retain_sample < 1:
        raise UserError(f"--retain-sample must be at least 1, got {args.retain_sample}")
    if not args.load and not overrides(args).keys() & {"checkpoint", *FORGET_KEYS}:
        raise UserError("nothing to tune: give an experiment list (-L FILE), or a checkpoint (-c), what to forget "
                        "and its gold standard (-R); see python tune.py -h")
    entries, where = from_args(args)
    experiments, spaces, weights = resolve_tuning(entries, where, args.data_dir)
    check_writable(args.out, "--out")
    compute = compute_for(device, args.precision or default_precision())
    label = Path(args.load).stem if args.load else "cli"
    run_dir = unique_dir(args.out, args.name or f"{timestamp()}_{label}_tuning")
    config = {"experiments": [asdict(e) for e in experiments], "names": experiment_names(experiments),
              "search": [[asdict(d) for d in dims] for dims in spaces], "objective": weights,
              "trials": args.trials, "retain_sample": args.retain_sample, "prune": not args.no_prune,
              "data_dir": args.data_dir, "precision": compute.precision, "device_name": device_name(device),
              "run_id": uuid.uuid4().hex, "command": sys.argv}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    return Tuner(run_dir, experiments, config["names"], spaces, weights, config)


def resolve_tuning(entries, where, data_dir):
    """(experiments with their fixed settings, [dims], [weights]); every problem at once."""
    if isinstance(entries, list) and all(isinstance(x, dict) for x in entries):
        extras = [{k: x.get(k) for k in FILE_KEYS if k in x} for x in entries]
        entries = [{k: v for k, v in x.items() if k not in FILE_KEYS} for x in entries]
    else:
        extras = []
    experiments = resolve(entries, where, data_dir)  # raises on the experiments' own problems
    problems, spaces, weights, out, labels = [], [], [], [], {}
    for i, (e, extra) in enumerate(zip(experiments, extras)):
        dims, fixed, bad = search_space(e, extra.get("search", {}))
        given = extra.get("objective", {})
        bad += weights_problems(given)
        if e.retrained is None:
            bad.append(("retrained", "tuning needs the gold standard: give retrained (-R), a model trained without "
                                     "the forget set"))
        if not dims and not bad:
            bad.append(("search", f"nothing to search for {e.method} (every setting is fixed or dropped)"))
        if not bad and (given if isinstance(given, dict) else {}).get("val_MIA", 1) and e.class_to_forget is not None:
            n = forgotten_in_validation(e, data_dir, labels)
            if n < metrics.VAL_MIA_MIN:
                bad.append(("objective", f"val_MIA needs at least {metrics.VAL_MIA_MIN} validation samples of the "
                                         f"forgotten class, and this split has {n}: give it weight 0 "
                                         f"(\"objective\": {{\"val_MIA\": 0}})"))
        problems += [(i, key, msg) for key, msg in bad]
        out.append(with_params(e, fixed) if not bad else e)
        spaces.append(dims)
        weights.append({**DEFAULT_WEIGHTS, **given} if isinstance(given, dict) else dict(DEFAULT_WEIGHTS))
    if problems:
        raise UserError("\n".join(problem_lines(problems, where)))
    return out, spaces, weights


def forgotten_in_validation(e, data_dir, labels):
    """How many validation samples of the forgotten class the checkpoint's split holds."""
    import datasets
    from models import load_model_checkpoint
    cfg = load_model_checkpoint(e.checkpoint)["config"]
    if cfg["dataset"] not in labels:
        labels[cfg["dataset"]] = datasets.load_dataset(cfg["dataset"], data_dir).y_train
    return int((labels[cfg["dataset"]][torch.as_tensor(cfg["val_idx"], dtype=torch.long)] == e.class_to_forget).sum())


def resume_plan(args):
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a tuning folder (no config.json)" if run_dir.is_dir()
                        else f"tuning folder {run_dir} not found")
    saved = json.loads((run_dir / "config.json").read_text())
    if "search" not in saved:
        raise UserError(f"{run_dir} is a main.py run folder, not a tuning; resume it with main.py")
    fixed = changed_on_resume(args, RESUME_MAY_CHANGE, saved)
    if fixed:
        raise UserError(f"--resume continues {run_dir} as it was configured; {', '.join(fixed)} would change it "
                        f"(only --trials, --report, --representations, --device, -NL and the executor flags may be given)")
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    check_writable(run_dir, "tuning folder")
    experiments = resolve(saved["experiments"], run_dir / "config.json", saved["data_dir"])
    args.data_dir = saved["data_dir"]
    if "--trials" in args.changed:
        saved["trials"] = args.trials
        atomic_write_text(run_dir / "config.json", json.dumps(saved, indent=2))
    spaces = [[Dim(**d) for d in dims] for dims in saved["search"]]
    return Tuner(run_dir, experiments, saved["names"], spaces, saved["objective"], saved)


# ---------------------------------------------------------------- one trial

class Pruned(Exception):
    """Optuna's pruner stopped the trial after an epoch."""


class Selection:
    """A trial's judge (unlearning.unlearn's `judge`): the objective on the forget set, the
    validation set and the retain sample, after the last epoch, and after every epoch before
    it when a pruner may stop the trial."""

    def __init__(self, ctx, parts, gold, weights, pruner=None):
        self.ctx, self.parts, self.gold, self.weights, self.pruner = ctx, parts, gold, weights, pruner
        self.intermediate, self.last = {}, None

    def measure(self, model):
        m = metrics.selection_report(metrics.predict_parts(model, self.ctx.ds, self.parts, self.ctx.compute))
        return {**m, "objective": metrics.selection_objective(m, self.gold, self.weights)}

    def point(self, model, epoch, last):
        if not last and self.pruner is None:
            return None
        self.last = m = self.measure(model)
        self.intermediate[epoch] = m["objective"]
        if self.pruner is not None:
            self.pruner.report(m["objective"], epoch)
            if not last and self.pruner.should_prune():
                raise Pruned(epoch)
        return m

    def final(self, model):
        return (self.last if self.last is not None else self.measure(model)), {}


def pruning_trial(history):
    """A trial of an in-memory study that holds the completed trials' per-epoch objectives, under
    Optuna's MedianPruner: the same decisions wherever the trial runs (here or on a Ray worker)."""
    import optuna
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=PRUNE_STARTUP, n_warmup_steps=0))
    for value, steps in history:
        study.add_trial(optuna.trial.create_trial(
            value=value, intermediate_values={int(k): v for k, v in steps.items()},
            state=optuna.trial.TrialState.COMPLETE))
    return study.ask()


def selection_context(e, compute, cache, retain_sample):
    """(ctx, parts, gold's metrics, base's metrics) for the trials of experiment e: the split,
    what a trial evaluates, and the gold standard's and base model's numbers on it."""
    ctx = prepare(e, compute, cache, references=False)
    parts = metrics.selection_parts(ctx.split, retain_sample)
    refs = {}
    for label, path in (("gold", e.retrained), ("base", e.checkpoint)):
        key = ("selection", path, e.checkpoint, repr(e.spec), e.split_seed, retain_sample)
        if key not in cache:
            model = ctx.base_model if label == "base" else load_model(path, compute.device)[0]
            cache[key] = metrics.selection_report(metrics.predict_parts(model, ctx.ds, parts, compute))
        refs[label] = cache[key]
    return ctx, parts, refs["gold"], refs["base"]


def run_trial(task, compute, cache, logger):
    """One trial of `task` (a dict: experiment, params, weights, retain_sample, history):
    {"state": complete | pruned | diverged | failed, "value", "metrics", "intermediate", ...}."""
    e = with_params(Experiment(**task["experiment"]), task["params"])
    wall = time.perf_counter()
    judge = None
    try:
        ctx, parts, gold, base = selection_context(e, compute, cache, task["retain_sample"])
        pruner = pruning_trial(task["history"]) if task["history"] is not None else None
        judge = Selection(ctx, parts, gold, task["weights"], pruner)
        _, _, result = unlearn(e, ctx, e.seed, logger, judge=judge)
    except Pruned as p:
        return {"state": "pruned", "value": None, "metrics": judge.last, "intermediate": judge.intermediate,
                "pruned_at": p.args[0], "wall_s": time.perf_counter() - wall}
    except Exception as err:  # noqa: BLE001 -- a failed trial counts as the worst value; the study goes on
        return {"state": "failed", "value": WORST, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                "intermediate": judge.intermediate if judge else {}, "wall_s": time.perf_counter() - wall}
    out = {"intermediate": judge.intermediate, "rte_s": result["rte_s"], "wall_s": time.perf_counter() - wall,
           "base_objective": metrics.selection_objective(base, gold, task["weights"])}
    if result["diverged_at"] is not None:
        return {**out, "state": "diverged", "value": WORST, "diverged_at": result["diverged_at"]}
    m = result["metrics"]
    if not math.isfinite(m["objective"]):
        return {**out, "state": "failed", "value": WORST, "metrics": m, "error": "the objective is not a number"}
    return {**out, "state": "complete", "value": m["objective"], "metrics": m}


class TrialWorker(CachingWorker):
    """A tuning's Ray slot: its trials."""

    def run(self, task, log_name):
        logger = Logger(self.log, "salun-deepdive", log_name, task["params"])
        out = run_trial(task, self.compute, self.cache, logger)
        logger.finish()
        return out


# ---------------------------------------------------------------- the studies

def sampler(seed, n, budget):
    """TPE drawn anew before the n-th trial of an experiment: its draws depend only on the seed,
    n, the budget and the trials before it. The first third of the budget (2 to 10 trials,
    Optuna's default being 10) is drawn at random, so that a small budget is not all random."""
    import optuna
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + n) % 2 ** 32,
                                      n_startup_trials=min(10, max(2, budget // 3)))


@dataclass
class Ask:
    i: int  # experiment
    number: int  # Optuna's trial number
    params: dict
    task: dict
    attempts: int = 0


def may_prune(e, dims):
    """Whether a trial of e runs several epochs (a one-shot method's only epoch is its result)."""
    uses_epochs = METHODS[e.method].search.get("epochs", True) is not None
    return uses_epochs and (e.epochs > 1 or any(d.key == "epochs" for d in dims))


class Studies:
    """The Optuna studies of a tuning, one per experiment, in the run folder's journal."""

    def __init__(self, tuner):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tuner = tuner
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        self.storage = JournalStorage(JournalFileBackend(str(tuner.run_dir / "optuna.log")))
        self.studies = [optuna.create_study(study_name=name, storage=self.storage, direction="minimize",
                                            load_if_exists=True) for name in tuner.names]
        self.trials = {}  # number -> optuna Trial, per experiment, for the trials running now
        for i, study in enumerate(self.studies):  # an interrupted tuning's running trials did not finish
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        self.running = [0] * len(self.studies)

    def counted(self, i):
        """The trials of experiment i that count towards --trials: every one that ended (complete,
        pruned, or failed and told the worst value); not one an interruption cut short."""
        import optuna
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return self.studies[i].get_trials(deepcopy=False, states=states)

    def asks(self, budget, prune):
        """Every trial still to run, asked only when it can start: after the trials before it were told."""
        import optuna
        t = self.tuner
        for i, (e, dims) in enumerate(zip(t.experiments, t.spaces)):
            study = self.studies[i]
            distributions = {d.key: d.distribution() for d in dims}
            while (n := len(self.counted(i)) + self.running[i]) < budget:
                study.sampler = sampler(e.seed, n, budget)
                if n == 0:
                    own = {d.key: value_of(e, d.key) for d in dims}
                    if all(d.low <= own[d.key] <= d.high for d in dims):
                        study.enqueue_trial(own)
                trial = study.ask(distributions)
                self.trials[i, trial.number] = trial
                self.running[i] += 1
                history = None
                if prune and may_prune(e, dims):
                    history = [(c.value, c.intermediate_values) for c in study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
                task = {"experiment": asdict(e), "params": dict(trial.params), "weights": t.weights[i],
                        "retain_sample": t.config["retain_sample"], "history": history}
                yield Ask(i, trial.number, dict(trial.params), task)

    def tell(self, ask, out):
        """A finished trial into its study: the value (the worst for a failed or diverged one), the
        per-epoch objectives the pruner reads, and what the trial measured."""
        import optuna
        trial = self.trials.pop((ask.i, ask.number))
        self.running[ask.i] -= 1
        for step, value in sorted(out.get("intermediate", {}).items()):
            trial.report(value, int(step))
        for key in ("state", "metrics", "rte_s", "wall_s", "error", "base_objective", "pruned_at", "diverged_at"):
            if out.get(key) is not None:
                trial.set_user_attr(key, out[key])
        study = self.studies[ask.i]
        if out["state"] == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, out["value"])

    def best(self, i):
        complete = [t for t in self.counted(i) if t.value is not None and t.user_attrs.get("state") == "complete"]
        return min(complete, key=lambda t: (t.value, t.number)) if complete else None


def run(tuner, compute, args):
    """Every trial still to run, locally one after another or on Ray workers, told to its study
    as it ends. Returns the Studies."""
    studies = Studies(tuner)
    budget, prune = tuner.config["trials"], tuner.config["prune"]
    total = budget * len(tuner.experiments)
    done_before = sum(min(len(studies.counted(i)), budget) for i in range(len(tuner.experiments)))
    with tqdm(total=total, initial=done_before, unit="trial", dynamic_ncols=True) as bar:
        def done(ask, out):
            studies.tell(ask, out)
            if out["state"] in ("failed", "diverged"):
                tqdm.write(f"{describe(ask)}: {out['state']}"
                           + (f" ({out['error']})" if out.get("error") else "") + f"; counted as {WORST:g}",
                           file=sys.stderr)
            best = studies.best(ask.i)
            bar.set_description(f"{tuner.names[ask.i]}: best {best.value:.2f}" if best else tuner.names[ask.i])
            bar.update()

        def describe(ask):
            return f"{tuner.names[ask.i]} trial {ask.number}"

        asks = studies.asks(budget, prune)
        if args.executor == "ray":
            run_on_ray(tuner, asks, done, describe, bar, args)
        else:
            cache = {"data_dir": args.data_dir}
            for ask in asks:
                bar.set_description(f"{tuner.names[ask.i]} trial {ask.number}")
                logger = Logger(not args.no_log, "salun-deepdive", log_name(tuner, ask), ask.params)
                out = run_trial(ask.task, compute, cache, logger)
                logger.finish()
                done(ask, out)
    return studies


def log_name(tuner, ask):
    return f"{tuner.run_dir.name}/{tuner.names[ask.i]}/trial{ask.number}"


def run_on_ray(tuner, asks, done, describe, bar, args):
    ray = start_ray(args.ray_address)
    try:
        init = worker_init(args, tuner.config["precision"])
        wanted = tuner.config["trials"] * len(tuner.experiments)
        workers = Workers(ray, TrialWorker, args.cpus_per_run, args.gpus_per_run, init, wanted)

        def failed(ask, why):  # the worker was lost twice: the trial counts as failed
            done(ask, {"state": "failed", "value": WORST, "error": why})

        workers.run(asks, lambda worker, ask: worker.run.remote(ask.task, log_name(tuner, ask)), done, failed,
                    describe, bar)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- what a tuning writes

def rows(tuner, studies):
    """One row per experiment: its best trial, the do-nothing objective, the trials it took."""
    out = []
    for i, (name, e) in enumerate(zip(tuner.names, tuner.experiments)):
        trials = studies.counted(i)
        states = [t.user_attrs.get("state", "pruned") for t in trials]
        best = studies.best(i)
        base = next((t.user_attrs["base_objective"] for t in trials if "base_objective" in t.user_attrs), None)
        row = {"experiment": name, "method": e.method, "mask": format(e.mask_thr, "g") if e.use_mask else "-",
               "forget": e.spec.describe(), "trials": len(trials),
               **{s: states.count(s) for s in ("complete", "pruned", "diverged", "failed")},
               "objective": best.value if best else None, "do_nothing": base,
               "best_trial": best.number if best else None, "params": best.params if best else {},
               "metrics": best.user_attrs.get("metrics", {}) if best else {}}
        out.append(row)
    return out


def tuned_entries(tuner, studies, table):
    """The experiment list with every experiment's best settings: main.py's -L. A random forget
    set keeps the seed it was drawn from, so that `--seed` gives fresh runs on the same set."""
    out = []
    for e, name, row in zip(tuner.experiments, tuner.names, table):
        entry = {k: v for k, v in asdict(with_params(e, row["params"])).items() if v is not None}
        entry["tag"] = e.tag or name.split("_", 1)[1]
        if e.unlearning_rate is not None:
            entry["forget_seed"] = e.split_seed
        out.append(entry)
    return out


def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def params_text(params):
    return ", ".join(f"{k.replace('method_args.', '')}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


CSV_COLUMNS = ("experiment", "method", "mask", "forget", "trials", "complete", "pruned", "diverged", "failed",
               "objective", "do_nothing", "best_trial")


def write_outputs(tuner, studies):
    """tuned.json, tuning.csv, tuning.md and one figure per experiment; returns the terminal's text."""
    table = rows(tuner, studies)
    run_dir = tuner.run_dir
    atomic_write_text(run_dir / "tuned.json", "[\n" + ",\n".join(
        "  " + json.dumps(x) for x in tuned_entries(tuner, studies, table)) + "\n]\n")
    keys = list(dict.fromkeys(k for r in table for k in r["params"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(CSV_COLUMNS) + [f"best.{k}" for k in keys] + [f"best.{m}" for m in metrics.SELECTION_KEYS])
    for r in table:
        writer.writerow([fmt(r[c], 4) if isinstance(r[c], float) else ("" if r[c] is None else r[c])
                         for c in CSV_COLUMNS] + [r["params"].get(k, "") for k in keys]
                        + [fmt(r["metrics"].get(m), 4) if r["metrics"] else "" for m in metrics.SELECTION_KEYS])
    atomic_write_text(run_dir / "tuning.csv", buf.getvalue())
    header = ("experiment", "trials (pruned, failed)", "objective", "do nothing", "UA", "RA", "VA", "val_MIA",
              "best settings")
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for r in table:
        m = r["metrics"] or {}
        cells = [r["experiment"], f"{r['trials']} ({r['pruned']}, {r['failed'] + r['diverged']})",
                 fmt(r["objective"]), fmt(r["do_nothing"])]
        cells += [fmt(m.get(k)) for k in metrics.SELECTION_KEYS] + [params_text(r["params"]) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    c = tuner.config
    weights = {json.dumps(w, sort_keys=True) for w in tuner.weights}
    note = (f"{c['trials']} trials per experiment (TPE, seeded from each experiment's seed"
            + (", Optuna's median pruner on per-epoch objectives" if c["prune"] else "") + "). Objective: the "
            f"weighted mean of |UA, RA, VA, val_MIA - the gold standard's| (weights {', '.join(sorted(weights))}) "
            f"on the forget set, the validation set and {c['retain_sample']} retain samples; the test set was not "
            f"read. UA, RA, VA and val_MIA are the best trial's. Report the tuned settings on fresh seeds: "
            f"python main.py -L {run_dir / 'tuned.json'} --nexp 5 --seed 100")
    md = "\n".join(lines) + "\n\n" + note + "\n"
    atomic_write_text(run_dir / "tuning.md", md)
    for i, (name, dims) in enumerate(zip(tuner.names, tuner.spaces)):
        plots.plot_tuning(run_dir / "tuning" / f"{name}.png", name, [d.key for d in dims],
                          {d.key for d in dims if d.log}, trial_points(studies.counted(i)))
    return md


def trial_points(trials):
    """(params, value, state) of every counted trial, for the figure; a pruned trial at its last
    per-epoch objective."""
    out = []
    for t in trials:
        state = t.user_attrs.get("state", "pruned")
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        if value is not None:
            out.append((t.params, value, state))
    return out
