"""One audit of unlearning by the challenge's protocol: its models, their signals, both scores, its folder.

    experiments, config, run_dir = auditing.plan(args)
    rows, reference = auditing.run_audits(experiments, config, run_dir, args, device)
    text = auditing.write_outputs(run_dir, config, rows, reference)

The challenge's protocol: the audited checkpoint is the one original, unlearned N times by
the audited method (seeds seed + j), with unlearning.py's `unlearn`; each shadow is unlearned
once (its half). A method that trains a new model (`retrain`) trains N of them with
training.py's `fit`, the checkpoint's recipe at the experiment's lr, epochs and batch size.
The reference models (N gold standards, K shadows) come from references.py's pool, the
scores from privacy.py. Every audit also scores the originals before unlearning (no
unlearning): the baseline a method must beat.

Two executors compute the models, with the same numbers. The local one trains and unlearns
them one after another in this process. With --executor ray, the reference models missing
from --models-dir are trained all at once, one task each; then each audited experiment's
unlearning runs (N of the originals: the checkpoint N times, or each of N trained originals
once; one per shadow) are one task each. One worker (a Ray actor) per slot keeps the
datasets it loaded from one task to the next. Base models and splits go to the workers
through Ray's object store, each put there once per audit (the one original once for its N
runs); trained models come back as state dicts, which this process alone saves: neither
--models-dir nor the audit folder need be on storage the workers share. A task that raises
or loses its worker is tried once more (executors.Workers); since an audit cannot be scored
without every model, one that fails again stops it (executors.TaskFailed).
"""
import contextlib
import copy
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import datasets
import metrics
import plots
from datasets import ForgetSpec
from executors import EXECUTOR_FLAGS, TaskFailed, Workers, start_ray
from experiments import Experiment, experiment_names, from_args, resolve
from methods import METHODS
from models import load_model_checkpoint, model_from_config
from privacy import ATTACKS, BUCKET, chance_f, shadow_halves, thin_roc, ulira
from references import Pool, Reference, recipe_of, train_reference
from training import Recipe, fit
from unlearning import Context, timed_gradients, unlearn
from utils import (Logger, UserError, announce_compute, atomic_write_text, check_writable, compute_for,
                   default_precision, timestamp, unique_dir)


# Seeds of the reference models (initialisation and batch order), apart from every
# unlearning run's (experiment seed + j), so no two models of an audit share one.
GOLD_SEED, ORIGINAL_SEED, SHADOW_SEED, FRESH_SEED, FRESH_SHADOW_SEED = 10_000, 20_000, 30_000, 40_000, 50_000
MAX_MODELS = 1000


# ---------------------------------------------------------------- one audit

def shadow_split(ds, split, is_in):
    """The split a shadow model is unlearned on: its in-half is the forget set, and its
    out-half is held out beside the validation set, so no method (rl and ga pass over
    `train`) ever sees a sample the shadow never trained on."""
    forget = split.forget.cpu()
    held_out = torch.cat([torch.nonzero(split.in_val.cpu()).flatten(), forget[~torch.as_tensor(is_in)]])
    return datasets.make_split(ds, ForgetSpec(), val_idx=held_out.sort().values, forget_idx=forget[is_in])


class Scope:
    """What every model of an audit is measured on (the audit's split of a dataset) and how
    it is unlearned: the same here and on a Ray worker."""

    def __init__(self, ds, split, cfg, compute):
        self.ds, self.split, self.cfg, self.compute = ds, split, cfg, compute

    def phi(self, model):
        return metrics.predict(model, self.ds, self.split.forget, self.compute)["phi"].numpy()

    def evaluate(self, model):
        """RA, TA, UA and MIA-efficacy on the audit's split."""
        return metrics.report(metrics.evaluate(model, self.ds, self.split, self.compute))

    def unlearned(self, e, base, split, run_seed, fresh_seed, with_metrics):
        """`base` unlearned by experiment e on `split`: (phi on the audit's forget set, its
        metrics on the audit's split when asked), or None when the run diverged."""
        if METHODS[e.method].fresh_model:
            recipe = Recipe(self.cfg["model"], e.lr, e.epochs, e.batch_size, self.cfg.get("pretrained", False))
            model = fit(self.ds, split.retain, self.split.val, recipe, fresh_seed, self.compute, verbose=False)[0]
            return self.phi(model), self.evaluate(model) if with_metrics else None
        ctx = Context(self.ds, split, self.cfg, base, None, None, self.compute, timed_gradients)
        model, _, result = unlearn(e, ctx, run_seed, Logger(False, "", "", {}))
        if result["diverged_at"] is not None:
            return None
        return self.phi(model), result["metrics"]  # unlearn's metrics are on `split`: the audit's for targets


