"""`biomass pseudo`: pseudo-labels per fold, train + test tokens in one training set, honest OOF, a submit member."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from biomass_cache.cli import app
from biomass_cache.submit.pseudo import NOTES
from biomass_cache.common.targets import TARGETS, components_to_targets, to_density

TINY = dict(depth=2, embed_dim=64, num_heads=2)
N_TRAIN, N_TEST = 24, 6


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Synthetic data -> tiny random ViT train cache -> two 2-fold runs (density, mlp) sharing their folds."""
    from biomass_cache.train.crossval import run_training
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.synth.generate import generate
    from biomass_cache.train.config import resolve

    root = tmp_path_factory.mktemp("pseudo")
    data = root / "data"
    generate(data, n_train=N_TRAIN, n_test=N_TEST, seed=0, size=(128, 64), progress=False)
    cache = root / "train.zarr"
    extract(ExtractConfig(data_dir=data, split="train", out=cache, backbone="vit_small_patch16_dinov3",
                          weights="random", size=(64, 32), layers=[0, 1], views=2, seed=0, device="cpu",
                          overrides=TINY), progress=False)
    settings = dict(folds=2, epochs=2, batch_size=8, device="cpu", workers=0, pcgrad=False, plots=False)
    runs = []
    for head in ("density", "mlp"):
        cfg, heads = resolve({}, [], settings, [head])
        run_training(cache, data, root / head, cfg, heads, folds_csv=runs[0] / "folds.csv" if runs else None)
        runs.append(root / head)
    return root, data, runs


def image_ids(csv):
    from biomass_cache.common.data import read_long_csv

    return read_long_csv(csv, check_images=False)["image_id"].tolist()


def fold_of(run):
    return pd.read_csv(run / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]


def by_hand(checkpoints, store, ids):
    """The members' test predictions averaged in component space, from the checkpoints and the test store alone."""
    from biomass_cache.train.inference import predict_store
    from biomass_cache.train.runs import load_head

    rows = [store.image_ids.index(i) for i in ids]
    comps = [predict_store(*load_head(p), store, rows, views="all").grams[:, :3] for p in checkpoints]
    return components_to_targets(np.mean(comps, axis=0))


def labels_of(spec, data, runs, work):
    from biomass_cache.common.data import read_training_table
    from biomass_cache.common.folds import read_folds
    from biomass_cache.submit.pseudo import predict_labels

    table = read_training_table(data / "train.csv", check_images=False)
    folds = read_folds(runs[0] / "folds.csv", table)
    return table, folds, predict_labels(spec, table, folds, data, work, "cpu", None, None, progress=False)


@pytest.mark.slow
def test_fold_k_labels_come_from_the_members_fold_k_models(members, tmp_path):
    from biomass_cache.submit.spec import spec_from_options

    root, data, runs = members
    _, _, labels = labels_of(spec_from_options(None, ",".join(map(str, runs))), data, runs, tmp_path)
    assert labels.mode == "per-fold" and labels.image_ids == image_ids(data / "test.csv")
    for k in range(2):
        expected = by_hand([runs[0] / f"fold{k}" / "density.json", runs[1] / f"fold{k}" / "mlp.json"], labels.store,
                           labels.image_ids)
        np.testing.assert_allclose(labels.by_fold[k], expected, rtol=1e-9)
    assert not np.allclose(labels.by_fold[0], labels.by_fold[1])

    other = tmp_path / "other"  # the mlp run with its folds renamed 0 <-> 1: not the first member's folds
    shutil.copytree(runs[1], other)
    folds = pd.read_csv(other / "folds.csv")
    folds.assign(fold=1 - folds["fold"]).to_csv(other / "folds.csv", index=False)
    for a, b in (("fold0", "tmp"), ("fold1", "fold0"), ("tmp", "fold1")):
        (other / a).rename(other / b)
    _, _, mixed = labels_of(spec_from_options(None, f"{runs[0]},{other}"), data, runs, tmp_path)
    assert mixed.mode == "ensemble"
    whole = (by_hand([runs[0] / f"fold{k}" / "density.json" for k in range(2)], mixed.store, mixed.image_ids)
             + by_hand([other / f"fold{k}" / "mlp.json" for k in range(2)], mixed.store, mixed.image_ids)) / 2
    for k in range(2):
        np.testing.assert_allclose(mixed.by_fold[k], whole, rtol=1e-9)


