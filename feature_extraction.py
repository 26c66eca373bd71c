"""Penultimate embeddings, labels and class prototypes of every checkpoint in a folder.

    python feature_extraction.py -D reduced/base/ -S 5000
    python feature_extraction.py -D output/20261130-101500_classforget -S 1000 --device cpu
    python feature_extraction.py -D checkpoints output/20261130-101500_classforget -S 1000

For every <folder>/*.pt (train.py's and main.py's checkpoints alike; subfolders such as
a run's masks/ are not read) this writes features/<folder>/<checkpoint stem>.json with

    all_features  S x D  penultimate embeddings: timm's forward_features, then
                         forward_head(pre_logits=True), so any timm family works
    all_labels    S      their labels
    proto         C x D  class prototypes: the rows of the classifier's weight
    forget, forget_idx   the checkpoint's forget spec, and its forgotten training
                         indices among the S samples
    dataset, model, classes, checkpoint, num_samples

The samples are the first S of the dataset's official training split, in order, for
every checkpoint: files of different checkpoints compare sample by sample, and a
sample's position in the file is its training index. A relative folder is mirrored
as given; an absolute one outside the current directory loses only its leading "/"
(-D /tmp/ana/base -> features/tmp/ana/base).

The file's writer and its reader (tsne_vis.py and wasserstein.py load features through
it) are latent.py's.

With --representations, every checkpoint main.py saved (its config names the experiment,
and so its base model and gold standard) is also measured after the fact as main.py
--representations measures it (representations.py: probe, k-NN, CKA, relearn time, per
stage, with the mask's share per stage from <folder>/masks/): representations.md,
representations.csv and layers.png next to the features files.

    python feature_extraction.py -D output/demo --representations
"""
import argparse
import json
from pathlib import Path

from tqdm import tqdm

import datasets
import representations
from experiments import Experiment
from latent import FEATURES_ROOT, SAMPLES, SAMPLES_HELP, embed_samples, features_record, prototypes, relative_name
from models import load_model
from summary import measured_row, reference_rows, write_representations
from utils import (UserError, atomic_write_text, check_writable, cli, compute_for, get_device, load_checkpoint,
                   load_mask)


CONFIG_KEYS = ("model", "dataset", "num_classes", "in_chans", "img_size")


def build_parser():
    p = argparse.ArgumentParser(description="Embeddings, labels and class prototypes of every "
                                            "checkpoint (<folder>/*.pt) in a folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-D", "--directory", required=True, nargs="+", default=argparse.SUPPRESS,
                   help="folder(s) of checkpoints, e.g. reduced/base/")
    p.add_argument("-S", "--samples", type=int, default=SAMPLES, help=SAMPLES_HELP + ", embedded")
    p.add_argument("-B", "--batch-size", type=int, default=500, help="samples per forward pass")
    p.add_argument("-W", "--num-workers", type=int, default=0,
                   help="accepted for compatibility and ignored: batches are cut from tensors "
                        "already in memory, there is no DataLoader")
    p.add_argument("--data-dir", default=datasets.DEFAULT_DATA_DIR, help="dataset download folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; None: cuda when available")
    p.add_argument("--out", default=FEATURES_ROOT,
                   help="folder the script writes under: <out>/<checkpoint folder>/<stem>.json")
    p.add_argument("--representations", nargs="*", metavar="KEY=VALUE",
                   help="also measure the representations of main.py's checkpoints against their base and gold "
                        "models, as main.py --representations does. Settings: " + representations.settings_help())
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.representations = representations.parse_settings(args.representations)
    return args


def checkpoint_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} not found")
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise UserError(f"no checkpoints (*.pt) in {folder}")
    return files


def check_checkpoints(files, data_dir, device, models):
    """Everything that can be wrong, before any file is written: each .pt must be a
    checkpoint whose weights fit its model and whose dataset loads."""
    data = {}
    for path in files:
        config = load_checkpoint(path)["config"]
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise UserError(f"{path} is not a SalUn DeepDive checkpoint (config lacks {', '.join(missing)})")
        if config["dataset"] not in data:
            data[config["dataset"]] = datasets.load_dataset(config["dataset"], data_dir, device)
        model, _ = load_model(path, device, models)
        prototypes(model)
    return data


def unlearned(files):
    """{path: Experiment} of main.py's checkpoints among `files` (train.py's name no experiment)."""
    out = {}
    for path in files:
        config = load_checkpoint(path)["config"]
        if isinstance(config.get("experiment"), dict):
            e = Experiment(**config["experiment"])
            for role, ref in (("base model", e.checkpoint), ("gold standard", e.retrained)):
                if ref and not Path(ref).is_file():
                    raise UserError(f"{path}: its {role} {ref} is not found (paths are relative to where main.py ran)")
            out[path] = e
    return out


def measure_folder(folder, found, out_dir, settings, data, device, models):
    """The representations of main.py's checkpoints in one folder, against their base and gold models."""
    table, probes = [], {}
    for path, e in found.items():
        model, config = load_model(path, device, models)
        ds = data[config["dataset"]]
        key = (e.checkpoint, e.retrained, json.dumps(config["forget_idx"]))
        if key not in probes:
            base, base_config = load_model(e.checkpoint, device)
            split = datasets.make_split(ds, e.spec, seed=e.split_seed, val_idx=base_config["val_idx"],
                                        forget_idx=config["forget_idx"])
            gold = load_model(e.retrained, device)[0] if e.retrained else None
            probes[key] = representations.Probe(ds, split, settings, base, gold)
            table += reference_rows(e, None, None, probes[key].references)
        mask_path = Path(folder) / "masks" / path.name
        keep = load_mask(mask_path)[0] if mask_path.is_file() else None
        table.append(measured_row(path.stem, e, probes[key].measure(model, keep)))
    print(write_representations(out_dir, table))
    print(f"representations of {len(found)} checkpoints in {out_dir}")


def main(argv=None):
    args = parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        raise UserError("-S/--samples and -B/--batch-size must be positive")
    device = get_device(args.device)
    compute = compute_for(device, "fp32")
    folders = {folder: checkpoint_files(folder) for folder in dict.fromkeys(args.directory)}
    models = {}  # one built model per architecture, reloaded per checkpoint
    data = check_checkpoints([f for files in folders.values() for f in files], args.data_dir, device, models)
    found = {folder: unlearned(files) for folder, files in folders.items()} if args.representations else {}
    if args.representations and not any(found.values()):
        raise UserError("--representations measures main.py's checkpoints (they name their base and gold models); "
                        f"none in {', '.join(folders)}")
    check_writable(args.out, "--out")
    for ds in data.values():
        if len(ds.y_train) < args.samples:
            print(f"{ds.name} has {len(ds.y_train)} training samples; embedding all of them")
    for folder, files in folders.items():
        out_dir = Path(args.out) / relative_name(folder)
        for path in tqdm(files, desc="checkpoints", unit="ckpt"):
            model, config = load_model(path, device, models)
            ds = data[config["dataset"]]
            n = min(args.samples, len(ds.y_train))
            feats = embed_samples(model, ds, n, args.batch_size, compute)
            record = features_record(path, config, ds, feats, prototypes(model), n)
            atomic_write_text(out_dir / f"{path.stem}.json", json.dumps(record))
        print(f"features of {len(files)} checkpoints in {out_dir}")
        if found.get(folder):
            measure_folder(folder, found[folder], out_dir, args.representations, data, device, models)


if __name__ == "__main__":
    cli(main)