@dataclass
class Unlearning:
    """One unlearning run of an audited experiment: its j-th of an original, or of shadow j."""
    kind: str  # original or shadow
    j: int
    base: int  # which original or shadow it unlearns
    run_seed: int
    fresh_seed: int  # what a method that trains a new model (retrain) trains it from

    @property
    def label(self):
        return f"{self.kind} {self.j}"

    @property
    def with_metrics(self):  # only the originals' unlearned models are scored on UA, RA, TA and MIA
        return self.kind == "original"


class Local:
    """The audit's models trained and unlearned one after another in this process."""

    def references(self, pool, recipe, val, references, bar):
        """The models of `references`, from the pool or trained into it."""
        models = []
        for r in references:
            bar.set_description(f"reference models: {r.group}")
            models.append(pool.get(recipe, r.train_idx, val, r.seed, r.label))
            bar.update()
        return models

    def unlearned(self, audit, e, name, runs, bar):
        """Scope.unlearned's answer for each of `runs`."""
        outs = []
        for r in runs:
            bar.set_description(f"{name}: unlearning {r.kind}s")
            outs.append(audit.scope.unlearned(e, audit.base(r), audit.split_of(r), r.run_seed, r.fresh_seed,
                                              r.with_metrics))
            bar.update()
        return outs

    def close(self):
        pass


def trained_originals(config):
    """How many originals an audit trains: none when the checkpoint itself is the original."""
    return config["originals"] if config["originals"] > 1 else 0


