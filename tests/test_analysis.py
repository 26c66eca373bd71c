"""Latent-space and mask analysis: feature_extraction.py, tsne_vis.py, wasserstein.py, mask_vis.py."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

import datasets
import feature_extraction
import latent
import mask_vis
import plots
import tsne_vis
import utils
import wasserstein
from conftest import run_script
from methods import Run, saliency_mask
from models import load_model
from utils import cli, compute_for, make_generator, save_mask

SAMPLES = 300


def exit_code(main, argv, capsys):
    """Run a script's main through utils.cli in this process: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        cli(lambda: main(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def work(tmp_path_factory, ckpts):
    """A working folder with ckpt/: the session's tiny base model and its model without class 0."""
    tmp = tmp_path_factory.mktemp("analysis")
    (tmp / "ckpt").mkdir()
    for name in ("base", "gold"):
        shutil.copy(ckpts[name], tmp / "ckpt")
    return tmp


@pytest.fixture(scope="module")
def extracted(work):
    r = run_script("feature_extraction.py", "-D", "ckpt", "-S", SAMPLES, cwd=work)
    assert r.returncode == 0, r.stderr
    return work / "features" / "ckpt"


# ---------------------------------------------------------------- feature extraction

def test_features_shapes_and_samples(extracted):
    files = sorted(extracted.glob("*.json"))
    assert [f.stem for f in files] == ["test_resnet_digits_base", "test_resnet_digits_cf0"]
    y = datasets.load_dataset("digits").y_train[:SAMPLES]
    for f in files:
        d = json.loads(f.read_text())
        feats, proto = np.array(d["all_features"]), np.array(d["proto"])
        assert feats.shape[0] == SAMPLES and proto.shape == (10, feats.shape[1])
        assert d["all_labels"] == y.tolist()  # the first S training samples, in order, for each
        assert d["dataset"] == "digits" and d["model"] == "test_resnet" and len(d["classes"]) == 10
    base, cf0 = (json.loads(f.read_text()) for f in files)
    assert base["forget"] == {} and base["forget_idx"] == []
    assert cf0["forget"] == {"class_to_forget": 0}
    val = set(utils.load_checkpoint(extracted.parents[1] / "ckpt" / "test_resnet_digits_cf0.pt")["config"]["val_idx"])
    assert cf0["forget_idx"] == [i for i in torch.nonzero(y == 0).flatten().tolist() if i not in val]
    assert not np.allclose(base["all_features"], cf0["all_features"])


def test_features_identical_across_runs(work, extracted, monkeypatch):
    """Also when a second folder shares the process: each checkpoint's file is the same."""
    monkeypatch.chdir(work)
    (work / "other").mkdir()
    shutil.copy(work / "ckpt" / "test_resnet_digits_cf0.pt", work / "other" / "gold.pt")
    feature_extraction.main(["-D", "ckpt", "other", "-S", str(SAMPLES), "--out", "again"])
    for f in extracted.glob("*.json"):
        assert (work / "again" / "ckpt" / f.name).read_bytes() == f.read_bytes()
    gold = json.loads((work / "again" / "other" / "gold.json").read_text())
    assert gold.pop("checkpoint") == "other/gold.pt"
    same = json.loads((extracted / "test_resnet_digits_cf0.json").read_text())
    same.pop("checkpoint")
    assert gold == same


