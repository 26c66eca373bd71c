"""Unlearning experiments: each experiment --nexp times, mean ± std, against a gold standard.

    python main.py -L exp/classforget.json --nexp 5
    python main.py -c checkpoints/resnet18_digits_base.pt -CF 0 -M rl_split -UM -MT 0.2 -NL
    python main.py -c checkpoints/resnet18_digits_base.pt -CF 3 -M scrub -MA msteps=1 -E 3 -LR 0.01 -NL
    python main.py --resume output/20261130-101500_classforget
    python main.py -L exp/demo.json --nexp 3 -NL --executor ray --gpus-per-run 0.25
    python main.py -L exp/demo.json --nexp 1 -NL --representations

Results go to output/<run>/: config.json (the resolved experiments), results.jsonl (one
line per finished run, written as it ends), summary.csv / summary.md / summary.png (with
verdicts that hold over runs: mask_effect.csv pairs masked and unmasked runs by seed), and
per experiment the unlearned model of its last run (<name>.pt, train.py's format) and
its saliency mask (masks/<name>.pt); --save none or all keeps none or every run's.
--representations adds what the features still know (representations.py): columns in the
summaries, representations.csv and layers.png.
With --executor ray each run is a task on a Ray worker (study.py); this process
alone writes the run folder either way.
"""
import argparse
import sys
from pathlib import Path

import datasets
import plots
from executors import add_executor_flags, check_executor
from experiments import add_experiment_flags, methods_help
from representations import parse_settings, settings_help
from study import (SAVE_CHOICES, RunFolder, drop_failed, failure_lines, plan, read_results, resume_command,
                   run_local, run_on_ray)
from summary import mask_effects, note_failures, summarize, write_summary
from utils import (add_precision_flag, announce_compute, atomic_write_text, cli, compute_for, get_device,
                   parse_noting_changes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run unlearning experiments (SalUn and the methods it is compared "
                                            "with): each one --nexp times, mean ± std, against a gold standard.",
                                epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-L", "--load", help="JSON list of experiments (default: one experiment from the flags)")
    p.add_argument("--nexp", type=int, default=1, help="runs per experiment, seeds seed, seed+1, ... (default: 1)")
    add_experiment_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    add_precision_flag(p)
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR,
                   help=f"where datasets are found (default: {datasets.DEFAULT_DATA_DIR})")
    p.add_argument("--out", default="output",
                   help="folder the script writes under: <out>/<time>_<file>/ (default: output)")
    p.add_argument("--name", help="run folder name (default: <time>_<experiment file>); never reused")
    p.add_argument("--resume", help="an interrupted run folder: do the runs missing from its results (and retry "
                                    "the runs that failed)")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
    p.add_argument("--save", choices=SAVE_CHOICES, default="last",
                   help="which unlearned models and masks are kept as .pt files: last: each experiment's last "
                        "run; none: no .pt file; all: every run's, as <experiment>_run<k>.pt (default: last)")
    p.add_argument("--representations", nargs="*", metavar="KEY=VALUE",
                   help="also measure what the features still know of the forget set, per stage of the network "
                        "(linear probe, k-NN, CKA to base and gold, relearn time; representations.py): columns "
                        "in summary.csv/.md, layers.png and representations.csv. Settings: " + settings_help())
    add_executor_flags(p, "each (experiment, run) is a task on a Ray worker")
    args = parse_noting_changes(p, argv)
    args.representations = parse_settings(args.representations)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = get_device(args.device)
    check_executor(args, device)
    experiments, config = plan(args, device)
    run_dir = Path(config.get("run_dir") or args.resume)
    names, nexp = config["names"], config["nexp"]
    save = args.save if not args.resume or "--save" in args.changed else config.get("save", "last")
    compute = compute_for(device, config["precision"])
    announce_compute(compute, config["precision"])
    results_path = run_dir / "results.jsonl"
    rows = drop_failed(results_path, read_results(results_path, config["run_id"]))
    done = {(r["experiment"], r["run"]) for r in rows}
    todo = [(i, k) for i in range(len(experiments)) for k in range(nexp) if (i, k) not in done]
    print(f"run folder: {run_dir} ({len(experiments)} experiments x {nexp} runs, {len(done)} already done)")
    folder = RunFolder(run_dir, config["run_id"], names, nexp, save, rows)
    probing = config.get("representations")
    try:
        if args.executor == "ray" and todo:
            refs = run_on_ray(experiments, todo, folder, config["precision"], args, probing)
        else:
            refs = run_local(experiments, todo, folder, compute, args, probing)
    except KeyboardInterrupt:
        print(f"interrupted: {len(folder.rows)} of {len(experiments) * nexp} runs are in {results_path}; "
              f"resume with: {resume_command(run_dir, args)}", file=sys.stderr)
        sys.exit(130)
    finished = sorted((r for r in folder.rows if not r.get("failed")), key=lambda r: (r["experiment"], r["run"]))
    failed = sorted((r for r in folder.rows if r.get("failed")), key=lambda r: (r["experiment"], r["run"]))
    table = summarize(names, experiments, finished, refs)
    note_failures(table, names, experiments, failed, nexp)
    md = write_summary(run_dir, table, finished, mask_effects(names, experiments, finished))
    if failed:  # said last, where the eye ends up
        lines = "\n".join(failure_lines(failed, run_dir))
        summary_md = run_dir / "summary.md"
        atomic_write_text(summary_md, summary_md.read_text().rstrip("\n") + "\n\n" + lines + "\n")
        md += "\n\n" + lines
    if (run_dir / "masks").is_dir():
        plots.plot_masks(run_dir)
    print(md)
    print(f"results: {run_dir}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
