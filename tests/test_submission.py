import numpy as np
import pandas as pd
import pytest

from biomass_cache.submit.submission import expected_sample_ids, score, validate_submission, write_submission
from biomass_cache.common.errors import SubmissionError
from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import TARGETS, components_to_targets

ALPHA = sorted(TARGETS)
IDS = ["ID1001", "ID1002", "ID1003", "ID1004"]


@pytest.fixture
def test_csv(tmp_path):
    rows = [(f"{i}__{t}", f"test/{i}.jpg", t) for i in IDS for t in ALPHA]
    path = tmp_path / "test.csv"
    pd.DataFrame(rows, columns=["sample_id", "image_path", "target_name"]).to_csv(path, index=False)
    return path


def predictions(ids=IDS, seed=0):
    comps = np.random.default_rng(seed).gamma(2.0, 8.0, size=(len(ids), 3))
    five = components_to_targets(comps)
    return pd.DataFrame({"image_id": ids, **{t: five[:, j] for j, t in enumerate(TARGETS)}})


def test_write_follows_test_csv_order_and_holds_identities(tmp_path, test_csv):
    out = tmp_path / "sub" / "submission.csv"
    pred = predictions()
    write_submission(out, pred.iloc[::-1], test_csv)  # prediction order must not matter
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["sample_id", "target"]
    assert sub["sample_id"].tolist() == expected_sample_ids(test_csv)
    wide = sub.assign(i=sub["sample_id"].str.split("__").str[0], t=sub["sample_id"].str.split("__").str[1])
    wide = wide.pivot(index="i", columns="t", values="target").loc[IDS]
    np.testing.assert_array_equal(wide[list(TARGETS)].to_numpy(), pred[list(TARGETS)].to_numpy())
    assert np.allclose(wide["GDM_g"], wide["Dry_Clover_g"] + wide["Dry_Green_g"], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: p.iloc[1:], "no prediction"),
        (lambda p: pd.concat([p, p.iloc[:1]]), "more than once"),
        (lambda p: p.assign(Dry_Dead_g=[np.nan, 1.0, 1.0, 1.0]), "non-finite"),
        (lambda p: p.assign(Dry_Clover_g=-p["Dry_Clover_g"]), "negative"),
        (lambda p: p.assign(GDM_g=p["GDM_g"] + 1.0), "GDM_g does not equal"),
        (lambda p: p.assign(Dry_Total_g=[3.04e27, 1.0, 1.0, 1.0]),  # a diverged model (lr 1e12) was "validated"
         r"1 target\(s\) above 100000 g, no plant mass .*a diverged model\? .*up to 3.04e\+27 g"),
    ],
)
def test_invalid_predictions_write_nothing(tmp_path, test_csv, breakage, message):
    out = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=message):
        write_submission(out, breakage(predictions()), test_csv)
    assert not out.exists() and list(tmp_path.iterdir()) == [test_csv]


def test_validate_names_every_problem(test_csv):
    ids = expected_sample_ids(test_csv)
    good = pd.DataFrame({"sample_id": ids, "target": 1.0})
    with pytest.raises(SubmissionError, match="duplicated sample_id.*ID1001__Dry_Clover_g"):
        validate_submission(pd.concat([good, good.iloc[:1]]), ids)
    with pytest.raises(SubmissionError, match="not in test.csv's order"):
        validate_submission(good.iloc[::-1], ids)
    with pytest.raises(SubmissionError, match="columns must be exactly"):
        validate_submission(good.rename(columns={"target": "value"}), ids)


def write_long(path, pred):
    five = pred.set_index("image_id")
    rows = [(f"{i}__{t}", five.at[i, t]) for i in five.index for t in ALPHA]
    pd.DataFrame(rows, columns=["sample_id", "target"]).to_csv(path, index=False)


def test_score_matches_metric_and_refuses_other_ids(tmp_path, test_csv):
    truth, pred = predictions(seed=1), predictions(seed=2)
    write_long(tmp_path / "labels.csv", truth)
    write_submission(tmp_path / "submission.csv", pred, test_csv)
    scores = score(tmp_path / "submission.csv", tmp_path / "labels.csv")
    expected = competition_r2(truth[list(TARGETS)].to_numpy(), pred[list(TARGETS)].to_numpy())
    assert scores["competition_r2"] == pytest.approx(expected, rel=1e-12)
    assert np.isfinite(scores["log_r2"]) and scores["n_images"] == len(IDS)
    write_long(tmp_path / "labels.csv", truth.iloc[1:])
    with pytest.raises(SubmissionError, match="5 only in the submission.*ID1001__"):
        score(tmp_path / "submission.csv", tmp_path / "labels.csv")


@pytest.mark.parametrize("value, match", [
    ("1e400", r"non-numeric or non-finite target for \['ID1001__Dry_Clover_g'\] \(line 2: '1e400'\)"),
    ("", r"non-numeric or non-finite target for \['ID1001__Dry_Clover_g'\] \(line 2: ''\)"),
    ("abc", r"\(line 2: 'abc'\)"),
    ("1e300", r"the errors overflow, so no score exists: line 2 predicts 1e\+300 g for ID1001__Dry_Clover_g"),
])
def test_score_names_the_line_of_a_value_it_cannot_score(tmp_path, value, match):
    """`1e400` named no row ([]); a finite 1e300 scored -inf and wrote -Infinity into the JSON."""
    write_long(tmp_path / "labels.csv", predictions(seed=1))
    write_long(tmp_path / "submission.csv", predictions(seed=2))
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + "," + value
    (tmp_path / "submission.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SubmissionError, match=match):
        score(tmp_path / "submission.csv", tmp_path / "labels.csv")


def test_a_test_csv_asking_for_some_targets_of_an_image_is_refused(test_csv, tmp_path):
    from biomass_cache.common.errors import DataError
    from biomass_cache.submit.submission import check_every_target

    check_every_target(test_csv)
    lines = test_csv.read_text().splitlines()
    partial = tmp_path / "partial" / "test.csv"
    partial.parent.mkdir()
    partial.write_text("\n".join(line for line in lines if not line.startswith("ID1001__GDM_g")) + "\n")
    with pytest.raises(DataError, match=r"1 image\(s\) lack a row for some of the five targets, e.g. ID1001 has no "
                                        r"\['GDM_g'\]"):
        check_every_target(partial)