class Audit:
    """The reference models of one checkpoint and forget set, their signals, and the audits on them."""

    def __init__(self, e, ckpt, ds, compute, config, executor, bar):
        cfg = ckpt["config"]
        self.n, self.attacks, self.per_sample = config["models"], config["attacks"], config["per_sample_variance"]
        self.executor, self.bar = executor, bar
        split = datasets.make_split(ds, e.spec, seed=e.split_seed, val_idx=cfg["val_idx"])
        self.scope, self.forget = Scope(ds, split, cfg, compute), split.forget
        self.pool = Pool(config["models_dir"], ds, compute, cfg)
        self.halves = shadow_halves(len(self.forget), config["shadows"], SHADOW_SEED + e.seed)
        self.shadow_splits = [shadow_split(ds, split, half) for half in self.halves]
        n, m = self.n, trained_originals(config)
        references = ([Reference("gold standards", f"gold {j}", split.retain, GOLD_SEED + j) for j in range(n)] +
                      [Reference("originals", f"original {j}", split.train, ORIGINAL_SEED + j) for j in range(m)] +
                      [Reference("shadows", f"shadow {i}", torch.cat([split.retain, self.forget[half]]).sort().values,
                                 SHADOW_SEED + i) for i, half in enumerate(self.halves)])
        models = executor.references(self.pool, recipe_of(cfg), split.val, references, bar)
        self.golds, self.originals, self.shadows = models[:n], models[n:n + m], models[n + m:]
        if not self.originals:  # the challenge's protocol: the audited checkpoint is the one original
            self.originals = [self.pool.model(ckpt["state_dict"]).eval()]
        gold_signals = [(self.scope.phi(g), self.scope.evaluate(g)) for g in self.golds]
        self.phi_retrained = np.stack([phi for phi, _ in gold_signals])
        self.gold_metrics = {k: float(np.mean([m[k] for _, m in gold_signals])) for k in ("UA", "RA", "TA", "MIA")}
        self.f_identical = chance_f(self.phi_retrained, self.attacks)

    def base(self, run):
        return (self.originals if run.kind == "original" else self.shadows)[run.base]

    def split_of(self, run):
        """An original forgets the audit's forget set; a shadow its in-half of it."""
        return self.scope.split if run.kind == "original" else self.shadow_splits[run.base]

    def run(self, e, name):
        """Audit experiment e: its unlearned models (N of the originals, one of each shadow), then both scores."""
        start = time.perf_counter()
        n = self.n
        runs = ([Unlearning("original", j, j % len(self.originals), e.seed + j, FRESH_SEED + e.seed + j)
                 for j in range(n)] +  # the one original N times, or each of N originals once
                [Unlearning("shadow", i, i, e.seed + MAX_MODELS + i, FRESH_SHADOW_SEED + e.seed + i)
                 for i in range(len(self.shadows))])
        outs = self.executor.unlearned(self, e, name, runs, self.bar)
        if any(out is None for out in outs):
            return {"diverged": True, "seconds": time.perf_counter() - start}
        targets, shadows = outs[:n], outs[n:]
        return dict(self.score([t[0] for t in targets], [s[0] for s in shadows], [t[1] for t in targets]),
                    seconds=time.perf_counter() - start)

    def baseline(self):
        """The originals and shadows as trained: what no unlearning scores. One original
        stands for N identical models, which the challenge's rules call collapsed."""
        start = time.perf_counter()
        targets = [(self.scope.phi(m), self.scope.evaluate(m)) for m in self.originals]
        targets *= self.n // len(targets)
        shadows = [self.scope.phi(m) for m in self.shadows]
        return dict(self.score([t[0] for t in targets], shadows, [t[1] for t in targets]),
                    seconds=time.perf_counter() - start)

    def score(self, phi_targets, phi_shadows, target_metrics):
        phi_u, phi_r, gold = np.stack(phi_targets), self.phi_retrained, self.gold_metrics
        eps, points, f = ATTACKS[self.attacks][0](phi_u, phi_r)
        pos, neg, lira = ulira(np.stack(phi_shadows), self.halves, phi_u, phi_r, self.per_sample)
        mean = {k: float(np.mean([m[k] for m in target_metrics])) for k in gold}
        fpr, tpr = lira.pop("roc")
        return {"F": f, "F_identical": self.f_identical,
                "score": f * mean["RA"] / gold["RA"] * mean["TA"] / gold["TA"], **lira,
                **mean, **{f"{k}_retrained": v for k, v in gold.items()},
                "samples": {"index": self.forget.tolist(), "epsilon": eps.tolist(), "points": points.tolist(),
                            "phi_unlearned": phi_u.mean(0).tolist(), "phi_retrained": phi_r.mean(0).tolist(),
                            "lira_unlearned": pos.mean(0).tolist(), "lira_retrained": neg.mean(0).tolist()},
                "roc": thin_roc(fpr, tpr)}


# ---------------------------------------------------------------- the Ray executor

class Worker:
    """One slot: trains reference models and unlearns them, keeping its datasets between tasks."""

    def __init__(self, data_dir, device, precision, threads):
        torch.set_num_threads(threads)  # as many as the driver's local runs use: the same sums, the same numbers
        self.data_dir = data_dir
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
        model, trained = train_reference(ds, self.compute, recipe, train_idx.to(ds.device), val_idx.to(ds.device),
                                         seed, label)
        return {"state_dict": cpu_state(model), "trained": trained}

    def unlearn(self, experiment, cfg, audit_split, split, base, run_seed, fresh_seed, with_metrics):
        """Scope.unlearned's answer for `base`, a state dict (None for a method that trains a new model)."""
        ds = self.dataset(cfg["dataset"])
        model = None
        if base is not None:  # one model per architecture, loaded with each task's weights: unlearn copies it
            if (cfg["model"], cfg["dataset"]) not in self.models:
                self.models[cfg["model"], cfg["dataset"]] = model_from_config(cfg, ds.device)
            model = self.models[cfg["model"], cfg["dataset"]]
            model.load_state_dict(base)
            model.eval()  # as the driver's base models are: their signals were measured before any unlearning
        scope = Scope(ds, audit_split.to(ds.device), cfg, self.compute)
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


class RayExecutor:
    """Local's two steps as Ray tasks. Ray and its workers start with the first task
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
        """Scope.unlearned's answer for each of `runs`, one task each."""
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


# ---------------------------------------------------------------- planning, running, outputs

def pool_key(e):
    return (e.checkpoint, repr(e.spec), e.split_seed)


