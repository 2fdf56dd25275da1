import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from toys import PIPELINE_VIT

from biomass_cache.common.errors import ConfigError, EnsembleError
from biomass_cache.common.targets import components_to_targets
from biomass_cache.submit.aggregate import fit_weights, inverse_variance_mean, oof_scores, weighted_mean
from biomass_cache.submit.members import resolve_member
from biomass_cache.submit.spec import EnsembleSpec, Member, load_ensemble, parse_member, spec_from_options


def five(comps):
    return components_to_targets(np.asarray(comps, dtype=np.float64))


def check_identities(y):
    np.testing.assert_allclose(y[:, 3], y[:, 0] + y[:, 2], rtol=1e-12)
    np.testing.assert_allclose(y[:, 4], y[:, 0] + y[:, 1] + y[:, 2], rtol=1e-12)


def test_weighted_mean_in_component_space():
    a, b = five([[1.0, 2.0, 3.0], [0.0, 4.0, 8.0]]), five([[3.0, 0.0, 1.0], [4.0, 4.0, 0.0]])
    out = weighted_mean([a, b], [3.0, 1.0])  # weights are normalised: 0.75 / 0.25
    np.testing.assert_allclose(out[:, :3], [[1.5, 1.5, 2.5], [1.0, 4.0, 6.0]])
    check_identities(out)
    np.testing.assert_allclose(weighted_mean([a, b], [1, 1]), (a + b) / 2)
    with pytest.raises(ValueError, match="non-negative weights"):
        weighted_mean([a, b], [1.0, -1.0])


def test_inverse_variance_hand_case():
    a, b = five([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]), five([[8.0, 8.0, 8.0], [8.0, 8.0, 8.0]])
    # image 0: var 1 vs 3 -> weights 3/4, 1/4 -> 3.5; image 1: var 4 vs 4 -> equal -> 5
    out = inverse_variance_mean([a, b], np.array([[1.0, 4.0], [3.0, 4.0]]))
    np.testing.assert_allclose(out[:, :3], [[3.5] * 3, [5.0] * 3])
    check_identities(out)
    zero = inverse_variance_mean([a, b], np.array([[0.0, 4.0], [3.0, 4.0]]))  # a certain member dominates
    np.testing.assert_allclose(zero[0, :3], 2.0, rtol=1e-9)


def test_fit_weights_prefers_the_better_member_on_the_simplex():
    rng = np.random.default_rng(0)
    truth = five(rng.gamma(2.0, 10.0, size=(200, 3)))
    good = five(np.clip(truth[:, :3] + rng.normal(0, 2, (200, 3)), 0, None))
    bad = five(np.clip(truth[:, :3] + rng.normal(0, 12, (200, 3)), 0, None))
    w = fit_weights([bad, good], truth)
    assert w.shape == (2,) and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[1] > 0.8
    scores = oof_scores([bad, good], truth, w)
    assert scores["ensemble"] >= max(scores["members"]) - 1e-9
    # inverse-variance optimum for independent errors: w_good ~ 144 / (144 + 4) ~ 0.97
    assert w[1] == pytest.approx(144 / 148, abs=0.03)


def test_ensemble_file(tmp_path):
    path = tmp_path / "ens.toml"
    path.write_text('aggregation = "oof"\n[weights]\nvit_small_patch16_dinov3 = "/w.pth"\n'
                    '[[member]]\npath = "runs/a"\n[[member]]\npath = "runs/b"\nweight = 2\nhead = "mlp"\n')
    spec = load_ensemble(path)
    assert spec.aggregation == "oof" and spec.weights_files == {"vit_small_patch16_dinov3": "/w.pth"}
    assert [(str(m.path), m.weight, m.head) for m in spec.members] == [("runs/a", 1.0, None), ("runs/b", 2.0, "mlp")]
    path.write_text('[[member]]\npath = "runs/a"\nwieght = 2\n')
    with pytest.raises(ConfigError, match=r"ens.toml: member #1 has unknown key\(s\) \['wieght'\]"):
        load_ensemble(path)
    path.write_text('aggregation = "median"\n[[member]]\npath = "runs/a"\n')
    with pytest.raises(ConfigError, match="ens.toml: unknown aggregation 'median'"):
        load_ensemble(path)


