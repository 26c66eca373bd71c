"""Where SalUn's saliency masks keep weights: per layer, and how much two masks agree.

    python mask_vis.py output/20261130-101500_classforget

Reads <run>/masks/*.pt, the masks main.py saves (one per masked experiment, one bit per
weight; `utils.load_mask(path)` gives back ({parameter: bool tensor}, config with "name",
"experiment", "kept_fraction")), and writes into the run folder:

    mask_layers.png    kept fraction of every parameter, in model order (top), and of
                       every stage, weighted by entries (bottom); one colour per
                       distinct mask (identical ones are drawn once, named together)
    mask_overlap.png   Jaccard index of the kept entries of every two masks
    mask_overlap.csv   the same numbers (both only when there are two or more masks)

main.py draws the same plots at its end (plots.plot_masks).
"""
import argparse
from pathlib import Path

from plots import plot_masks
from utils import UserError, check_writable, cli


def build_parser():
    p = argparse.ArgumentParser(description="Plots of the saliency masks of a main.py run folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a main.py run folder, e.g. output/20261130-101500_classforget")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise UserError(f"run folder {args.run_dir} not found")
    if not any((Path(args.run_dir) / "masks").glob("*.pt")):
        raise UserError(f"no masks in {Path(args.run_dir) / 'masks'}; main.py saves one per "
                        f"experiment with use_mask")
    check_writable(args.run_dir, "run folder")
    for path in plot_masks(args.run_dir):
        print(path)


if __name__ == "__main__":
    cli(main)