def check_counts(n, k, originals):
    if not 3 <= n <= MAX_MODELS:
        raise UserError(f"--models must be between 3 and {MAX_MODELS} (the challenge's buckets reach "
                        f"ceil(log(N - 1)), none at N = 2; it used 512), got {n}")
    if not 4 <= k <= MAX_MODELS:
        raise UserError(f"--shadows must be between 4 and {MAX_MODELS} (U-LiRA fits a variance to the shadows "
                        f"with and to those without each sample: at least 2 of each), got {k}")
    if originals not in (1, n):
        raise UserError(f"--originals must be 1 (the checkpoint itself, the challenge's protocol) or --models "
                        f"({n}), got {originals}")


# What --resume may change: where the models compute and whether it logs, not what is audited.
RESUME_MAY_CHANGE = ("--resume", "--device", "-NL", *EXECUTOR_FLAGS)


def resume_plan(args):
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"audit folder {run_dir} not found" if not run_dir.is_dir()
                        else f"{run_dir} is not an audit folder (no config.json)")
    fixed = [f for f in args.changed if f not in RESUME_MAY_CHANGE]
    if fixed:
        raise UserError(f"--resume continues {run_dir} as it was configured; {', '.join(fixed)} would change "
                        f"it (only --device, -NL and the executor flags may be given)")
    config = json.loads((run_dir / "config.json").read_text())
    config.setdefault("attacks", "exhaustive")  # an audit from before the challenge's rules and protocol
    config.setdefault("originals", config["models"])
    check_writable(run_dir, "audit folder")
    experiments = resolve(config["experiments"], run_dir / "config.json", config["data_dir"])
    return experiments, config, run_dir


def plan(args):
    """(experiments, config, run folder): everything checked before any training."""
    if args.resume:
        return resume_plan(args)
    check_counts(args.models, args.shadows, args.originals)
    entries, where = from_args(args)
    experiments = resolve(entries, where, args.data_dir)
    problems = [p for i, e in enumerate(experiments) if e.spec.is_empty
                for p in [f"{where}: experiment {i}: forget spec: an audit needs a forget set"]]
    if problems:
        raise UserError("\n".join(problems))
    check_writable(args.out, "--out")
    check_writable(args.models_dir, "--models-dir")
    label = Path(args.load).stem if args.load else "audit"
    run_dir = unique_dir(args.out, args.name or f"{timestamp()}_{label}")
    config = {"experiments": [asdict(e) for e in experiments], "names": experiment_names(experiments),
              "models": args.models, "originals": args.originals, "shadows": args.shadows,
              "attacks": args.attacks, "per_sample_variance": args.per_sample_variance,
              "models_dir": args.models_dir, "data_dir": args.data_dir,
              "precision": args.precision or default_precision(), "run_id": uuid.uuid4().hex, "command": sys.argv}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    return experiments, config, run_dir


def read_rows(path, run_id):
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("run_id") == run_id]


def run_audits(experiments, config, run_dir, args, device):
    """Audit every experiment not yet in results.jsonl; rows in file order, each group of
    experiments on one checkpoint and forget set after its no-unlearning row."""
    compute = compute_for(device, config["precision"])
    announce_compute(compute, config["precision"])
    results_path = run_dir / "results.jsonl"
    rows = {r["index"]: r for r in read_rows(results_path, config["run_id"])}
    names, n, k, m = config["names"], config["models"], config["shadows"], trained_originals(config)
    print(f"audit folder: {run_dir} ({len(experiments)} experiments, {len(rows)} already done)")
    groups = {}
    for i, e in enumerate(experiments):
        groups.setdefault(pool_key(e), []).append(i)
    logger = Logger(not args.no_log, "salun-deepdive", run_dir.name, config)
    if args.executor == "ray":
        executor = RayExecutor(args, config["data_dir"], config["precision"], compute, n + m + k)
    else:
        executor = Local()
    ordered, seconds, loaded = [], [], {}
    with contextlib.closing(executor):
        for members in groups.values():
            e0 = experiments[members[0]]
            ckpt = load_model_checkpoint(e0.checkpoint)
            cfg = ckpt["config"]
            if cfg["dataset"] not in loaded:
                loaded[cfg["dataset"]] = datasets.load_dataset(cfg["dataset"], config["data_dir"], device)
            todo = [i for i in members if i not in rows]
            with tqdm(total=n + m + k + len(todo) * (n + k), unit="model") as bar:
                audit = Audit(e0, ckpt, loaded[cfg["dataset"]], compute, config, executor, bar)
                seconds += audit.pool.seconds
                ordered.append(dict(audit.baseline(), experiment=f"no unlearning ({e0.spec.describe()})"))
                for i in todo:
                    row = dict(audit.run(experiments[i], names[i]), experiment=names[i], index=i,
                               run_id=config["run_id"])
                    with open(results_path, "a") as f:  # one line per experiment, flushed as it ends
                        f.write(json.dumps(row) + "\n")
                    rows[i] = row
                    if not row.get("diverged"):
                        logger.log({f"{names[i]}/{m}": row[m] for m in ("F", "score", "AUC", "TPR@1%FPR")})
            ordered += [rows[i] for i in members]
    logger.finish()
    reference = {"reference_models_trained": len(seconds),
                 "seconds_per_reference_model": float(np.mean(seconds)) if seconds else None}
    return ordered, reference


