"""Where a script's runs compute: the executor flags, and Ray's workers with the loop that runs tasks on them.

    python main.py -L exp/demo.json --nexp 3 -NL --executor ray                      # Ray on this machine
    python main.py -L exp/classforget.json --executor ray --gpus-per-run 0.25        # four runs per GPU
    python main.py -L exp/classforget.json --executor ray --ray-address auto         # a running cluster
    python audit.py -L exp/audit_demo.json --models 32 -NL --executor ray

Every script with an --executor flag adds it with `add_executor_flags` and checks it with
`check_executor` before anything is computed. With --executor ray, `start_ray` starts Ray
(or joins a cluster) and `Workers` keeps one long-lived worker (a Ray actor) per slot of
--cpus-per-run CPUs and --gpus-per-run GPUs, running a script's tasks on them: a task that
raises, or whose worker is lost, is tried once more (a lost worker is replaced), then handed
back as failed while the other tasks go on. What a task is, and its worker class, belong to
the library module of what it computes (study.py's runs, auditing.py's models): Ray finds a
worker class on each worker by importing its module by name, so it is never a script's.
Ray itself is imported only when asked for.
"""
import collections
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from utils import UserError, compute_for


EXECUTORS = ("local", "ray")
EXECUTOR_FLAGS = ("--executor", "--ray-address", "--cpus-per-run", "--gpus-per-run")
ROOT = Path(__file__).resolve().parent
RETRIES = 1  # a failed task is tried once more, then recorded as failed
START_TIMEOUT_S = 300  # a worker that has not started by then (no free resources, a stuck node) is given up
CONNECT_TIMEOUT_S = 10  # a cluster's address that takes longer to accept a connection is not there


# ---------------------------------------------------------------- the flags

def add_executor_flags(p, tasks):
    """--executor and the Ray flags, shared by main.py and audit.py; `tasks` says what becomes a Ray task."""
    g = p.add_argument_group("executor (where the runs compute; results are the same)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help=f"local: the runs one after another in this process; ray: {tasks} (default: %(default)s)")
    g.add_argument("--ray-address", default=None,
                   help="with --executor ray: auto or HOST:PORT joins a running Ray cluster (None: start Ray on "
                        "this machine, on the loopback only)")
    g.add_argument("--cpus-per-run", type=float, default=None,
                   help="with --executor ray: CPUs each worker reserves, and its torch threads (None: 1 when the "
                        "runs use GPUs, else the torch threads a local run uses, so the numbers are the same)")
    g.add_argument("--gpus-per-run", type=float, default=None,
                   help="with --executor ray: GPUs each worker reserves; fractions share a GPU, 0.25 packs four "
                        "runs on one (None: 1 when --device is cuda, else 0)")


def check_executor(args, device):
    """The executor flags, checked before anything is computed; fills in their defaults."""
    if args.executor != "ray":
        given = [f for f in EXECUTOR_FLAGS[1:] if f in args.changed]
        if given:
            raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --executor ray only")
        return
    if args.gpus_per_run is None:
        args.gpus_per_run = 1.0 if device.type == "cuda" else 0.0
    if args.cpus_per_run is None:  # a CPU worker computes with the threads a local run would use
        args.cpus_per_run = 1.0 if args.gpus_per_run > 0 else float(torch.get_num_threads())
    if not (math.isfinite(args.cpus_per_run) and args.cpus_per_run > 0):
        raise UserError(f"--cpus-per-run must be a number above 0, got {args.cpus_per_run:g}")
    if not (math.isfinite(args.gpus_per_run) and 0 <= args.gpus_per_run):
        raise UserError(f"--gpus-per-run must be 0 or more, got {args.gpus_per_run:g}")
    if args.gpus_per_run > 0 and "--device" in args.changed and device.type != "cuda":
        raise UserError(f"--gpus-per-run {args.gpus_per_run:g} puts the runs on GPUs, --device {args.device} "
                        f"on the CPU; give one or the other")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install -r requirements.txt") from None
    if args.ray_address is not None:
        check_reachable(args.ray_address)


def check_reachable(address):
    """A cluster's HOST:PORT (or ray://HOST:PORT) must accept a connection before Ray joins it:
    where nothing answers, Ray retries for minutes, printing its own connection warnings.
    `auto` is left to Ray, which says at once when it finds no cluster."""
    host, sep, port = address.rpartition("://")[2].rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(f"no Ray cluster answers at {address} ({err.strerror or first_line(err)}); start one "
                        f"there with `ray start --head`, or leave --ray-address out to start Ray on this "
                        f"machine") from None


# ---------------------------------------------------------------- Ray and its workers

def worker_init(args, precision):
    """What a CachingWorker starts with: the data folder, its device, the precision, its torch
    threads and whether it logs to wandb."""
    return (args.data_dir, "cuda" if args.gpus_per_run > 0 else "cpu", precision, max(1, int(args.cpus_per_run)),
            not args.no_log)


class CachingWorker:
    """One Ray slot that runs tasks one after another, keeping unlearning.prepare's cache
    between them: the base of main.py's and tune.py's workers."""

    def __init__(self, data_dir, device, precision, threads, log):
        torch.set_num_threads(threads)  # as many as the driver's local runs use: the same sums, the same numbers
        self.log = log
        self.cache = {"data_dir": data_dir}
        self.compute = compute_for(torch.device(device), precision)

    def ready(self):
        return os.getpid()


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
        task that raises or loses its worker is tried once more (a lost worker is replaced).
        `tasks` may be a generator: a task is drawn only when a worker is free for it, after
        every task that ended before it was handed to `done` (tune.py asks Optuna then)."""
        ray, pending, retry, running = self.ray, iter(tasks), collections.deque(), {}

        def next_task():
            return retry.popleft() if retry else next(pending, None)

        while True:
            while self.idle and (task := next_task()) is not None:
                worker = self.idle.pop()
                running[submit(worker, task)] = (task, worker, time.perf_counter())
            if not running:  # nothing left to run, or every worker is lost and none could start again
                while (task := next_task()) is not None:
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
                        retry.append(task)
                    else:
                        failed(task, why)
                    continue
                self.idle.append(worker)
                done(task, out)
            bar.set_postfix_str(slowest(running, describe), refresh=True)


def slowest(running, describe):
    """The task that has been running longest, for the progress bar."""
    if not running:
        return ""
    task, _, started = min(running.values(), key=lambda v: v[2])
    return f"slowest: {describe(task)}, {time.perf_counter() - started:.0f} s"
