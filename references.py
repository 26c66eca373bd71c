"""An audit's reference models: trained with training.py's `fit` and the checkpoint's recipe, kept in a pool.

    pool = references.Pool("checkpoints/audit", ds, compute, base_config)
    model = pool.get(references.recipe_of(base_config), train_idx, val_idx, seed, "gold 3")

N gold standards on retain and K shadows on retain + a random half of the forget set (and,
with audit.py --originals N, N originals on train). Each is a checkpoint under --models-dir
named by a hash of what it was trained on (recipe, precision, validation set, training
indices, seed), so another audit that needs the same model loads it instead of training it.
A model trained on a Ray worker (auditing.py) is saved here by the driver alone.
"""
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import datasets
from datasets import ForgetSpec
from models import load_model_checkpoint, model_from_config
from training import Recipe, fit
from utils import save_checkpoint


@dataclass
class Reference:
    """A reference model of an audit: trained with the checkpoint's recipe on `train_idx` from `seed`."""
    group: str  # for the progress bar: gold standards, originals or shadows
    label: str  # "gold 3": kept in its checkpoint's config
    train_idx: torch.Tensor
    seed: int


def recipe_of(cfg):
    return Recipe(cfg["model"], cfg["lr"], cfg["epochs"], cfg["batch_size"], cfg.get("pretrained", False))


def model_key(recipe, compute, val_idx, train_idx, seed):
    """What a model was trained on and how, as a hash: its file name under --models-dir."""
    what = {**asdict(recipe), "precision": compute.precision, "seed": seed,
            "val": hashlib.sha256(np.asarray(val_idx, np.int64).tobytes()).hexdigest(),
            "train": hashlib.sha256(train_idx.cpu().numpy().astype(np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16], what


def train_reference(ds, compute, recipe, train_idx, val_idx, seed, label):
    """A reference model trained with training.fit, and what its checkpoint records of the
    training: the same whether it trained here or on a Ray worker."""
    start = time.perf_counter()
    model, stem, result = fit(ds, train_idx, val_idx, recipe, seed, compute, name=label, verbose=False)
    return model, {"stem": stem, "metrics": {k: v for k, v in result.items() if k != "history"},
                   "seconds": time.perf_counter() - start, "compute": compute.describe()}


class Pool:
    """Trained models, looked up by what they were trained on, trained and saved when missing."""

    def __init__(self, folder, ds, compute, base_config):
        self.folder, self.ds, self.compute, self.base = Path(folder), ds, compute, base_config
        self.seconds = []  # of each model trained for it

    def path(self, recipe, train_idx, seed):
        """(the model's file, what it was trained on)."""
        key, what = model_key(recipe, self.compute, self.base["val_idx"], train_idx, seed)
        return self.folder / f"{recipe.model}_{self.base['dataset']}_{key}.pt", what

    def load(self, recipe, train_idx, seed):
        """The model from the folder, or None when it has not been trained."""
        path, what = self.path(recipe, train_idx, seed)
        if path.is_file():
            ckpt = load_model_checkpoint(path)
            if ckpt["config"].get("trained_on") == what:
                return self.model(ckpt["state_dict"])
        return None

    def model(self, state_dict):
        model = model_from_config(self.base, self.ds.device)
        model.load_state_dict(state_dict)
        return model

    def save(self, recipe, train_idx, seed, label, state_dict, trained):
        """A model that `train_reference` trained, into the folder."""
        path, what = self.path(recipe, train_idx, seed)
        self.seconds.append(trained["seconds"])
        left_out = ~datasets.as_flags(self.base["val_idx"], self.base["n_train"])
        left_out[train_idx.cpu()] = False
        config = dict(self.base, **asdict(recipe), seed=seed, stem=trained["stem"], method="audit reference",
                      trained_on=what, metrics=trained["metrics"], audit_label=label,
                      forget=ForgetSpec().to_config(), forget_idx=torch.nonzero(left_out).flatten().tolist(),
                      **trained["compute"])
        save_checkpoint(path, state_dict, config)

    def get(self, recipe, train_idx, val_idx, seed, label):
        model = self.load(recipe, train_idx, seed)
        if model is None:
            model, trained = train_reference(self.ds, self.compute, recipe, train_idx, val_idx, seed, label)
            self.save(recipe, train_idx, seed, label, model.state_dict(), trained)
        return model