COLUMNS = (("experiment", "experiment"), ("F", "F"), ("score", "final score"), ("AUC", "U-LiRA AUC"),
           ("balanced_accuracy", "U-LiRA balanced accuracy"), ("TPR@1%FPR", "TPR@1%FPR"),
           ("TPR@0.1%FPR", "TPR@0.1%FPR"), ("UA", "UA"), ("RA", "RA"), ("TA", "TA"), ("MIA", "MIA-efficacy"),
           ("seconds", "seconds"))


def table(rows):
    md = ["| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["experiment"]] + [("diverged" if r.get("diverged") else
                                      f"{r[k]:.3f}" if k in ("F", "score") else f"{r[k]:.1f}") if k in r else ""
                                     for k, _ in COLUMNS[1:]]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md)


def write_outputs(run_dir, config, rows, reference):
    done = [r for r in rows if not r.get("diverged")]
    summary = [{k: v for k, v in r.items() if k not in ("samples", "roc", "run_id")} for r in rows]
    n, attacks = config["models"], config["attacks"]
    buckets = ATTACKS[attacks][1](n)
    ceilings = sorted({r["F_identical"] for r in done if "F_identical" in r})  # one per checkpoint and forget set
    head = {"models": n, "originals": config["originals"], "shadows": config["shadows"], "attacks": attacks,
            "per_sample_variance": config["per_sample_variance"], "buckets": buckets,
            "F_identical": ceilings[0] if len(ceilings) == 1 else None, **reference}
    atomic_write_text(run_dir / "audit.json", json.dumps({**head, "experiments": summary}, indent=2))
    lines = [f"Per-example audit, {attacks} rules: N = {n} gold standards and N unlearned models per "
             f"experiment ({protocol(config)}), K = {config['shadows']} shadows. A forget sample scores 2^-b "
             f"for an epsilon in bucket b of width {BUCKET} ({buckets} buckets at N = {n}; "
             + ("0 points past the last" if attacks == "official" else "the last one a perfect separation")
             + f"); F is their mean. Models distributed as the gold standards score F = "
             f"{' or '.join(f'{c:.3f}' for c in ceilings) or 'n/a'} here (chance finds some epsilon; from the "
             f"gold standards' phi). U-LiRA AUC and balanced accuracy 50: unlearned models indistinguishable "
             f"from retrained ones.", "",
             table(rows)]
    atomic_write_text(run_dir / "audit.md", "\n".join(lines) + "\n")
    csv = ["experiment,index,epsilon,points,phi_unlearned,phi_retrained,lira_unlearned,lira_retrained"]
    for r in done:
        s = r["samples"]
        csv += [f"{r['experiment']},{i},{e},{p},{a:.4f},{b:.4f},{c:.4f},{d:.4f}" for i, e, p, a, b, c, d in
                zip(s["index"], s["epsilon"], s["points"], s["phi_unlearned"], s["phi_retrained"],
                    s["lira_unlearned"], s["lira_retrained"])]
    atomic_write_text(run_dir / "samples.csv", "\n".join(csv) + "\n")
    if done:
        plots.plot_epsilons(run_dir / "epsilon.png", done, n, attacks)
        plots.plot_rocs(run_dir / "roc.png", done)
    return "\n".join(lines)


def protocol(config):
    if config["originals"] == 1:
        return "the checkpoint unlearned N times"
    return "N originals trained with the checkpoint's recipe, each unlearned once"
