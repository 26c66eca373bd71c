"""A study: a list of experiments, each run --nexp times, in a run folder that survives interruptions.

    experiments, config = study.plan(args, device)      # checked, the folder made, nothing computed
    folder = study.RunFolder(run_dir, config["run_id"], names, nexp, save, rows)
    refs = study.run_local(experiments, todo, folder, compute, args)        # or study.run_on_ray(...)

The run folder holds config.json (the resolved experiments, written before any run),
results.jsonl (one whole line per finished run, appended as it ends: --resume reads it and
does the runs it lacks, and the runs that failed), and the unlearned models and masks that
--save keeps. Only the driver writes it, whichever executor computes the runs: locally, one
after another in this process; on Ray, each (experiment, run) one task on a long-lived worker
that keeps unlearning.prepare's cache from one task to the next, so the dataset, the base
model, the reference evaluations and the forget-set gradients are loaded or computed once
per worker, not once per run. A task returns its results line and, for a run that is saved,
the files save_outputs wrote there; so the folder need not be on storage the workers share.
"""
import json
import os
import shlex
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from executors import EXECUTOR_FLAGS, CachingWorker, Workers, start_ray, worker_init
from experiments import FORGET_KEYS, Experiment, experiment_names, from_args, overrides, resolve
from representations import Settings, probe_for
from unlearning import prepare, unlearn
from utils import (Logger, UserError, atomic_write, atomic_write_text, changed_on_resume, check_writable,
                   compute_for, default_precision, device_name, save_checkpoint, save_mask, timestamp, unique_dir)


# ---------------------------------------------------------------- a new run folder, or an interrupted one

# What --resume may change: where it computes, whether it logs and which models it keeps,
# not what it computes.
RESUME_MAY_CHANGE = {"--resume", "--device", "-NL", "--save", *EXECUTOR_FLAGS}


def resume_plan(args):
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)")
    saved = json.loads((run_dir / "config.json").read_text())
    fixed = changed_on_resume(args, RESUME_MAY_CHANGE, saved)
    if fixed:
        raise UserError(f"--resume continues {run_dir} exactly as it was configured; {', '.join(fixed)} would "
                        f"change it (only --device, -NL, --save and the executor flags may be given): start a new "
                        f"run instead")
    if not {"run_id", "precision"} <= set(saved):
        raise UserError(f"{run_dir} was written by an older version of main.py (no run_id or precision in "
                        f"its config.json) and cannot be resumed; start a new run")
    check_writable(run_dir, "run folder")
    experiments = resolve(saved["experiments"], run_dir / "config.json", saved["data_dir"])
    args.data_dir = saved["data_dir"]
    return experiments, saved


def plan(args, device):
    """(experiments, config) — all checked, the run folder made, nothing computed.
    A resumed run keeps its config.json, precision included."""
    if args.resume:
        return resume_plan(args)
    if args.nexp < 1:
        raise UserError(f"--nexp must be at least 1, got {args.nexp}")
    if not args.load and not overrides(args).keys() & {"checkpoint", *FORGET_KEYS}:
        raise UserError("nothing to unlearn: give an experiment list (-L FILE), or a checkpoint (-c) and what "
                        "to forget (-CF CLASS, -UL FRACTION or -IF JSON); see python main.py -h")
    entries, where = from_args(args)
    experiments = resolve(entries, where, args.data_dir)
    check_writable(args.out, "--out")
    compute = compute_for(device, args.precision or default_precision())
    label = Path(args.load).stem if args.load else "cli"
    run_dir = unique_dir(args.out, args.name or f"{timestamp()}_{label}")
    config = {"experiments": [asdict(e) for e in experiments], "names": experiment_names(experiments),
              "nexp": args.nexp, "data_dir": args.data_dir, "precision": compute.precision,
              "representations": asdict(args.representations) if args.representations else None,
              "device_name": device_name(device), "run_id": uuid.uuid4().hex, "save": args.save,
              "command": sys.argv}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    return experiments, {**config, "run_dir": str(run_dir)}


# ---------------------------------------------------------------- what the run folder holds

SAVE_CHOICES = ("last", "none", "all")


def saved_name(name, k, nexp, save):
    """The name run k's model and mask are saved under, or None when --save keeps no file of it."""
    if save == "all":
        return f"{name}_run{k}"
    return name if save == "last" and k == nexp - 1 else None


