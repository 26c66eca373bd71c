"""main.py's Ray executor: each (experiment, run) of a study is one task on a long-lived worker.

    python main.py -L exp/demo.json --nexp 3 -NL --executor ray                      # Ray on this machine
    python main.py -L exp/classforget.json --executor ray --gpus-per-run 0.25        # four runs per GPU
    python main.py -L exp/classforget.json --executor ray --ray-address auto         # a running cluster

One worker (a Ray actor) per slot of --cpus-per-run CPUs and --gpus-per-run GPUs. A worker
keeps main.prepare's cache from one task to the next, so the dataset, the base model, the
reference evaluations and the forget-set gradients are loaded or computed once per worker,
not once per run. A task returns its results line and, for a run that is saved, the files
main.save_outputs wrote; only the driver writes the run folder, so the folder need not be on
storage the workers share. A task that raises, or whose worker is lost, is tried once more
(a lost worker is replaced), then recorded as failed while the other tasks go on.

This is a module of its own rather than part of main.py because Ray finds the worker class
on each worker by importing it by name; a class of the script run as __main__ would travel
with all of that script's globals instead. start_ray and Workers (the workers and the loop
that runs tasks on them) serve audit.py's executor, ray_audit.py, too.
"""
import collections
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from utils import Logger, UserError, atomic_write, compute_for

ROOT = Path(__file__).resolve().parent
RETRIES = 1  # a failed task is tried once more, then recorded as failed
START_TIMEOUT_S = 300  # a worker that has not started by then (no free resources, a stuck node) is given up


class Worker:
    """One slot: runs tasks one after another, keeping main.prepare's cache between them."""

    def __init__(self, data_dir, device, precision, threads, log):
        import main  # main.py as a module here: the worker runs its prepare() and unlearn()
        torch.set_num_threads(threads)  # as many as the driver's local runs use: the same sums, the same numbers
        self.main, self.log = main, log
        self.cache = {"data_dir": data_dir}
        self.compute = compute_for(torch.device(device), precision)

    def ready(self):
        return os.getpid()

    def references(self, experiment):
        """Only the base and gold models' metrics (an experiment none of whose runs is left to do)."""
        ctx = self.main.prepare(self.main.Experiment(**experiment), self.compute, self.cache)
        return {"refs": {"before": ctx.before, "gold": ctx.gold}}

    def run(self, experiment, k, save_as, log_name):
        """Run k of the experiment: its result, the reference metrics and the files to save."""
        main = self.main
        e = main.Experiment(**experiment)
        ctx = main.prepare(e, self.compute, self.cache)
        logger = Logger(self.log, "salun-deepdive", log_name, experiment)
        model, mask, result = main.unlearn(e, ctx, e.seed + k, logger)
        logger.finish()
        files = {}
        if save_as and result["diverged_at"] is None:  # written here, sent back, written by the driver
            with tempfile.TemporaryDirectory() as tmp:
                main.save_outputs(Path(tmp), save_as, e, ctx, model, mask, result)
                files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                         for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        return {"result": result, "refs": {"before": ctx.before, "gold": ctx.gold}, "files": files,
                "describe": self.compute.describe(), "pid": os.getpid()}


@dataclass
class Task:
    i: int  # experiment
    k: int = None  # run; None: only the reference metrics
    attempts: int = 0


def start_ray(address):
    """Ray on this machine (loopback only, no dashboard), or a running cluster; quietly."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is reported off the machine
    # Ray starts its workers at niceness 15: on a machine shared with other work they would wait
    # behind it, and a study would run several times slower than the same runs done locally
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                 # workers import the toolkit's modules by name: from this checkout, at the same path on every node
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}})
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as err:
        where = "Ray on this machine" if address is None else f"the Ray cluster at {address}"
        raise UserError(f"could not start {where}: {first_line(err)}") from None
    return ray


def first_line(err):
    text = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (text[0] if text else type(err).__name__)[:300]


def reason(ray, err):
    """One line saying why a task failed: the exception it raised, not Ray's wrapping of it."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(cause, BaseException) and \
            not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {first_line(cause)}"
    if isinstance(err, ray.exceptions.RayActorError):
        return f"worker lost ({first_line(err)})"
    return first_line(err)


def slots(ray, cpus, gpus, wanted):
    """How many workers fit in the cluster (at most `wanted`)."""
    have = ray.cluster_resources()
    n = int(have.get("CPU", 0) / cpus + 1e-9)
    if gpus > 0:
        n = min(n, int(have.get("GPU", 0) / gpus + 1e-9))
    if n < 1:
        raise UserError(f"the Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; one run "
                        f"asks for --cpus-per-run {cpus:g} and --gpus-per-run {gpus:g}")
    return min(n, wanted)


