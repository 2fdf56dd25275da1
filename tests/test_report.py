"""The reports a person decides from (report/): a run's HTML report opened in a real headless Chromium (no console
error, every image loaded, the key numbers there), `biomass report` and `biomass compare` through the command line
with their refusals, and `biomass predict --interval`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from biomass_cache.cli import app
from biomass_cache.common.targets import TARGETS
from biomass_cache.report.run import write_run_report
from toys import open_in_browser

pytestmark = pytest.mark.slow
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def test_the_run_report_in_a_real_browser(pipeline, tmp_path):
    root, data, run = pipeline
    out = write_run_report(run, tmp_path / "report.html", resamples=500)
    metrics = json.loads((run / "metrics.json").read_text())
    seen = open_in_browser(out, tmp_path / "report.png")
    assert seen["errors"] == [] and seen["failed"] == [], seen
    assert {i for i, ok, _ in seen["images"] if ok} == {"parity", "curves", "gallery", "maps"}, seen["images"]
    assert all(src.startswith("data:image/png;base64") for _, _, src in seen["images"])  # inline: no network
    assert f"{metrics['competition_r2']:.3f}" in seen["score"] and metrics["best"] in seen["score"]
    assert re.search(r"95 % interval \[-?\d\.\d{3}, -?\d\.\d{3}\] over \d+ visits", seen["score"])
    text = seen["text"]
    assert "RANDOM BACKBONE WEIGHTS" in text and "ridge on colour statistics" in text
    assert "the training folds' mean" in text and all(t in text for t in TARGETS)
    assert "biomass train --cache" in text and "Per State" in text
    if os.environ.get("BIOMASS_DOCS_SCREENSHOTS"):  # the picture docs/reports.md shows
        from PIL import Image

        with Image.open(tmp_path / "report.png") as shot:
            shot.convert("RGB").resize((900, round(shot.height * 900 / shot.width))).save(
                DOCS_IMAGES / "report-run.jpg", quality=80)


def test_the_submission_report_in_a_real_browser(pipeline, tmp_path):
    root, data, run = pipeline
    done = cli("submit", "--data", data, "--members", f"{run}:density,{run}:mlp", "--out", tmp_path / "s.csv",
               "--work-dir", tmp_path / "work")
    assert done.exit_code == 0 and f"report: {tmp_path / 's.report.html'}" in done.output, done.output
    seen = open_in_browser(tmp_path / "s.report.html", tmp_path / "s.png")
    assert seen["errors"] == [] and seen["failed"] == [] and [i[:2] for i in seen["images"]] == [["totals", True]]
    report = json.loads((tmp_path / "s.report.json").read_text())
    assert f"{report['oof']['ensemble']:.3f}" in seen["score"] and "95 % interval" in seen["score"]
    text = seen["text"]
    assert "RANDOM BACKBONE WEIGHTS" in text and "The ensemble minus its best member" in text
    assert "every test photo is within the distance" in text
    shift = pd.read_csv(tmp_path / "s.shift.csv")
    assert list(shift.columns) == ["image_id", "shift_distance", "unusual"] and not shift["unusual"].any()
    for name, w in report["weights"].items():
        assert name in text and f"{w:.3f}" in text
    d = report["decision"]
    assert d["ensemble"]["value"] == pytest.approx(report["oof"]["ensemble"]) and len(d["test_totals"]) == 8
    assert all(lo <= t <= hi for lo, t, hi in zip(d["interval"]["low"], d["test_totals"], d["interval"]["high"]))
    again = cli("report", tmp_path / "s.csv", "--out", tmp_path / "again.html")  # from the files beside it
    assert again.exit_code == 0, again.output
    strip = lambda p: re.sub(r"data:image/png;base64,[^\"]+", "", p.read_text())  # noqa: E731
    assert strip(tmp_path / "again.html") == strip(tmp_path / "s.report.html")


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_report_and_compare_commands(pipeline, tmp_path):
    root, data, run = pipeline
    made = cli("report", run, "--out", tmp_path / "r.html", "--resamples", 200)
    assert made.exit_code == 0 and (tmp_path / "r.html").stat().st_size > 10_000, made.output
    compared = cli("compare", f"{run}:density", f"{run}:mlp", "--out", tmp_path / "c.html", "--resamples", 500)
    assert compared.exit_code == 0, compared.output
    assert re.search(r"run:density - run:mlp: [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\], P\(A better\) = "
                     r"\d\.\d\d", compared.output), compared.output
    assert "P(A better)" in (tmp_path / "c.html").read_text()
    # refusals: one line each, nothing written
    assert cli("report", data).output.strip().splitlines()[-1] == (
        f"error: {data}: neither a run folder (config.json and metrics.json, written by `biomass train`), a "
        "submission (NAME.csv with NAME.report.json, `biomass submit`) nor a study folder (stage2.json or study.db, "
        "`biomass tune`)")
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("report.html", "plots"))
    folds = pd.read_csv(other / "folds.csv")
    folds.loc[0, "fold"] = (folds.loc[0, "fold"] + 1) % 3
    folds.to_csv(other / "folds.csv", index=False)
    refused = cli("compare", f"{run}:mlp", f"{other}:mlp")
    assert refused.exit_code == 2 and "split the images into different folds (1 image(s) in another fold" in \
        refused.output and "--folds-csv" in refused.output, refused.output
    (other / "oof_density.csv").unlink()
    broken = cli("report", other, "--out", tmp_path / "x.html")
    assert broken.exit_code == 2 and "oof_density.csv: missing" in broken.output and not (tmp_path / "x.html").exists()


def test_predict_writes_intervals_and_marks_photos_unlike_the_training_ones(pipeline, tmp_path):
    root, data, run = pipeline
    photos = tmp_path / "photos"  # the test photos, and three from a (trivial) other generator
    shutil.copytree(data / "test", photos)
    rng = np.random.default_rng(0)
    odd = {"blue": np.full((64, 128, 3), (40, 60, 200), np.uint8), "grey": np.full((64, 128, 3), 128, np.uint8),
           "noise": rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)}
    for name, pixels in odd.items():
        Image.fromarray(pixels).save(photos / f"{name}.jpg")
    result = cli("predict", photos, "--members", f"{run}:density", "--interval", 0.8, "--out",
                 tmp_path / "p.csv", "--work-dir", tmp_path / "work")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "p.csv")
    for t in TARGETS:
        assert (table[f"{t}_low"] <= table[t]).all() and (table[t] <= table[f"{t}_high"]).all()
        assert (table[f"{t}_low"] >= 0).all()
    assert set(table.loc[table["unusual"], "image_id"]) == set(odd)
    assert f"WARNING: {len(odd)} of {len(table)} test photo(s) look unlike every training photo" in result.output
    assert cli("predict", data / "test", "--members", f"{run}:density", "--interval", 1.5, "--out",
               tmp_path / "q.csv").output.strip().splitlines()[-1] == (
        "error: --interval 1.5: the level must be between 0 and 1, e.g. 0.9")
    bare = tmp_path / "no_oof"  # a run without out-of-fold predictions cannot calibrate intervals
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("oof*.csv"))
    refused = cli("predict", data / "test", "--members", f"{bare}:density", "--interval", 0.8, "--out",
                  tmp_path / "r.csv", "--work-dir", tmp_path / "work")
    assert refused.exit_code == 2 and not (tmp_path / "r.csv").exists(), refused.output
    assert refused.output.strip().splitlines()[-1].startswith("error: --interval needs every member to be a run "
                                                              "folder with out-of-fold predictions"), refused.output