def append_line(path, row):
    """One whole JSON line in a single write: an interruption leaves the line or nothing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


class RunFolder:
    """What the driver alone writes while runs finish: results.jsonl, and the saved models."""

    def __init__(self, run_dir, run_id, names, nexp, save, rows):
        self.run_dir, self.run_id, self.names, self.nexp, self.save = run_dir, run_id, names, nexp, save
        self.results, self.rows = run_dir / "results.jsonl", rows

    def save_as(self, i, k):
        return saved_name(self.names[i], k, self.nexp, self.save)

    def record(self, i, k, result, describe, write_model):
        """Run k of experiment i: its files through `write_model(name)`, then its results line."""
        name, save_as = self.names[i], self.save_as(i, k)
        if save_as and result["diverged_at"] is None:
            write_model(save_as)
        elif save_as:  # its weights hold NaN/inf: no checkpoint to analyse
            tqdm.write(f"{name}: diverged at epoch {result['diverged_at']}; no checkpoint saved", file=sys.stderr)
        self.add({"experiment": i, "name": name, "run": k, **result, "run_id": self.run_id, **describe})

    def record_failure(self, i, k, seed, error, attempts):
        """A run that raised (or lost its worker) on every attempt: kept with its error, in no mean;
        --resume tries it again."""
        tqdm.write(f"{self.names[i]} run {k}: failed after {attempts} attempts: {error}", file=sys.stderr)
        self.add({"experiment": i, "name": self.names[i], "run": k, "seed": seed, "failed": error,
                  "attempts": attempts, "metrics": None, "diverged_at": None, "history": [], "run_id": self.run_id})

    def add(self, row):
        append_line(self.results, row)
        self.rows.append(row)


def read_results(path, run_id):
    """Finished runs; a half-written last line (an interrupted write) is reported and dropped.
    Lines written for another run folder's config are refused: they would be mislabelled."""
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines()
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"note: ignoring unreadable line {k + 1} of {path} (an interrupted write)", file=sys.stderr)
    foreign = [r for r in rows if not isinstance(r, dict) or r.get("run_id") != run_id]
    if foreign:
        raise UserError(f"{path} holds {len(foreign)} result line(s) of another run (run_id differs from "
                        f"config.json's); resume the folder they came from, or start a new run")
    if len(rows) != len([ln for ln in lines if ln.strip()]):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def drop_failed(path, rows):
    """Results without the runs that failed, which --resume runs again."""
    kept = [r for r in rows if not r.get("failed")]
    if len(kept) < len(rows):
        print(f"note: trying the {len(rows) - len(kept)} failed run(s) of {path} again", file=sys.stderr)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def save_outputs(run_dir, name, e, ctx, model, mask, result):
    config = dict(ctx.base_config, forget=e.spec.to_config(), forget_idx=ctx.split.forget.tolist(),
                  method=e.method, experiment=asdict(e), metrics=result["metrics"],
                  kept_fraction=mask.kept_fraction if mask else None, **ctx.compute.describe())
    save_checkpoint(run_dir / f"{name}.pt", model.state_dict(), config)
    if mask:
        save_mask(run_dir / "masks" / f"{name}.pt", mask.keep,
                        {"name": name, "experiment": asdict(e), "kept_fraction": mask.kept_fraction,
                         "zero_fraction": mask.zero_fraction})


def failure_lines(failed, run_dir):
    lines = [f"failed: {r['name']} run {r['run']} (seed {r['seed']}): {r['failed']}" for r in failed]
    return lines + [f"{len(failed)} run(s) failed and are in no mean; {resume_command(run_dir)} tries them again"]


def resume_command(run_dir, args=None):
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("main.py") else "main.py"
    extra = " -NL" if args is not None and args.no_log else ""
    return f"python {shlex.quote(script)} --resume {shlex.quote(str(run_dir))}{extra}"


# ---------------------------------------------------------------- the local executor

def reference_metrics(e, ctx, cache, probing):
    """The base and gold models' metrics, and their representation metrics when `probing`."""
    refs = {"before": ctx.before, "gold": ctx.gold}
    if probing:
        refs["representations"] = probe_for(e, ctx, cache, Settings(**probing)).references
    return refs


def measured(result, e, ctx, cache, probing, model, mask):
    """`result` with the unlearned model's representation metrics when `probing`."""
    if probing and result["diverged_at"] is None:
        probe = probe_for(e, ctx, cache, Settings(**probing))
        result["representations"] = probe.measure(model, mask.keep if mask else None)
    return result


