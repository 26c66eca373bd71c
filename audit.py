"""Per-example privacy audit of unlearning: the NeurIPS 2023 challenge score and U-LiRA.

    python audit.py -L exp/audit_demo.json --models 32 -NL
    python audit.py -c checkpoints/resnet18_digits_base.pt -CF 3 -M rl -E 2 -LR 0.01 --models 16 -NL
    python audit.py --resume output/20261201-031500_audit_demo -NL
    python audit.py -L exp/audit_demo.json --models 32 -NL --executor ray

Population attacks (MIA-efficacy, loss-MIA) fit one classifier for all samples; these two
look at each forget sample across many models, as Hayes et al. (2024, "Inexact unlearning
needs more careful evaluations to avoid a false sense of privacy") do: N gold standards
and K shadows trained with the checkpoint's recipe (references.py, kept under --models-dir
and reused by any audit that needs the same model), the checkpoint unlearned N times by the
audited method (the challenge's protocol, auditing.py), and both scores from the signal phi
of every forget sample in every model (privacy.py).

Two deviations, opt-in and not the challenge's: --attacks exhaustive scores every single
threshold in both directions, without grid, intervals or collapsed rule, a perfect
separation in a last bucket of its own (this toolkit's earlier rules); --originals N trains
N originals with the checkpoint's recipe and unlearns each once, which adds their training
noise to the unlearned side and costs N trainings. An audit keeps both choices on --resume.

Every audit also scores the originals before unlearning ("no unlearning"): the baseline a
method must beat (with the one original, N identical models: a collapsed side, 0 points).
Results go to output/<time>_<file>/: config.json, results.jsonl (one line per experiment,
written as it ends; --resume skips those), audit.json, audit.md, samples.csv (per forget
sample and experiment), epsilon.png and roc.png.

With --executor ray each reference model to train and each unlearning run is a task on a Ray
worker (auditing.py), with the local executor's numbers; this process alone reads and
writes --models-dir and the audit folder either way.
"""
import argparse
import sys
import time

import datasets
from auditing import plan, run_audits, write_outputs
from executors import TaskFailed, add_executor_flags, check_executor
from experiments import add_experiment_flags, methods_help
from privacy import ATTACKS, challenge  # noqa: F401  audit.challenge: the challenge score, for outside checks
from utils import add_precision_flag, cli, get_device, parse_noting_changes


def build_parser():
    p = argparse.ArgumentParser(description="Per-example privacy audit of unlearning methods: the NeurIPS "
                                            "2023 unlearning-challenge score and U-LiRA.",
                                epilog=methods_help(), formatter_class=Formatter)
    p.add_argument("-L", "--load", default=None, help="JSON list of experiments to audit (main.py's format); "
                                                      "None: one experiment from the flags")
    p.add_argument("--models", type=int, default=32,
                   help="N: gold standards (trained on retain), and unlearned models per method")
    p.add_argument("--attacks", choices=tuple(ATTACKS), default="official",
                   help="official: the challenge's scorer (single thresholds and intervals on a grid of 100 per "
                        "unit of phi, epsilon 50 for a collapsed side, 0 points past the last bucket); "
                        "exhaustive, not the challenge's: every single threshold in both directions, no "
                        "intervals, a perfect separation scored in a last bucket of its own")
    p.add_argument("--originals", type=int, default=1,
                   help="1: the checkpoint itself is the original, unlearned N times with seeds seed + j (the "
                        "challenge's protocol); N (= --models), not the challenge's: N originals trained with "
                        "the checkpoint's recipe, each unlearned once, which adds their training noise to the "
                        "unlearned side and costs N trainings")
    p.add_argument("--shadows", type=int, default=16,
                   help="K >= 4: shadow models for U-LiRA, each trained on retain and a random half of the "
                        "forget set (every sample in K/2 of them)")
    p.add_argument("--per-sample-variance", action="store_true",
                   help="fit U-LiRA's variances per sample instead of one per side shared by all samples")
    p.add_argument("--models-dir", default="checkpoints/audit",
                   help="where reference models are kept and looked up, named by what they were trained on")
    add_experiment_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    add_precision_flag(p)
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR, help="where datasets are found")
    p.add_argument("--out", default="output", help="folder the script writes under: <out>/<time>_<file>/")
    p.add_argument("--name", default=None, help="run folder name; None: <time>_<experiment file>")
    p.add_argument("--resume", default=None, help="an interrupted audit folder: audit the experiments "
                                                  "missing from its results")
    p.add_argument("-NL", "--no-log", action="store_true", help="do not log to wandb")
    add_executor_flags(p, "each reference model to train and each unlearning run is a task on a Ray worker")
    return p


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in -h, and the methods epilog kept as written. The experiment flags are None
    unless given (the file's value stands) and say their own default."""

    def _get_help_string(self, action):
        if action.default is None and "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    return parse_noting_changes(build_parser(), argv)


def main_(argv=None):
    args = parse_args(argv)
    start = time.time()
    device = get_device(args.device)
    check_executor(args, device)
    experiments, config, run_dir = plan(args)
    kept = (f"finished experiments are in {run_dir / 'results.jsonl'}, reference models in "
            f"{config['models_dir']}; continue with: python audit.py --resume {run_dir}")
    try:
        rows, reference = run_audits(experiments, config, run_dir, args, device)
    except KeyboardInterrupt:
        print(kept, file=sys.stderr)
        raise
    except TaskFailed as err:  # an audit cannot be scored without every model
        print(f"error: {err}; {kept}", file=sys.stderr)
        sys.exit(1)
    text = write_outputs(run_dir, config, rows, reference)
    print(text)
    trained = reference["reference_models_trained"]
    each = f", {reference['seconds_per_reference_model']:.1f} s each" if trained else ""
    print(f"{trained} reference models trained{each}; {time.time() - start:.0f} s in all; results: {run_dir}")


if __name__ == "__main__":
    cli(main_)
