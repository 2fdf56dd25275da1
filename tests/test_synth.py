import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict
from typer.testing import CliRunner

from biomass_cache.common.data import read_long_csv
from biomass_cache.synth.generate import generate
from biomass_cache.cli.synth import parse_photo_size, synth_command
from biomass_cache.synth.blades import sample_labels
from biomass_cache.synth.canopy import sample_labels_canopy
from biomass_cache.common.targets import TARGETS
from biomass_cache.train.baseline import colour_stats_of

TRAIN_COLUMNS = ["sample_id", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm",
                 "target_name", "target"]
FILES = ["sample_submission.csv", "test.csv", "test_labels.csv", "train.csv"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, n_train=16, n_test=4, seed=3, size=(120, 60), progress=False)
    return out


@pytest.fixture(scope="module")
def canopy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "canopy"
    generate(out, n_train=16, n_test=4, seed=3, size=(120, 60), progress=False, style="canopy")
    return out


def _raw(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_same_seed_gives_identical_files(small, tmp_path):
    again = tmp_path / "again"
    summary = generate(again, n_train=16, n_test=4, seed=3, size=(120, 60), progress=False)
    names = sorted(p.relative_to(small).as_posix() for p in small.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert len(names) == len(FILES) + 20
    for name in names:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name
    assert summary["n_train"] == 16 and summary["images_per_s"] > 0
    other = tmp_path / "other"
    generate(other, n_train=16, n_test=4, seed=4, size=(120, 60), progress=False)
    assert (other / "train.csv").read_bytes() != (small / "train.csv").read_bytes()


def test_csv_formats_and_orders(small):
    train, test = _raw(small / "train.csv"), _raw(small / "test.csv")
    assert list(train.columns) == TRAIN_COLUMNS
    assert list(test.columns) == ["sample_id", "image_path", "target_name"]
    for df, split, n in ((train, "train", 16), (test, "test", 4)):
        ids = df["image_path"].str.extract(rf"^{split}/(ID\d{{7,10}})\.jpg$")[0]
        assert ids.notna().all()
        assert (df["sample_id"] == ids + "__" + df["target_name"]).all()
        assert ids.iloc[::5].tolist() == sorted(set(ids)) and len(set(ids)) == n
        assert (df["target_name"].to_numpy().reshape(n, 5) == sorted(TARGETS)).all()
        assert (ids.to_numpy().reshape(n, 5) == ids.iloc[::5].to_numpy()[:, None]).all()
    assert not set(train["image_path"].str[6:-4]) & set(test["image_path"].str[5:-4])
    assert all(re.fullmatch(r"2015/[1-9]\d?/[1-9]\d?", d) for d in train["Sampling_Date"])
    assert set(train["State"]) <= {"Tas", "Vic", "NSW", "WA"}

    sub, answers = _raw(small / "sample_submission.csv"), _raw(small / "test_labels.csv")
    assert list(sub.columns) == list(answers.columns) == ["sample_id", "target"]
    assert sub["sample_id"].tolist() == answers["sample_id"].tolist() == test["sample_id"].tolist()
    assert sub["target"].nunique() == 1


@pytest.mark.parametrize("style", ["small", pytest.param("canopy", marks=pytest.mark.slow)])  # canopy: ~1 s to paint
@pytest.mark.parametrize("name", ["train.csv", "test_labels.csv"])
def test_identities_exact_to_four_decimals(request, style, name):
    raw = _raw(request.getfixturevalue(style) / name)
    assert all(re.fullmatch(r"\d+(\.\d{1,4})?", v) for v in raw["target"])
    key = raw["sample_id"].str.split("__")
    wide = pd.DataFrame({"image": key.str[0], "t": key.str[1], "v": raw["target"].map(Decimal)})
    wide = wide.pivot(index="image", columns="t", values="v")
    assert (wide["GDM_g"] == wide["Dry_Clover_g"] + wide["Dry_Green_g"]).all()
    assert (wide["Dry_Total_g"] == wide["GDM_g"] + wide["Dry_Dead_g"]).all()
    assert (wide["GDM_g"] >= 1).all()


def test_images_exist_with_the_right_size(small, tmp_path):
    for split in ("train", "test"):
        paths = _raw(small / f"{split}.csv")["image_path"].unique()
        for p in paths:
            with Image.open(small / p) as im:
                assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (120, 60))
    generate(tmp_path / "wide", n_train=1, n_test=1, size=(300, 150), progress=False)
    assert Image.open(next((tmp_path / "wide" / "train").iterdir())).size == (300, 150)


def test_read_long_csv_accepts_the_files(small):
    train = read_long_csv(small / "train.csv")
    test = read_long_csv(small / "test.csv")
    assert len(train) == 16 and len(test) == 4
    assert not train[list(TARGETS)].isna().any().any()
    assert train["Pre_GSHH_NDVI"].between(0.16, 0.91).all() and train["Height_Ave_cm"].between(1, 70).all()


REAL = {  # mean, std, max, zero fraction of the 357 real training images
    "Dry_Green_g": (26.6, 25.4, 158, 0.05), "Dry_Dead_g": (12.0, 12.4, 84, 0.11),
    "Dry_Clover_g": (6.7, 12.1, 72, 0.38), "GDM_g": (33.3, 24.9, 158, 0.0), "Dry_Total_g": (45.3, 28.0, 186, 0.0),
}


def _like_the_real_table(table: pd.DataFrame) -> None:
    for name, (mean, std, top, zeros) in REAL.items():
        v = table[name]
        assert abs(v.mean() / mean - 1) < 0.15 and abs(v.std() / std - 1) < 0.15, name
        assert v.max() <= top and abs((v == 0).mean() - zeros) < 0.05, name
    assert table["Dry_Total_g"].min() >= 1 and table["GDM_g"].min() >= 1
    assert table["Dry_Total_g"].quantile(0.99) > 2.5 * REAL["Dry_Total_g"][0]  # the long right tail


def test_label_statistics_match_the_real_table():
    table, drawn = sample_labels(5000, np.random.default_rng(0))
    _like_the_real_table(table)
    shares = table["State"].value_counts(normalize=True)
    assert np.allclose(shares[["Tas", "Vic", "NSW", "WA"]], [0.39, 0.31, 0.21, 0.09], atol=0.01)
    assert (table.loc[table["State"] == "WA", "Dry_Dead_g"] == 0).all()
    assert (table.loc[table["State"] == "NSW", "Dry_Clover_g"] > 0).mean() < 0.05
    assert (table.loc[table["Species"].isin(["Ryegrass", "Fescue", "Lucerne"]), "Dry_Clover_g"] == 0).all()
    assert abs(table["Pre_GSHH_NDVI"].mean() - 0.66) < 0.03
    assert np.corrcoef(table["Pre_GSHH_NDVI"], table["Dry_Green_g"] / table["Dry_Total_g"])[0, 1] > 0.5
    h = table["Height_Ave_cm"]
    assert 3 < h.median() < 5 and 6.5 < h.mean() < 8.7 and 0.35 < np.corrcoef(h, table["Dry_Total_g"])[0, 1] < 0.65
    # drawn masses differ from the labels by ~10% multiplicative noise
    comps = table[["Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g"]].to_numpy()
    ratio = np.log(drawn[comps > 0] / comps[comps > 0])
    assert 0.08 < ratio.std() < 0.12 and abs(ratio.mean()) < 0.01


def test_canopy_labels_match_the_real_table_by_another_draw():
    table, drawn = sample_labels_canopy(5000, np.random.default_rng(0))
    _like_the_real_table(table)
    assert (table.loc[table["State"] == "WA", "Dry_Dead_g"] == 0).all()
    assert (table.loc[table["Species"].isin(["Ryegrass", "Fescue", "Lucerne"]), "Dry_Clover_g"] == 0).all()
    assert (table.loc[table["Dry_Green_g"] == 0, "Species"] == "Clover").all()  # pure clover plots only
    comps = table[["Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g"]].to_numpy()
    ratio = np.log(drawn[comps > 0] / comps[comps > 0])
    assert 0.13 < ratio.std() < 0.17 and abs(ratio.mean()) < 0.01  # the canopy style's label noise


@pytest.mark.slow
def test_canopy_is_deterministic_and_differs_from_blades(canopy, small, tmp_path):
    again = tmp_path / "again"
    generate(again, n_train=16, n_test=4, seed=3, size=(120, 60), progress=False, style="canopy")
    names = sorted(p.relative_to(canopy).as_posix() for p in canopy.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert all((canopy / n).read_bytes() == (again / n).read_bytes() for n in names)
    other = tmp_path / "other"
    generate(other, n_train=16, n_test=4, seed=4, size=(120, 60), progress=False, style="canopy")
    assert (other / "train.csv").read_bytes() != (canopy / "train.csv").read_bytes()
    # the same seed in the other style: other ids, other labels, other pictures
    assert not set(_raw(canopy / "train.csv")["image_path"]) & set(_raw(small / "train.csv")["image_path"])
    mean = lambda d: np.mean([np.asarray(Image.open(p), float).mean((0, 1)) for p in (d / "train").iterdir()], 0)
    assert np.abs(mean(canopy) - mean(small)).max() > 3  # average colour of the 16 photos, 0-255
    with pytest.raises(ValueError, match="unknown style 'x'; choose one of blades, canopy"):
        generate(tmp_path / "x", n_train=1, n_test=1, progress=False, style="x")
    assert not (tmp_path / "x").exists()


def test_groups_scale_with_n():
    for n, low, high in ((357, 25, 31), (120, 8, 11), (20, 4, 5)):
        table, _ = sample_labels(n, np.random.default_rng(1))
        groups = table.groupby(["Sampling_Date", "State"]).size()
        assert low <= len(groups) <= high, (n, len(groups))
        assert table["Sampling_Date"].nunique() <= len(groups)
        if n == 357:
            assert groups.max() >= 3 * groups.min()  # very unequal


@pytest.mark.slow
# canopy: dead litter lies under the green and clover cover, so colour statistics do not see it
@pytest.mark.parametrize("style, floors", [
    ("blades", {"Dry_Total_g": 0.3, "GDM_g": 0.3, "Dry_Clover_g": 0.3, "Dry_Green_g": 0.2, "Dry_Dead_g": 0.05}),
    ("canopy", {"Dry_Total_g": 0.3, "GDM_g": 0.3, "Dry_Clover_g": 0.3, "Dry_Green_g": 0.3}),
])
def test_pictures_carry_the_labels(tmp_path, style, floors):
    """Ridge on the baseline's colour statistics predicts out-of-fold biomass: the painter draws what is labelled."""
    out = tmp_path / "signal"
    generate(out, n_train=150, n_test=1, seed=0, size=(200, 100), progress=False, style=style)
    table = read_long_csv(out / "train.csv")
    x = colour_stats_of([out / p for p in table["image_path"]])
    for name, floor in floors.items():
        y = table[name].to_numpy()
        ridge = RidgeCV(alphas=np.logspace(-3, 3, 13))
        pred = cross_val_predict(ridge, x, y, cv=KFold(5, shuffle=True, random_state=0))
        assert r2_score(y, pred) > floor, name


def test_refuses_existing_folder_and_overwrites_on_request(small, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(out, n_train=2, n_test=1, size=(64, 32), progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    generate(out, n_train=2, n_test=1, size=(64, 32), progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "test", "train"])
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folder left behind
    with pytest.raises(ValueError, match="at least 1"):
        generate(tmp_path / "e", n_train=0, n_test=1, progress=False)
    assert not (tmp_path / "e").exists()


def test_parse_size():
    assert parse_photo_size("1000x500") == (1000, 500) and parse_photo_size("200X100") == (200, 100)
    for bad in ("1000", "1000x", "ax500", "-10x5", "1000x500x3", "8x4"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_photo_size(bad)


@pytest.mark.slow
def test_command(tmp_path):
    app = typer.Typer()
    app.command()(synth_command)
    out = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(app, [str(out), "--n-train", "3", "--n-test", "2", "--seed", "1", "--size", "64x32"])
    assert result.exit_code == 0, result.output
    assert "3 train + 2 test" in result.output and "blades style" in result.output and str(out) in result.output
    other = runner.invoke(app, [str(tmp_path / "c"), "--n-train", "3", "--size", "64x32", "--style", "canopy"])
    assert other.exit_code == 0 and "canopy style" in other.output, other.output
    bad_style = runner.invoke(app, [str(tmp_path / "y"), "--style", "oil"])
    assert bad_style.exit_code != 0 and "unknown style 'oil'" in bad_style.output
    assert len(_raw(out / "train.csv")) == 15
    bad = runner.invoke(app, [str(tmp_path / "x"), "--size", "64by32"])
    assert bad.exit_code != 0 and "WIDTHxHEIGHT" in bad.output
    again = runner.invoke(app, [str(out), "--n-train", "3", "--size", "64x32"])
    assert again.exit_code != 0 and "--overwrite" in again.output
