import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomass_cache.common.data import read_long_csv, to_long
from biomass_cache.common.photo import load_image
from biomass_cache.common.errors import DataError
from biomass_cache.common.targets import TARGETS

ALPHA = sorted(TARGETS)
COLUMNS = ["sample_id", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm",
           "target_name", "target"]


def long_rows(ids, values=None):
    rows = []
    for k, iid in enumerate(ids):
        comp = (np.array([1.5, 2.25, 3.0]) + k) if values is None else values[k]
        five = dict(zip(TARGETS, [comp[0], comp[1], comp[2], comp[0] + comp[2], comp.sum()]))
        for name in ALPHA:
            rows.append([f"{iid}__{name}", f"train/{iid}.jpg", "2015/9/4", "Tas", "Ryegrass_Clover", "0.62",
                         "4.5", name, str(round(five[name], 4))])
    return pd.DataFrame(rows, columns=COLUMNS)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "train").mkdir()
    ids = ["ID1011485656", "ID1012260530", "ID1025234388"]
    for iid in ids:
        Image.new("RGB", (32, 16), (40, 120, 30)).save(tmp_path / "train" / f"{iid}.jpg")
    long_rows(ids).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path


def test_read_and_round_trip(folder):
    table = read_long_csv(folder / "train.csv")
    assert list(table.columns) == ["image_id", "image_path", "Sampling_Date", "State", "Species",
                                   "Pre_GSHH_NDVI", "Height_Ave_cm", *TARGETS]
    assert table["image_id"].tolist() == ["ID1011485656", "ID1012260530", "ID1025234388"]
    assert table.loc[1, "Dry_Dead_g"] == 3.25 and table.loc[1, "Dry_Total_g"] == 9.75
    assert table["Pre_GSHH_NDVI"].dtype == float and table["Sampling_Date"][0] == "2015/9/4"
    raw = pd.read_csv(folder / "train.csv")
    back = to_long(table)
    assert back["sample_id"].tolist() == raw["sample_id"].tolist()
    np.testing.assert_allclose(back["target"], raw["target"])
    shuffled = raw["sample_id"].sample(frac=1, random_state=0).tolist()
    assert to_long(table, sample_ids=shuffled)["sample_id"].tolist() == shuffled


def test_test_csv_without_targets(folder):
    raw = long_rows(["ID1011485656"])[["sample_id", "image_path", "target_name"]]
    raw.to_csv(folder / "test.csv", index=False)
    table = read_long_csv(folder / "test.csv")
    assert list(table.columns) == ["image_id", "image_path"] and len(table) == 1


def write(folder, df, name="train.csv"):
    df.to_csv(folder / name, index=False)
    return folder / name


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.drop(columns=["target_name"]), r"missing columns \['target_name'\]"),
        (lambda d: d.assign(target_name=d["target_name"].where(d.index != 2, "Dry_Weed_g")),
         r"unknown target_name \['Dry_Weed_g'\] on line\(s\) 4"),
        (lambda d: pd.concat([d, d.iloc[[1]]]), r"duplicated \(image, target\) rows on line\(s\) 3, 17"),
        (lambda d: d.assign(State=d["State"].where(d.index != 3, "Vic")), "conflicting State for image ID1011485656"),
        (lambda d: d.assign(target=d["target"].where(d.index != 5, "abc")), r"non-numeric.*'abc' at line\(s\) 7"),
        (lambda d: d.assign(target=d["target"].where(d.index != 5, "inf")), r"non-finite value 'inf' at line\(s\) 7"),
        (lambda d: d.assign(target=d["target"].where(d.index != 0, "")), r"empty.*line\(s\) 2"),
        (lambda d: d.assign(Height_Ave_cm=d["Height_Ave_cm"].where(~d.index.isin(range(5, 10)), "tall")),
         r"column Height_Ave_cm: non-numeric.*'tall' at line\(s\) 7$"),  # the CSV line, not the table row
        (lambda d: d.assign(target=d["target"].where(d.index != 6, "-1.0")), r"negative target on line\(s\) 8"),
        (lambda d: d.assign(sample_id=d["sample_id"].where(d.index != 4, "ID9__Dry_Dead_g")),
         r"sample_id does not match.*line\(s\) 6"),
        (lambda d: d.assign(image_path=d["image_path"].str.replace("ID1025234388", "ID1025234389"),
                            sample_id=d["sample_id"].str.replace("ID1025234388", "ID1025234389")),
         r"1 image file\(s\) do not exist.*ID1025234389"),
        (lambda d: d.assign(Sampling_Date=d["Sampling_Date"].where(d.index > 4, "Sept 4")),
         "Sampling_Date 'Sept 4' of image ID1011485656 is not a YYYY/M/D date"),
    ],
)
def test_validation_errors(folder, mutate, message):
    path = write(folder, mutate(pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False)))
    with pytest.raises(DataError, match=message) as e:
        read_long_csv(path)
    assert "train.csv" in str(e.value)


def test_missing_target_rows_are_kept_and_reported(folder):
    df = pd.read_csv(folder / "train.csv", dtype=str)
    path = write(folder, df.drop(index=[0]))
    with pytest.warns(UserWarning, match=r"1 image\(s\) lack some target rows.*ID1011485656"):
        table = read_long_csv(path)
    assert len(table) == 3 and np.isnan(table.loc[0, "Dry_Clover_g"]) and table.loc[0, "Dry_Dead_g"] == 2.25


def test_to_long_refuses_unknown_ids(folder):
    table = read_long_csv(folder / "train.csv")
    with pytest.raises(DataError, match="no prediction for 1 sample_id"):
        to_long(table, ["ID0__Dry_Total_g"])


def test_load_image_errors(folder):
    assert load_image(folder / "train" / "ID1011485656.jpg").size == (32, 16)
    with pytest.raises(DataError, match="not found"):
        load_image(folder / "nope.jpg")
    bad = folder / "train" / "bad.jpg"
    bad.write_bytes((folder / "train" / "ID1011485656.jpg").read_bytes()[:200])
    with pytest.raises(DataError, match="bad.jpg: corrupt or truncated"):
        load_image(bad)


@pytest.mark.parametrize("image_path", ["../elsewhere/ID1.jpg", "train/../../ID1.jpg", "/abs/ID1.jpg",
                                        "C:\\photos\\ID1.jpg", "..\\up\\ID1.jpg"])
def test_image_paths_stay_inside_the_data_folder(folder, image_path):
    """`../` in train.csv read a photo from outside the data folder without a word."""
    df = long_rows(["ID1"])
    df["image_path"] = image_path
    write(folder, df)
    with pytest.raises(DataError, match=r"train.csv: image_path leaves the CSV's folder on line\(s\) 2, 3, 4, 5, 6 "
                                        rf"\(line 2: {repr(image_path).replace(chr(92), chr(92) * 2)}\)"):
        read_long_csv(folder / "train.csv", check_images=False)


def test_a_subfolder_and_a_dotted_name_are_inside(folder):
    df = long_rows(["ID1011485656"])
    df["image_path"] = "./train/ID1011485656.jpg"
    write(folder, df)
    assert read_long_csv(folder / "train.csv")["image_path"].tolist() == ["./train/ID1011485656.jpg"]