@pytest.mark.slow
def test_training_batches_hold_the_fold_rows_and_every_test_image_at_its_weight(members, tmp_path):
    from biomass_cache.train.crossval import cache_source
    from biomass_cache.train.dataset import AuxSpec
    from biomass_cache.submit.spec import spec_from_options
    from biomass_cache.submit.pseudo import pseudo_source
    from biomass_cache.store.layout import open_store
    from biomass_cache.train.config import resolve

    root, data, runs = members
    table, folds, labels = labels_of(spec_from_options(None, str(runs[0])), data, runs, tmp_path)
    cfg, heads = resolve({}, [], dict(folds=2, batch_size=8, device="cpu", workers=0), ["density"])
    source = pseudo_source(cache_source(open_store(root / "train.zarr"), table, cfg, heads), labels, folds, 0.25, cfg)
    for k in range(2):
        tr = np.flatnonzero(folds != k)
        batches = list(source.train_loader(tr, 7, AuxSpec.fit(table, tr)))
        weight = np.concatenate([b["weight"].numpy() for b in batches])
        y = np.concatenate([b["y"].numpy() for b in batches])
        index = np.concatenate([b["index"].numpy() for b in batches])
        assert sorted(weight.tolist()) == [0.25] * N_TEST + [1.0] * len(tr)
        assert sorted(index[weight == 1].tolist()) == tr.tolist()
        pseudo = to_density(labels.by_fold[k])  # the left-out fold's labels, not the other fold's
        order = np.argsort(index[weight == 0.25])
        np.testing.assert_allclose(y[weight == 0.25][order], pseudo, rtol=1e-6)
        assert not np.allclose(y[weight == 0.25][order], to_density(labels.by_fold[1 - k]), rtol=1e-3)


@pytest.mark.slow
def test_pseudo_end_to_end_gives_an_honest_run_and_a_submit_member(members, tmp_path):
    from biomass_cache.submit.spec import spec_from_options
    from biomass_cache.submit.ensemble import submit

    root, data, runs = members
    out, work = tmp_path / "pseudo", tmp_path / "work"
    args = ["pseudo", "--data", data, "--members", f"{runs[0]},{runs[1]}", "--out", out, "--rounds", 2,
            "--weight", 0.5, "--work-dir", work]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    train_ids, test_ids = image_ids(data / "train.csv"), set(image_ids(data / "test.csv"))
    for run_dir, r in ((out / "rounds" / "round1", 1), (out, 2)):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        pseudo = metrics["pseudo"]
        assert (pseudo["round"], pseudo["rounds"], pseudo["weight"], pseudo["n_test"], pseudo["n_train"],
                pseudo["labels"]) == (r, 2, 0.5, N_TEST, N_TRAIN, "per-fold")
        assert pseudo["note"] == NOTES["per-fold"] and "training images only" in pseudo["note"]
        assert pseudo["labelled_by"] == ([str(runs[0]), str(runs[1])] if r == 1 else [str(out / "rounds" / "round1")])
        assert json.loads((run_dir / "config.json").read_text())["pseudo"] == pseudo
        oof = pd.read_csv(run_dir / "oof.csv")
        assert oof["image_id"].tolist() == train_ids and oof[list(TARGETS)].notna().all().all()
        assert metrics["n_images"] == N_TRAIN == sum(f["n_images"] for f in metrics["folds"].values())
        assert fold_of(run_dir).to_dict() == fold_of(runs[0]).to_dict()  # no test image in any fold
    assert not test_ids & set(fold_of(out).index)
    assert len(list((work / "cache").glob("test-*.zarr"))) == 1  # one test cache, shared by the rounds

    _, sub = submit(spec_from_options(None, str(out)), data, tmp_path / "submission.csv", work_dir=work,
                    progress=False)
    assert len(sub) == len(pd.read_csv(data / "test.csv"))
    assert len(list((work / "cache").glob("test-*.zarr"))) == 1

    again = CliRunner().invoke(app, [str(a) for a in args])  # a finished run is refused, not overwritten
    assert again.exit_code == 2 and "already holds a training run" in again.output


@pytest.mark.parametrize("change, message", [
    (("--members", "/no/such/run"), "error: member /no/such/run: not a run folder or a head checkpoint"),
    (("--weight", "0"), "error: --rounds must be >= 1 and --weight a number > 0, got 1 and 0.0"),
])
def test_bad_options_are_one_error_line(tmp_path, change, message):
    args = {"--data": tmp_path / "data", "--members": tmp_path / "run", "--out": tmp_path / "out",
            "--work-dir": tmp_path}
    args[change[0]] = change[1]
    result = CliRunner().invoke(app, ["pseudo", *[str(x) for kv in args.items() for x in kv]])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out" / "metrics.json").exists()