def run_local(experiments, todo, folder, compute, args, probing=None):
    """The runs one after another in this process: one bar over every run of the list, the
    current run's epochs under it. Returns the reference metrics of every experiment, and with
    `probing` (representations.Settings as a dict) measures the representations of every model."""
    cache, refs = {"data_dir": args.data_dir}, {}
    total = len(experiments) * folder.nexp
    with tqdm(total=total, initial=total - len(todo), unit="run", dynamic_ncols=True) as bar:
        for i, e in enumerate(experiments):
            runs = [k for j, k in todo if j == i]
            if runs:  # a finished experiment only gives its reference metrics: no redraw
                bar.set_description(folder.names[i])
            ctx = prepare(e, compute, cache)
            refs[i] = reference_metrics(e, ctx, cache, probing)
            for k in runs:
                with tqdm(total=e.epochs, desc=f"  run {k + 1}/{folder.nexp}", unit="epoch", position=1,
                          leave=False, dynamic_ncols=True) as epochs:
                    def show(epoch, loss, m):
                        epochs.set_postfix_str(("" if loss is None else f"loss {loss:.4f}, ") +
                                               f"UA {m['UA']:.1f}, RA {m['RA']:.1f}", refresh=False)
                        epochs.update()
                    logger = Logger(not args.no_log, "salun-deepdive",
                                    f"{folder.run_dir.name}/{folder.names[i]}/run{k}", asdict(e))
                    model, mask, result = unlearn(e, ctx, e.seed + k, logger, show)
                    logger.finish()
                measured(result, e, ctx, cache, probing, model, mask)
                folder.record(i, k, result, compute.describe(),
                              lambda name: save_outputs(folder.run_dir, name, e, ctx, model, mask, result))
                bar.update()
    return refs


# ---------------------------------------------------------------- the Ray executor

class Worker(CachingWorker):
    """A study's slot: its runs, and the reference metrics of an experiment with none left."""

    def references(self, experiment, probing=None):
        """Only the base and gold models' metrics (an experiment none of whose runs is left to do)."""
        e = Experiment(**experiment)
        ctx = prepare(e, self.compute, self.cache)
        return {"refs": reference_metrics(e, ctx, self.cache, probing)}

    def run(self, experiment, k, save_as, log_name, probing=None):
        """Run k of the experiment: its result, the reference metrics and the files to save."""
        e = Experiment(**experiment)
        ctx = prepare(e, self.compute, self.cache)
        logger = Logger(self.log, "salun-deepdive", log_name, experiment)
        model, mask, result = unlearn(e, ctx, e.seed + k, logger)
        logger.finish()
        measured(result, e, ctx, self.cache, probing, model, mask)
        files = {}
        if save_as and result["diverged_at"] is None:  # written here, sent back, written by the driver
            with tempfile.TemporaryDirectory() as tmp:
                save_outputs(Path(tmp), save_as, e, ctx, model, mask, result)
                files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                         for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        return {"result": result, "refs": reference_metrics(e, ctx, self.cache, probing), "files": files,
                "describe": self.compute.describe(), "pid": os.getpid()}


@dataclass
class Task:
    i: int  # experiment
    k: int = None  # run; None: only the reference metrics
    attempts: int = 0


def run_on_ray(experiments, todo, folder, precision, args, probing=None):
    """Every (experiment, run) in `todo` as a Ray task; results are recorded in `folder` as they
    come back. Returns the reference metrics of every experiment."""
    ray = start_ray(args.ray_address)
    try:
        return schedule(ray, experiments, todo, folder, precision, args, probing)
    finally:
        ray.shutdown()


def schedule(ray, experiments, todo, folder, precision, args, probing=None):
    with_runs = {i for i, _ in todo}
    tasks = [Task(i, k) for i, k in todo] + [Task(i) for i in range(len(experiments)) if i not in with_runs]
    init = worker_init(args, precision)
    workers = Workers(ray, Worker, args.cpus_per_run, args.gpus_per_run, init, len(tasks))
    refs = {}

    def done(task, out):
        refs[task.i] = out["refs"]
        if task.k is not None:
            folder.record(task.i, task.k, out["result"], out["describe"],
                          lambda _name: write_files(folder.run_dir, out["files"]))
            bar.update()

    def failed(task, why):
        if task.k is not None:
            folder.record_failure(task.i, task.k, experiments[task.i].seed + task.k, why, task.attempts)
            bar.update()
        else:
            tqdm.write(f"{describe(task, folder)}: {why}; its base and gold rows are left out", file=sys.stderr)

    total = len(experiments) * folder.nexp
    with tqdm(total=total, initial=total - len(todo), unit="run", desc=f"ray, {len(workers.started)} workers",
              dynamic_ncols=True) as bar:
        workers.run(tasks, lambda worker, task: submit(worker, task, experiments, folder, probing), done, failed,
                    lambda task: describe(task, folder), bar)
    return refs


def submit(worker, task, experiments, folder, probing):
    e = asdict(experiments[task.i])
    if task.k is None:
        return worker.references.remote(e, probing)
    return worker.run.remote(e, task.k, folder.save_as(task.i, task.k),
                             f"{folder.run_dir.name}/{folder.names[task.i]}/run{task.k}", probing)


def describe(task, folder):
    name = folder.names[task.i]
    return f"{name} run {task.k}" if task.k is not None else f"{name} (reference metrics)"


def write_files(run_dir, files):
    for rel, data in files.items():
        atomic_write(Path(run_dir) / rel, lambda f, data=data: f.write(data))
