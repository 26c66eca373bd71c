"""audit.py's Ray executor: each reference model to train and each unlearning run is a task.

    python audit.py -L exp/audit_demo.json --models 32 -NL --executor ray
    python audit.py -L exp/audit_demo.json --models 32 -NL --executor ray --gpus-per-run 0.25

The reference models missing from --models-dir are trained all at once, one task each; then
each audited experiment's unlearning runs (N of the originals: the checkpoint N times, or
each of N trained originals once; one per shadow) are one task each. One worker (a Ray
actor) per slot keeps the datasets it loaded from one task to the next. Base models and
splits go to the workers through Ray's object store, each put there once per audit (the one
original once for its N runs); trained models come back as state dicts, which this process alone saves: neither
--models-dir nor the audit folder need be on storage the workers share. A task that raises
or loses its worker is tried once more (ray_executor.Workers); since an audit cannot be
scored without every model, one that fails again stops it (ray_executor.TaskFailed).

A module of its own, as ray_executor.py is, because Ray finds the worker class on each
worker by importing it by name.
"""
import copy
from dataclasses import asdict, dataclass

import torch

import datasets
from main import Experiment
from methods import METHODS
from models import model_from_config
from ray_executor import TaskFailed, Workers, start_ray
from utils import UserError, compute_for


class Worker:
    """One slot: trains reference models and unlearns them, keeping its datasets between tasks."""

    def __init__(self, data_dir, device, precision, threads):
        import audit  # audit.py as a module here: the worker runs its training and unlearning
        torch.set_num_threads(threads)  # as many as the driver's local runs use: the same sums, the same numbers
        self.audit, self.data_dir = audit, data_dir
        self.compute = compute_for(torch.device(device), precision)
        self.datasets, self.models = {}, {}

    def ready(self):
        """What it trains in: the driver names the reference models it saves by that."""
        return self.compute.precision

    def dataset(self, name):
        if name not in self.datasets:
            self.datasets[name] = datasets.load_dataset(name, self.data_dir, self.compute.device)
        return self.datasets[name]

    def train(self, dataset, recipe, train_idx, val_idx, seed, label):
        """A reference model's weights (on the CPU) and what its checkpoint records of the training."""
        ds = self.dataset(dataset)
        model, trained = self.audit.train_reference(ds, self.compute, recipe, train_idx.to(ds.device),
                                                    val_idx.to(ds.device), seed, label)
        return {"state_dict": cpu_state(model), "trained": trained}

    def unlearn(self, experiment, cfg, audit_split, split, base, run_seed, fresh_seed, with_metrics):
        """audit.Scope.unlearned's answer for `base`, a state dict (None for a method that trains a new model)."""
        ds = self.dataset(cfg["dataset"])
        model = None
        if base is not None:  # one model per architecture, loaded with each task's weights: unlearn copies it
            if (cfg["model"], cfg["dataset"]) not in self.models:
                self.models[cfg["model"], cfg["dataset"]] = model_from_config(cfg, ds.device)
            model = self.models[cfg["model"], cfg["dataset"]]
            model.load_state_dict(base)
            model.eval()  # as the driver's base models are: their signals were measured before any unlearning
        scope = self.audit.Scope(ds, audit_split.to(ds.device), cfg, self.compute)
        return scope.unlearned(Experiment(**experiment), model, split.to(ds.device), run_seed, fresh_seed,
                               with_metrics)


def cpu_state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def cpu_split(split):
    return copy.copy(split).to("cpu")  # a copy: Split.to moves its tensors in place


@dataclass
class Task:
    i: int  # position in the list of references or of unlearning runs
    attempts: int = 0


class Executor:
    """audit.Local's two steps as Ray tasks. Ray and its workers start with the first task
    (an audit whose models are all in --models-dir and whose experiments are done starts
    neither) and stop at close()."""

    def __init__(self, args, data_dir, precision, compute, wanted):
        self.args, self.compute, self.wanted = args, compute, wanted
        self.init = (data_dir, "cuda" if args.gpus_per_run > 0 else "cpu", precision, max(1, int(args.cpus_per_run)))
        self.ray = self.workers = None
        self.shared = {}

    def start(self):
        if self.workers is None:
            self.ray = start_ray(self.args.ray_address)
            self.workers = Workers(self.ray, Worker, self.args.cpus_per_run, self.args.gpus_per_run, self.init,
                                   self.wanted)
            theirs = sorted(set(self.workers.started.values()))
            if theirs != [self.compute.precision]:  # a reference model's file is named by its precision
                raise UserError(f"the Ray workers train in {', '.join(theirs)}, this machine in "
                                f"{self.compute.precision}: give --precision fp32 or bf16")
        return self.workers

    def close(self):
        if self.ray is not None:
            self.ray.shutdown()

    def where(self, what):
        return f"{what} (ray, {len(self.workers.started)} workers)"

    def references(self, pool, recipe, val, references, bar):
        """The models of `references`: those in the pool loaded, the others trained one task
        each and saved into the pool as they come back."""
        self.shared = {}  # a new audit: the last one's models and splits leave the object store
        models = [pool.load(recipe, r.train_idx, r.seed) for r in references]
        bar.update(sum(m is not None for m in models))
        missing = [Task(i) for i, m in enumerate(models) if m is None]
        if not missing:
            return models
        workers, dataset, val = self.start(), pool.base["dataset"], val.cpu()
        bar.set_description(self.where("reference models"))

        def submit(worker, task):
            r = references[task.i]
            return worker.train.remote(dataset, recipe, r.train_idx.cpu(), val, r.seed, r.label)

        def done(task, out):
            r = references[task.i]
            pool.save(recipe, r.train_idx, r.seed, r.label, out["state_dict"], out["trained"])
            models[task.i] = pool.model(out["state_dict"])
            bar.update()

        def failed(task, why):
            raise TaskFailed(f"reference model {references[task.i].label} failed ({task.attempts} attempts): {why}")

        workers.run(missing, submit, done, failed, lambda task: f"reference model {references[task.i].label}", bar)
        return models

    def put(self, key, make):
        """make() in Ray's object store, once per audit: each base model and split travels once."""
        if key not in self.shared:
            self.shared[key] = self.ray.put(make())
        return self.shared[key]

    def unlearned(self, audit, e, name, runs, bar):
        """audit.Scope.unlearned's answer for each of `runs`, one task each."""
        workers = self.start()
        bar.set_description(self.where(f"{name}: unlearning"))
        experiment, fresh, outs = asdict(e), METHODS[e.method].fresh_model, [None] * len(runs)
        cfg = self.put("cfg", lambda: audit.scope.cfg)
        audit_split = self.put("split", lambda: cpu_split(audit.scope.split))

        def submit(worker, task):
            r = runs[task.i]
            split = audit_split if r.kind == "original" else \
                self.put(("split", r.kind, r.base), lambda: cpu_split(audit.split_of(r)))
            base = None if fresh else self.put(("base", r.kind, r.base), lambda: cpu_state(audit.base(r)))
            return worker.unlearn.remote(experiment, cfg, audit_split, split, base, r.run_seed, r.fresh_seed,
                                         r.with_metrics)

        def done(task, out):
            outs[task.i] = out
            bar.update()

        def failed(task, why):
            raise TaskFailed(f"{name}: unlearning {runs[task.i].label} failed ({task.attempts} attempts): {why}")

        workers.run([Task(i) for i in range(len(runs))], submit, done, failed,
                    lambda task: f"{name}: unlearning {runs[task.i].label}", bar)
        return outs