def start_workers(ray, actor, n, init):
    """n started workers (with what their ready() said); one that cannot start says so in one line."""
    pending = [actor.remote(*init) for _ in range(n)]
    started = {}
    for w in pending:
        try:
            started[w] = ray.get(w.ready.remote(), timeout=START_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as err:
            tqdm.write(f"ray: a worker could not start: {reason(ray, err)}", file=sys.stderr)
            ray.kill(w)
    return started


class TaskFailed(Exception):
    """A task that failed on every attempt, where the script cannot go on without its result."""


class Workers:
    """Long-lived workers, one per slot of `cpus` CPUs and `gpus` GPUs (at most `wanted`), each
    an actor of `worker_class` started with `init`, and the loop that runs tasks on them."""

    def __init__(self, ray, worker_class, cpus, gpus, init, wanted):
        self.ray, self.init = ray, init
        self.actor = ray.remote(worker_class).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self.started = start_workers(ray, self.actor, slots(ray, cpus, gpus, wanted), init)
        if not self.started:
            raise UserError("no Ray worker could start (see above); every node needs this checkout, at the same "
                            "path, and its requirements")
        self.idle = list(self.started)

    def run(self, tasks, submit, done, failed, describe, bar):
        """Every task (an object with an `attempts` count) through `submit(worker, task)`, which
        returns its Ray reference; `done(task, out)` or `failed(task, why)` as each one ends. A
        task that raises or loses its worker is tried once more (a lost worker is replaced)."""
        ray, tasks, running = self.ray, collections.deque(tasks), {}
        while tasks or running:
            while tasks and self.idle:
                task, worker = tasks.popleft(), self.idle.pop()
                running[submit(worker, task)] = (task, worker, time.perf_counter())
            if not running:  # every worker is lost and none could be started again
                for task in tasks:
                    failed(task, "no Ray worker left to run it")
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                task, worker, _ = running.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as err:
                    why = reason(ray, err)
                    if isinstance(err, ray.exceptions.RayActorError):  # the process is gone: start another
                        self.idle += list(start_workers(ray, self.actor, 1, self.init))
                    else:
                        self.idle.append(worker)
                    task.attempts += 1
                    if task.attempts <= RETRIES:
                        tqdm.write(f"{describe(task)}: {why}; trying it once more", file=sys.stderr)
                        tasks.appendleft(task)
                    else:
                        failed(task, why)
                    continue
                self.idle.append(worker)
                done(task, out)
            bar.set_postfix_str(slowest(running, describe), refresh=True)


def run(experiments, todo, folder, precision, args):
    """Every (experiment, run) in `todo` as a Ray task; results are recorded in `folder` as they
    come back. Returns the reference metrics of every experiment."""
    ray = start_ray(args.ray_address)
    try:
        return schedule(ray, experiments, todo, folder, precision, args)
    finally:
        ray.shutdown()


def schedule(ray, experiments, todo, folder, precision, args):
    with_runs = {i for i, _ in todo}
    tasks = [Task(i, k) for i, k in todo] + [Task(i) for i in range(len(experiments)) if i not in with_runs]
    init = (args.data_dir, "cuda" if args.gpus_per_run > 0 else "cpu", precision, max(1, int(args.cpus_per_run)),
            not args.no_log)
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
        workers.run(tasks, lambda worker, task: submit(worker, task, experiments, folder), done, failed,
                    lambda task: describe(task, folder), bar)
    return refs


def submit(worker, task, experiments, folder):
    e = asdict(experiments[task.i])
    if task.k is None:
        return worker.references.remote(e)
    return worker.run.remote(e, task.k, folder.save_as(task.i, task.k),
                             f"{folder.run_dir.name}/{folder.names[task.i]}/run{task.k}")


def describe(task, folder):
    name = folder.names[task.i]
    return f"{name} run {task.k}" if task.k is not None else f"{name} (reference metrics)"


def slowest(running, describe):
    """The task that has been running longest, for the progress bar."""
    if not running:
        return ""
    task, _, started = min(running.values(), key=lambda v: v[2])
    return f"slowest: {describe(task)}, {time.perf_counter() - started:.0f} s"


def write_files(run_dir, files):
    for rel, data in files.items():
        atomic_write(Path(run_dir) / rel, lambda f, data=data: f.write(data))