def test_features_bad_folders(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, err = exit_code(feature_extraction.main, ["-D", "empty"], capsys)
    assert code == 2 and len(err) == 1 and "no checkpoints" in err[0]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(work / "ckpt" / "test_resnet_digits_base.pt", mixed / "a.pt")  # a good one comes first
    torch.save({"weights": torch.zeros(3)}, mixed / "b.pt")
    code, err = exit_code(feature_extraction.main, ["-D", "mixed", "-S", "50"], capsys)
    assert code == 2 and len(err) == 1 and "b.pt" in err[0]
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(work / "ckpt" / "test_resnet_digits_base.pt", good)
    code, err = exit_code(feature_extraction.main, ["-D", "good", "mixed", "-S", "50"], capsys)
    assert code == 2 and len(err) == 1 and "b.pt" in err[0]  # nothing written for the good folder either
    assert not (tmp_path / "features").exists()


# ---------------------------------------------------------------- synthetic features

def synthetic(path, forget, shift=0.0, n_per_class=20, seed=0):
    """Three well-separated Gaussian classes in 6-d, written as feature_extraction does."""
    rng = np.random.default_rng(seed)
    centers = np.eye(3, 6) * 10
    labels = np.repeat(np.arange(3), n_per_class)
    feats = centers[labels] + rng.normal(size=(len(labels), 6)) + shift
    c = forget.get("class_to_forget")
    record = {"model": "toy", "dataset": "toy", "classes": ["ant", "bee", "cat"], "num_samples": len(labels),
              "forget": forget, "forget_idx": np.flatnonzero(labels == c).tolist() if c is not None else [],
              "all_features": feats.tolist(), "all_labels": labels.tolist(), "proto": centers.tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_tsne_vis_writes_plots(tmp_path):
    synthetic(tmp_path / "features/toy/base.json", {})
    synthetic(tmp_path / "features/toy/unl.json", {"class_to_forget": 1}, seed=1)
    synthetic(tmp_path / "features/toy2/unl2.json", {"class_to_forget": 1}, shift=1.0, seed=2)
    # One t-SNE thread: on a 2-core machine with other work running, openTSNE's two threads wait
    # on each other (126 s against 13 s here); the plots are what this test is about.
    r = run_script("tsne_vis.py", "-S", 50, "--proto", "--jobs", 1, "--folders", "features/toy", "features/toy2",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "t-SNE of 2 file(s) that forgot class 1 (bee)" in r.stdout  # embedded jointly
    for folder, stem in (("toy", "base"), ("toy", "unl"), ("toy2", "unl2")):
        for kind, ext in (("tsne_2D", "png"), ("tsne_3D", "png"), ("tsne_animated", "gif")):
            assert (tmp_path / "images" / folder / kind / f"{stem}.{ext}").stat().st_size > 1000


def test_latent_space_scripts_read_every_features_folder_by_default(work, extracted):
    """Right after feature_extraction.py, tsne_vis.py and wasserstein.py need only -S."""
    for script in ("tsne_vis.py", "wasserstein.py"):
        r = run_script(script, "-S", SAMPLES, cwd=work)
        assert r.returncode == 0, r.stderr
    for stem in ("test_resnet_digits_base", "test_resnet_digits_cf0"):
        for kind, ext in (("tsne_2D", "png"), ("tsne_animated", "gif"), ("wasserstein", "json")):
            assert (work / "images" / "ckpt" / kind / f"{stem}.{ext}").is_file()


def test_embed_shape_and_seed():
    x = np.random.default_rng(0).normal(size=(40, 5))
    y2, y3 = latent.embed(x, (2, 3), seed=1)
    assert y2.shape == (40, 2) and y3.shape == (40, 3)
    assert np.array_equal(y3, latent.embed(x, (3,), seed=1)[0])


def read_matrix(path):
    return np.array(json.loads(path.read_text())["matrix"], dtype=float)


def test_wasserstein_writes_matrices_and_zero_delta(tmp_path):
    unl = "01_rl_mask0.2_class-1"  # a dotted stem, as main.py names experiments
    synthetic(tmp_path / "features/toy/base.json", {})
    synthetic(tmp_path / f"features/toy/{unl}.json", {"class_to_forget": 1}, seed=1)
    shutil.copytree(tmp_path / "features/toy", tmp_path / "features/same")
    r = run_script("wasserstein.py", "-S", 50, "--folders", "features/toy", "features/same", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "images/toy/wasserstein"
    assert len(list(out.iterdir())) == 6
    for stem in ("base", unl):
        assert all((out / f"{stem}.{ext}").is_file() for ext in ("png", "csv", "json"))
        m = read_matrix(out / f"{stem}.json")
        assert m.shape == (3, 3) and np.allclose(m, m.T) and np.all(np.diag(m) == 0)
        assert np.all(m[~np.eye(3, dtype=bool)] > 5)  # the classes lie ~14 apart
        with open(out / f"{stem}.csv") as f:
            assert next(csv.reader(f)) == ["class", "ant", "bee", "cat"]
    # same stems pair up: a folder against its copy changes nothing
    deltas = sorted((tmp_path / "images/same/wasserstein/vs_toy").glob("*.json"))
    assert [d.name for d in deltas] == [f"{unl}_minus_{unl}.json", "base_minus_base.json"]
    assert all(np.all(read_matrix(d) == 0) for d in deltas)


def test_delta_pairing(tmp_path):
    for stem, forget in (("base", {}), ("ret", {"class_to_forget": 1}), ("other", {"class_to_forget": 2})):
        synthetic(tmp_path / "a" / f"{stem}.json", forget)
    synthetic(tmp_path / "b/unl.json", {"class_to_forget": 1})
    synthetic(tmp_path / "b/other.json", {"class_to_forget": 2})
    a = [latent.read_features(p) for p in sorted((tmp_path / "a").glob("*.json"))]
    unl, other = (latent.read_features(tmp_path / f"b/{s}.json") for s in ("unl", "other"))
    # no file of the same name: the base model and the one that forgot the same thing
    assert sorted(f.stem for f in wasserstein.partners(unl, a)) == ["base", "ret"]
    assert [f.stem for f in wasserstein.partners(other, a)] == ["other"]  # the same name wins


def test_ot_distance_known_answers():
    assert latent.ot_distance([[0.0, 0.0]], [[3.0, 4.0]]) == pytest.approx(5.0)
    a = np.random.default_rng(0).normal(size=(30, 4))
    v = np.array([1.0, -2.0, 0.5, 2.0])
    assert latent.ot_distance(a, a + v) == pytest.approx(np.linalg.norm(v))
    assert latent.ot_distance(a, a) == pytest.approx(0.0, abs=1e-12)


def test_class_distances_symmetric_zero_diagonal():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 3], 10)  # class 2 has no sample
    d = latent.class_distances(rng.normal(size=(30, 4)) + labels[:, None], labels, 4)
    assert np.allclose(d[[0, 1, 3]][:, [0, 1, 3]], d[[0, 1, 3]][:, [0, 1, 3]].T)
    assert np.all(np.diag(d)[[0, 1, 3]] == 0) and np.isnan(d[2]).all()
    assert d[0, 3] > d[0, 1] > 0


def test_bad_features_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    synthetic(tmp_path / "features/toy/a.json", {})
    (tmp_path / "features/toy/b.json").write_text('{"all_features": [[1, 2]]}')
    for main in (tsne_vis.main, wasserstein.main):
        code, err = exit_code(main, ["--folders", "features/toy"], capsys)
        assert code == 2 and len(err) == 1 and "b.json" in err[0]
    (tmp_path / "features/toy/b.json").write_text("{not json")
    code, err = exit_code(wasserstein.main, ["--folders", "features/toy"], capsys)
    assert code == 2 and len(err) == 1 and "not valid JSON" in err[0]
    code, err = exit_code(tsne_vis.main, ["--folders", "features/nowhere"], capsys)
    assert code == 2 and len(err) == 1 and "not found" in err[0]
    assert not (tmp_path / "images").exists()


def test_unwritable_output_folders_stop_before_any_compute(work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    synthetic(tmp_path / "features/toy/a.json", {})
    for main, args in ((tsne_vis.main, ["--folders", "features/toy"]),
                       (wasserstein.main, ["--folders", "features/toy"]),
                       (feature_extraction.main, ["-D", str(work / "ckpt"), "-S", "10"])):
        code, err = exit_code(main, [*args, "--out", "/proc/salun"], capsys)
        assert code == 2 and err == ["error: --out /proc/salun is not writable (No such file or directory in /proc)"]


# ---------------------------------------------------------------- saliency masks

def save_masks(work, run_dir, experiments):
    """Masks as main.py saves them, computed by methods.saliency_mask on a real checkpoint."""
    model, _ = load_model(work / "ckpt" / "test_resnet_digits_base.pt", "cpu")
    ds = datasets.load_dataset("digits")
    for name, cls, thr in experiments:
        split = datasets.make_split(ds, datasets.ForgetSpec(class_to_forget=cls), seed=0)
        run = Run(ds, split, 256, make_generator(0, ds.device), compute_for(torch.device("cpu")))
        mask = saliency_mask(model, run, thr)
        experiment = {"class_to_forget": cls, "unlearning_rate": None, "idxs_to_forget": None,
                      "method": "rl_split", "use_mask": True, "mask_thr": thr}
        save_mask(run_dir / "masks" / f"{name}.pt", mask.keep,
                        {"name": name, "experiment": experiment, "kept_fraction": mask.kept_fraction})


def test_mask_vis_writes_plots(work, tmp_path):
    save_masks(work, tmp_path, [("cf0_thr0.5", 0, 0.5), ("cf0_thr0.2", 0, 0.2), ("cf3_thr0.5", 3, 0.5)])
    r = run_script("mask_vis.py", tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("mask_layers.png", "mask_overlap.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with open(tmp_path / "mask_overlap.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["mask", "cf0_thr0.2", "cf0_thr0.5", "cf3_thr0.5"]
    m = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1)
    # the 0.2 mask keeps the top of the same ranking as the 0.5 one: |A & B| / |A | B| = 0.2 / 0.5
    assert m[0, 1] == pytest.approx(0.4, abs=1e-3)


def test_mask_vis_draws_identical_masks_once(work, tmp_path):
    # the mask does not depend on the method: same checkpoint, forget set and threshold
    save_masks(work, tmp_path, [("a_thr0.5", 0, 0.5), ("b_thr0.5", 0, 0.5), ("c_thr0.2", 0, 0.2)])
    groups = plots.distinct(plots.read_masks(tmp_path))
    assert [label for _, label in groups] == [
        "2 identical masks (forgets class 0, thr 0.5): a_thr0.5, b_thr0.5",
        "c_thr0.2: forgets class 0, rl_split, thr 0.2"]
    assert plots.plot_masks(tmp_path)[0].stat().st_size > 1000


def test_mask_vis_single_mask_and_bad_input(work, tmp_path, capsys):
    save_masks(work, tmp_path, [("only", 0, 0.5)])
    assert plots.plot_masks(tmp_path) == [tmp_path / "mask_layers.png"]
    assert plots.plot_masks(tmp_path / "nothing_here") == []
    code, err = exit_code(mask_vis.main, [str(tmp_path / "nothing_here")], capsys)
    assert code == 2 and len(err) == 1