# ------------------------------------------------------ a real tiny pipeline (conftest's `pipeline`, shared below)
@pytest.mark.slow
def test_members_cached_and_caches_reused(pipeline, monkeypatch, tmp_path):
    import biomass_cache.submit.ensemble as ens
    import biomass_cache.submit.members as members_module

    root, data, run = pipeline
    spec = EnsembleSpec((Member(run, head="density"), Member(run, head="mlp")))
    calls = {"extract": 0, "predict": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(members_module, "extract", counting("extract", members_module.extract))
    monkeypatch.setattr(ens, "predict_cache_member", counting("predict", ens.predict_cache_member))
    first = ens.run_ensemble(spec, data, tmp_path, progress=False)
    assert calls == {"extract": 1, "predict": 2}  # one backbone setting -> one test cache for both members
    assert len(set(first.caches)) == 1 and first.caches[0].parent == tmp_path / "cache"
    stamp = {p: p.stat().st_mtime_ns for p in first.caches[0].rglob("*") if p.is_file()}
    again = ens.run_ensemble(EnsembleSpec(spec.members, aggregation="oof"), data, tmp_path, progress=False)
    assert calls == {"extract": 1, "predict": 2}  # nothing extracted or predicted again
    assert {p: p.stat().st_mtime_ns for p in first.caches[0].rglob("*") if p.is_file()} == stamp
    np.testing.assert_array_equal(again.member_grams[0], first.member_grams[0])
    w = again.weights
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert again.report["oof"]["ensemble"] >= max(again.report["oof"]["members"].values()) - 1e-9
    for result in (first, again):
        check_identities(result.grams)
        assert np.isfinite(result.grams).all() and (result.grams >= 0).all()


@pytest.mark.slow
def test_mc_dropout_weights(pipeline, tmp_path):
    import biomass_cache.submit.ensemble as ens

    root, data, run = pipeline
    spec = EnsembleSpec((Member(run, head="density"), Member(run, head="mlp")),
                            aggregation="mc_dropout", mc_samples=4)
    result = ens.run_ensemble(spec, data, tmp_path, progress=False)
    var = [pd.read_csv(p)["mc_variance_g2"].to_numpy() for p in result.member_files if "-mc4-" in p.name]
    assert len(var) == 2 and all((v > 0).all() for v in var)
    np.testing.assert_allclose(result.grams, inverse_variance_mean(result.member_grams, np.stack(var)), rtol=1e-9)
    assert result.weights.sum() == pytest.approx(1.0)
    check_identities(result.grams)


@pytest.mark.slow
def test_head_that_does_not_fit_the_cache_is_refused(pipeline, tmp_path):
    import shutil

    import biomass_cache.submit.ensemble as ens

    root, data, run = pipeline
    other = tmp_path / "run"
    shutil.copytree(run, other)
    ckpt = other / "fold0" / "mlp.json"
    meta = json.loads(ckpt.read_text())
    meta["fingerprint"]["size"] = [128, 64]  # as if trained on a cache of another image size
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(EnsembleError, match=r"fold0/mlp.json does not fit the test cache .*test-.*\.zarr.*"
                                            r"size: \[128, 64\] -> \[64, 32\]"):
        ens.run_ensemble(EnsembleSpec((Member(other, head="mlp"),)), data, tmp_path, progress=False)


@pytest.mark.slow
def test_submit_and_predict_end_to_end(pipeline, tmp_path):
    from biomass_cache.submit.ensemble import submit
    from biomass_cache.submit.predict import predict_photos
    from biomass_cache.submit.submission import score

    root, data, run = pipeline
    spec = spec_from_options(None, f"{run}", None)  # a sweep run folder needs `head`: refused
    best = json.loads((run / "metrics.json").read_text())["best"]
    with pytest.raises(EnsembleError, match=rf"several heads \['density', 'mlp'\]; say which: --members {run}:{best} "
                                            r"\(the run's best\)"):
        submit(spec, data, tmp_path / "submission.csv", progress=False)
    ens_file = tmp_path / "ens.toml"
    ens_file.write_text(f'[[member]]\npath = "{run}"\nhead = "density"\n[[member]]\npath = "{run}"\nhead = "mlp"\n')
    assert spec_from_options(None, f"{run}:density,{run}:mlp") == spec_from_options(ens_file, None)
    submit(spec_from_options(ens_file, None), data, tmp_path / "submission.csv", progress=False)
    scores = score(tmp_path / "submission.csv", data / "test_labels.csv")
    assert scores["competition_r2"] > 0
    table = predict_photos(data / "test", spec_from_options(ens_file, None), tmp_path / "pred.csv", tmp_path,
                           maps=True, progress=False)
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert len(table) == len(sub) // 5
    np.testing.assert_allclose(table["Dry_Total_g_per_m2"] * 0.21, table["Dry_Total_g"], rtol=1e-12)
    pngs = sorted((tmp_path / "pred_maps").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(table["image_id"])


@pytest.mark.slow
def test_the_run_folder_finds_its_weights_file(pipeline, tmp_path):
    """Real weights: the file's absolute path travels store -> config.json -> submission (no --weights needed)."""
    from safetensors.torch import save_file

    from biomass_cache.backbone.vit import create_backbone
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.store.layout import open_store
    from biomass_cache.submit.ensemble import submit
    from biomass_cache.train.config import resolve
    from biomass_cache.train.crossval import run_training

    _, data, _ = pipeline
    weights = tmp_path / "w.safetensors"
    save_file(create_backbone("vit_small_patch16_dinov3", "random", seed=3, overrides=PIPELINE_VIT).model.state_dict(), weights)
    cache = tmp_path / "train.zarr"
    extract(ExtractConfig(data_dir=data, split="train", out=cache, weights=str(weights), size=(64, 32), layers=[1],
                          views=1, device="cpu", overrides=PIPELINE_VIT), progress=False)
    assert open_store(cache).weights_path == str(weights.resolve())
    cfg, members = resolve({}, [], dict(folds=2, epochs=1, device="cpu", workers=0, aux=False), ["mlp"])
    run_training(cache, data, tmp_path / "run", cfg, members)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache"]["weights_path"] == str(weights.resolve())
    _, sub = submit(spec_from_options(None, str(tmp_path / "run")), data, tmp_path / "s.csv", progress=False)
    assert len(sub) == len(pd.read_csv(data / "test.csv"))  # one row per sample_id
    weights.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(EnsembleError, match=r"w.safetensors for vit_small_patch16_dinov3 not found.*--weights"):
        submit(spec_from_options(None, str(tmp_path / "run")), data, tmp_path / "new" / "s.csv", progress=False)


def test_mc_dropout_refuses_a_head_without_dropout():
    import biomass_cache.heads as heads
    from biomass_cache.common.errors import DataError
    from biomass_cache.common.targets import ZScore
    from biomass_cache.train.inference import enable_mc_dropout

    rng = np.random.default_rng(0)
    zscore = ZScore.fit(components_to_targets(rng.gamma(2.0, 20.0, (16, 3))))

    def make(**kw):
        return heads.create_head("density", n_layers=1, channels=8, grid=(2, 2), zscore=zscore, **kw)

    with pytest.raises(DataError, match="member density: the head has no dropout with p > 0"):
        enable_mc_dropout(make(), "member density")  # the density head's default: no dropout
    head = make(dropout=0.1)
    enable_mc_dropout(head, "member density")
    assert any(m.training for m in head.modules() if isinstance(m, torch.nn.Dropout))


# ------------------------------------------------------- caches keyed by content, complete run folders only
def _photos(src, folder, rotate: int):
    """The test photos under their own names, or (rotate=1) each name holding the next image's photo."""
    import shutil

    folder.mkdir()
    photos = sorted(src.glob("*.jpg"))
    for k, p in enumerate(photos):
        shutil.copy(photos[(k + rotate) % len(photos)], folder / p.name)
    return folder


@pytest.mark.slow
def test_predict_other_photos_under_the_same_names_is_not_answered_from_the_cache(pipeline, tmp_path):
    from biomass_cache.submit.predict import predict_photos

    _, data, run = pipeline
    spec = ens_spec(run)
    a = predict_photos(_photos(data / "test", tmp_path / "a", 0), spec, tmp_path / "a.csv", tmp_path / "work",
                       progress=False)
    b = predict_photos(_photos(data / "test", tmp_path / "b", 1), spec, tmp_path / "b.csv", tmp_path / "work",
                       progress=False)
    fresh = predict_photos(tmp_path / "b", spec, tmp_path / "f.csv", tmp_path / "fresh", progress=False)
    assert list(a["image_id"]) == list(b["image_id"])
    np.testing.assert_array_equal(b["Dry_Total_g"], fresh["Dry_Total_g"])
    np.testing.assert_array_equal(b["Dry_Total_g"].to_numpy(), np.roll(a["Dry_Total_g"].to_numpy(), -1))


@pytest.mark.slow
def test_submit_with_a_changed_photo_and_a_reused_work_dir(pipeline, tmp_path):
    import shutil

    from biomass_cache.common.errors import DataError
    from biomass_cache.submit.ensemble import submit

    _, data, run = pipeline
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    out = tmp_path / "submission.csv"
    submit(ens_spec(run), copy, out, progress=False)
    first = out.read_bytes()
    photo = sorted((copy / "test").glob("*.jpg"))[0]
    photo.write_bytes(photo.read_bytes()[:300])  # corrupt
    with pytest.raises(DataError, match=rf"{photo.name}: corrupt or truncated image"):
        submit(ens_spec(run), copy, out, progress=False)
    assert out.read_bytes() == first  # nothing written
    shutil.copy(sorted((copy / "test").glob("*.jpg"))[1], photo)  # another photo under the old name
    submit(ens_spec(run), copy, out, progress=False)
    assert out.read_bytes() != first


def ens_spec(run):


    return EnsembleSpec((Member(run, head="density"),))


@pytest.mark.slow
def test_incomplete_run_folder_is_refused(pipeline, tmp_path):
    import shutil

    _, data, run = pipeline
    other = tmp_path / "run"
    shutil.copytree(run, other)
    (other / "fold1" / "density.json").unlink()
    with pytest.raises(EnsembleError, match=r"incomplete run: density.json/.safetensors missing in \['fold1'\]"):
        resolve_member(Member(other, head="density"), {})
    (other / "metrics.json").unlink()  # interrupted: no metrics.json yet
    with pytest.raises(EnsembleError, match=r"the run did not finish \(no metrics.json\)"):
        resolve_member(Member(other, head="mlp"), {})
    single = resolve_member(Member(other / "fold0" / "density.json"), {})  # one checkpoint: explicit
    assert single.checkpoints == (other / "fold0" / "density.json",)
    full = resolve_member(Member(run, head="density"), {})
    assert [p.parent.name for p in full.checkpoints] == ["fold0", "fold1", "fold2"]


@pytest.mark.slow
def test_retraining_into_a_run_folder_refuses_or_overwrites(pipeline, tmp_path):
    import shutil

    from biomass_cache.common.errors import DataError
    from biomass_cache.train.config import resolve
    from biomass_cache.train.crossval import run_training

    root, data, run = pipeline
    out = tmp_path / "run"
    shutil.copytree(run, out)
    folds = (out / "folds.csv").read_bytes()
    cfg, members = resolve({}, [], dict(folds=3, epochs=1, device="cpu", workers=0, plots=False), ["density"])
    with pytest.raises(DataError, match=r"already holds a training run .*--overwrite"):
        run_training(root / "train.zarr", data, out, cfg, members)
    assert sorted(p.name for p in (out / "fold0").iterdir()) == sorted(p.name for p in (run / "fold0").iterdir())
    run_training(root / "train.zarr", data, out, cfg, members, overwrite=True)
    assert sorted(p.name for p in (out / "fold0").iterdir()) == ["density.json", "density.safetensors"]
    assert (out / "folds.csv").read_bytes() == folds and not (out / "oof_mlp.csv").exists()


@pytest.mark.slow
def test_submit_refuses_a_member_with_a_collapsed_fold(pipeline, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from biomass_cache.cli.errors import script_app
    from biomass_cache.cli.submit import submit_command

    root, data, run = pipeline
    assert all(h["collapsed"] == [] for h in json.loads((run / "metrics.json").read_text())["heads"].values())
    other = tmp_path / "run"
    shutil.copytree(run, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["heads"]["mlp"]["collapsed"] = [{"fold": "fold1", "targets": ["Dry_Total_g"]}]
    (other / "metrics.json").write_text(json.dumps(metrics))
    app = script_app(submit_command)  # as `submit.py` runs it: user errors are one line, exit 2
    ens_file = tmp_path / "ens.toml"
    ens_file.write_text(f'[[member]]\npath = "{other}"\nhead = "density"\n[[member]]\npath = "{other}"\n'
                        f'head = "mlp"\n')
    args = ["--data", str(data), "--ensemble", str(ens_file), "--out", str(tmp_path / "s.csv"), "--work-dir",
            str(root / "work")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and not (tmp_path / "s.csv").exists()
    assert result.output.startswith("error: member ") and "head mlp fold1 predicts a constant for Dry_Total_g" in \
        result.output and "--allow-collapsed" in result.output and "Traceback" not in result.output
    single = CliRunner().invoke(app, [*args[:2], "--members", str(other / "fold0" / "mlp.json"), *args[4:]])
    assert single.exit_code == 0, single.output  # fold0 alone did not collapse
    allowed = CliRunner().invoke(app, [*args, "--allow-collapsed"])
    assert allowed.exit_code == 0 and (tmp_path / "s.csv").is_file(), allowed.output


@pytest.mark.slow
def test_an_ensemble_of_two_backbones(pipeline, tmp_path):
    """Members trained on caches of two different tiny backbones (widths 64 and 32): each gets its own test cache."""
    import biomass_cache.submit.ensemble as ens
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.train.config import resolve
    from biomass_cache.train.crossval import run_training

    root, data, run = pipeline
    narrow = dict(depth=1, embed_dim=32, num_heads=2)
    cache = tmp_path / "narrow.zarr"
    extract(ExtractConfig(data_dir=data, split="train", out=cache, backbone="vit_small_patch16_dinov3",
                          weights="random", size=(64, 32), layers=[0], views=1, seed=1, device="cpu",
                          overrides=narrow), progress=False)
    cfg, members = resolve({}, [], dict(folds=3, epochs=2, device="cpu", workers=0), ["density"])
    run_training(cache, data, tmp_path / "run", cfg, members, folds_csv=run / "folds.csv")
    spec = EnsembleSpec((Member(run, head="density"), Member(tmp_path / "run")))
    result = ens.run_ensemble(spec, data, tmp_path / "work", progress=False)
    assert len(set(result.caches)) == 2
    assert sorted(open_store_channels(p) for p in set(result.caches)) == [32, 64]
    np.testing.assert_allclose(result.grams, np.mean(result.member_grams, axis=0), rtol=1e-9)
    check_identities(result.grams)


def open_store_channels(path) -> int:
    from biomass_cache.store.layout import open_store

    return open_store(path).channels


def test_the_example_ensemble_file_documents_only_keys_the_loader_takes():
    """The member keys configs/ensemble_example.toml documents and uses are the ones load_ensemble accepts."""
    import re
    from pathlib import Path

    from biomass_cache.submit.spec import MEMBER_KEYS

    path = Path(__file__).resolve().parents[1] / "configs" / "ensemble_example.toml"
    assert len(load_ensemble(path).members) == 2
    text = path.read_text()
    documented = re.search(r"^# Allowed keys: ([a-z_, ]+)\.", text, flags=re.M).group(1).split(", ")
    used = re.findall(r"^([a-z_]+) =", text[text.index("[[member]]"):], flags=re.M)
    assert set(documented) == MEMBER_KEYS and set(used) <= MEMBER_KEYS


@pytest.mark.slow
def test_test_caches_take_the_training_precision_unless_overridden(pipeline, tmp_path, capsys):
    import biomass_cache.submit.ensemble as ens
    from biomass_cache.store.layout import open_store

    root, data, run = pipeline
    spec = EnsembleSpec((Member(run, head="mlp"),))
    same = ens.run_ensemble(spec, data, tmp_path, progress=False, devices=["cpu", "cpu"])
    assert open_store(same.caches[0]).fingerprint["compute"] == "float32"  # the training cache's
    half = ens.run_ensemble(spec, data, tmp_path, progress=False, precision="fp16")
    assert "trained on fp32 tokens; the test tokens are computed in fp16" in capsys.readouterr().out
    assert half.caches[0] != same.caches[0] and open_store(half.caches[0]).fingerprint["compute"] == "float16-autocast"
    assert not np.array_equal(half.grams, same.grams)
    np.testing.assert_allclose(half.grams, same.grams, rtol=0.05, atol=0.5)


@pytest.mark.slow
def test_a_ridge_run_is_a_submit_and_predict_member(pipeline, tmp_path):
    """The closed-form head through the whole second half: trained on the pipeline's cache and folds, submitted
    alone (`--members RUN`), averaged beside a gradient head, and in `biomass predict`."""
    import biomass_cache.submit.ensemble as ens
    from biomass_cache.submit.ensemble import submit
    from biomass_cache.submit.predict import predict_photos
    from biomass_cache.train.config import resolve
    from biomass_cache.train.crossval import run_training

    root, data, run = pipeline
    ridge = tmp_path / "ridge"
    cfg, members = resolve({}, [], dict(device="cpu", workers=0, plots=False), ["ridge"])
    run_training(root / "train.zarr", data, ridge, cfg, members, folds_csv=run / "folds.csv")
    _, sub = submit(spec_from_options(None, str(ridge)), data, tmp_path / "s.csv", tmp_path / "work",
                    progress=False)
    assert len(sub) == len(pd.read_csv(data / "test.csv")) and np.isfinite(sub["target"]).all()
    assert (sub["target"] >= 0).all()
    spec = EnsembleSpec((Member(run, head="density"), Member(ridge)))
    result = ens.run_ensemble(spec, data, tmp_path / "work", progress=False)
    np.testing.assert_allclose(result.grams, np.mean(result.member_grams, axis=0), rtol=1e-9)
    check_identities(result.member_grams[1])
    check_identities(result.grams)
    table = predict_photos(data / "test", spec_from_options(None, str(ridge)), tmp_path / "p.csv",
                           tmp_path / "work", progress=False)
    parts = table[["Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g"]].to_numpy()
    np.testing.assert_allclose(table["Dry_Total_g"], parts.sum(axis=1), rtol=1e-9)
    ridge_total = dict(zip(result.image_ids, result.member_grams[1][:, 4]))
    np.testing.assert_allclose(table["Dry_Total_g"], [ridge_total[i] for i in table["image_id"]], rtol=1e-6)


def test_members_pick_a_head_with_a_colon(tmp_path):
    """`--members RUN:HEAD` is the flag's way to the ensemble file's `head = ...`; an existing path wins."""
    assert parse_member("runs/demo:density") == Member(Path("runs/demo"), head="density")
    assert parse_member("runs/demo") == Member(Path("runs/demo"))
    assert parse_member("runs/demo/fold0/mlp.json") == Member(Path("runs/demo/fold0/mlp.json"))
    odd = tmp_path / "run:x"
    odd.mkdir()
    assert parse_member(str(odd)) == Member(odd)  # a folder whose name has a colon
    assert parse_member("runs/a:b/c") == Member(Path("runs/a:b/c"))  # not a head name: a path
    for text in ("runs/a:density,,runs/a:mlp", "runs/a,"):
        with pytest.raises(EnsembleError, match="has an empty entry"):
            spec_from_options(None, text)
