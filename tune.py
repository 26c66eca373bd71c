"""Tune every experiment of a list with the same trial budget, on data model selection may read.

    python tune.py -L exp/tune_digits.json --trials 20 -NL
    python tune.py -L exp/tune_digits.json --trials 20 -NL --report 3      # then 3 fresh seeds in main.py
    python tune.py --resume output/20261201-101500_tune_digits_tuning --trials 40
    python tune.py -L exp/tune_digits.json --trials 30 -NL --executor ray --cpus-per-run 1

The experiment format is main.py's; an experiment may add "search" (what is tuned: a range
[low, high], a fixed value, or null to leave a setting as the experiment has it) and
"objective" (the weights of UA, RA, VA and val_MIA). Each trial is one unlearning run with
the experiment's seed, judged on the forget set, the validation set and a sample of retain
against the gold standard (`retrained`); the test set is never read. Results go to
output/<run>/: config.json, optuna.log (the Optuna studies: --resume continues them),
tuned.json (the best settings, for main.py), tuning.md, tuning.csv and tuning/<name>.png.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import datasets
import representations
import tuning
from executors import add_executor_flags, check_executor
from experiments import add_experiment_flags, methods_help
from utils import UserError, add_precision_flag, announce_compute, cli, compute_for, get_device, parse_noting_changes

REPORT_SEED = 100  # the first seed of the report's runs: far from the seeds experiments tune on


def build_parser():
    p = argparse.ArgumentParser(description="Tune unlearning experiments with Optuna (TPE) on validation data, the "
                                            "same number of trials each; write their best settings for main.py.",
                                epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-L", "--load", help="JSON list of experiments, main.py's format, each with an optional \"search\" "
                                        "and \"objective\" (default: one experiment from the flags)")
    p.add_argument("--trials", type=int, default=20, help="trials per experiment; with --resume, a larger number "
                                                          "adds trials to the tuning (default: %(default)s)")
    p.add_argument("--retain-sample", type=int, default=tuning.RETAIN_SAMPLE,
                   help="retain samples a trial evaluates, drawn once (default: %(default)s)")
    p.add_argument("--no-prune", action="store_true", help="run every trial to its last epoch (default: Optuna's "
                                                           "median pruner stops a trial after an epoch worse than "
                                                           "the median of the trials before it)")
    p.add_argument("--report", type=int, default=0, metavar="N",
                   help="then run tuned.json in main.py, N runs per experiment on fresh seeds, into <run>/report, "
                        "keeping no model (run tuned.json in main.py for them); 0: no report (default: %(default)s)")
    p.add_argument("--report-seed", type=int, default=REPORT_SEED,
                   help="first seed of the report's runs (default: %(default)s)")
    p.add_argument("--representations", nargs="*", metavar="KEY=VALUE",
                   help="the report also measures the representations (main.py --representations, with these "
                        "settings)")
    add_experiment_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    add_precision_flag(p)
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR,
                   help="where datasets are found (default: %(default)s)")
    p.add_argument("--out", default="output",
                   help="folder the script writes under: <out>/<time>_<file>_tuning/ (default: %(default)s)")
    p.add_argument("--name", help="tuning folder name (default: <time>_<experiment file>_tuning); never reused")
    p.add_argument("--resume", help="an interrupted tuning folder: run the trials it lacks")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
    add_executor_flags(p, "each trial is a task on a Ray worker, several at once")
    return p


def parse_args(argv=None):
    args = parse_noting_changes(build_parser(), argv)
    representations.parse_settings(args.representations)  # checked here, used by the report's main.py
    return args


def report_command(run_dir, args, precision):
    """main.py on tuned.json: the tuned settings on seeds the tuning never used."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "main.py"), "-L", str(run_dir / "tuned.json"),
           "--nexp", str(args.report), "--seed", str(args.report_seed), "--out", str(run_dir), "--name", "report",
           "--precision", precision, "--data-dir", args.data_dir, "--save", "none"]
    cmd += ["-NL"] if args.no_log else []
    cmd += ["--representations", *args.representations] if args.representations is not None else []
    cmd += ["--device", args.device] if args.device else []
    if args.executor == "ray":
        cmd += ["--executor", "ray", "--cpus-per-run", f"{args.cpus_per_run:g}", "--gpus-per-run",
                f"{args.gpus_per_run:g}"] + (["--ray-address", args.ray_address] if args.ray_address else [])
    return cmd


def main(argv=None):
    args = parse_args(argv)
    if args.report < 0:
        raise UserError(f"--report must be 0 or more, got {args.report}")
    if args.representations is not None and not args.report:
        raise UserError("--representations is measured by the report: give --report N too")
    device = get_device(args.device)
    check_executor(args, device)
    tuner = tuning.plan(args, device)
    compute = compute_for(device, tuner.config["precision"])
    announce_compute(compute, tuner.config["precision"])
    if args.report and (tuner.run_dir / "report").exists():
        raise UserError(f"{tuner.run_dir / 'report'} exists: the report of this tuning ran already")
    print(f"tuning folder: {tuner.run_dir} ({len(tuner.experiments)} experiments x {tuner.config['trials']} trials)")
    try:
        studies = tuning.run(tuner, compute, args)
    except KeyboardInterrupt:
        print(f"interrupted: the finished trials are in {tuner.run_dir / 'optuna.log'}; resume with: python "
              f"{sys.argv[0] if sys.argv[0].endswith('tune.py') else 'tune.py'} --resume {tuner.run_dir}"
              + (" -NL" if args.no_log else ""), file=sys.stderr)
        sys.exit(130)
    print(tuning.write_outputs(tuner, studies))
    print(f"results: {tuner.run_dir}")
    if args.report:
        sys.exit(subprocess.run(report_command(tuner.run_dir, args, tuner.config["precision"])).returncode)


if __name__ == "__main__":
    cli(main)
