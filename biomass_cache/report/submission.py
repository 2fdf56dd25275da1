"""The report of a submission (`NAME.report.html` beside `NAME.csv`, written by `biomass submit`; `biomass report
NAME.csv` writes it again from the files beside the submission).

The members with their weights and out-of-fold scores (each with a 95 % grouped-bootstrap interval), the
ensemble's in-sample and cross-fitted scores, the ensemble against its best member as a paired difference (does the
ensemble really beat the single run it might be swapped for?), the test photos unlike every training photo, and
every test photo's predicted total with its conformal interval. The numbers are added to `NAME.report.json`
(`decision`), from which the page is rendered.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass_cache.common.conformal import calibrate
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import write_json
from biomass_cache.report.html import figure_uri, plt, render
from biomass_cache.report.stats import bootstrap_r2, paired_difference
from biomass_cache.submit.ensemble import EnsembleResult, report_path
from biomass_cache.submit.shift import QUANTILE
from biomass_cache.submit.submission import long_to_wide, read_long_file

LEVEL = 0.9  # the prediction intervals shown per test photo


def html_path(out: Path) -> Path:
    return Path(out).with_suffix(".report.html")


def decision_numbers(result: EnsembleResult, resamples: int = 2000) -> dict[str, Any]:
    """What the report shows beyond submit's own report: intervals of every OOF score, the ensemble against its
    best member, the test photos' totals with their conformal intervals (JSON-ready)."""
    oof, weights = result.oof, result.report.get("weights", {})
    members = [{"name": name, "weight": weights.get(name),
                "random": result.resolved[k].extract.get("weights_sha256") == "random",
                "oof": None if oof is None else asdict(bootstrap_r2(oof.labels, oof.members[k], oof.groups,
                                                                    resamples=resamples))}
               for k, name in enumerate(result.member_names)]
    out: dict[str, Any] = {"members": members, "resamples": resamples, "ensemble": None, "versus": None,
                           "test_totals": result.grams[:, 4].tolist(), "train_totals": None, "interval": None}
    if oof is not None:
        out["ensemble"] = asdict(bootstrap_r2(oof.labels, oof.grams, oof.groups, resamples=resamples))
        best = int(np.argmax([m["oof"]["value"] for m in members]))
        d = paired_difference(oof.labels, oof.grams, oof.members[best], oof.groups, resamples=resamples)
        out["versus"] = {"member": members[best]["name"], "difference": asdict(d.difference),
                         "p_ensemble_better": d.p_a_better}
        out["train_totals"] = oof.labels[:, 4].tolist()
        try:
            low, high = calibrate(oof.labels, oof.grams, LEVEL).bounds(result.grams)
            out["interval"] = {"level": LEVEL, "low": low[:, 4].tolist(), "high": high[:, 4].tolist()}
        except ValueError:  # too few OOF images for this level
            pass
    return out


def _totals_figure(test: list[float], train: list[float] | None) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins = np.histogram_bin_edges(np.concatenate([test, train or []]), 30)
    if train:
        ax.hist(train, bins=bins, alpha=0.5, density=True, label="training photos: true")
    ax.hist(test, bins=bins, alpha=0.5, density=True, label="test photos: predicted")
    ax.set(xlabel="Dry_Total_g", ylabel="density")
    ax.legend()
    fig.tight_layout()
    return figure_uri(fig)


def submission_context(out: Path) -> dict[str, Any]:
    """The page's content from the files beside the submission: NAME.report.json, NAME.csv, NAME.shift.csv."""
    out = Path(out)
    try:
        report = json.loads(report_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{out}: no readable {report_path(out).name} beside it; a submission report needs the "
                        "files `biomass submit` writes") from None
    numbers = report.get("decision")
    if numbers is None:
        raise DataError(f"{report_path(out)}: written before submissions had reports; run `biomass submit` again")
    grams = long_to_wide(read_long_file(out), str(out))
    shift_file = out.with_name(f"{out.stem}.shift.csv")
    shift = pd.read_csv(shift_file, dtype={"image_id": str}) if shift_file.is_file() else None
    unusual = ([] if shift is None else shift.loc[shift["unusual"]].sort_values("shift_distance", ascending=False)
               .to_dict("records"))
    distance = {} if shift is None else dict(zip(shift["image_id"], shift["shift_distance"]))
    interval = numbers["interval"]
    photos = [{"image_id": i, "total": float(t), "low": interval["low"][k] if interval else None,
               "high": interval["high"][k] if interval else None, "distance": distance.get(i)}
              for k, (i, t) in enumerate(zip(grams.index, grams["Dry_Total_g"]))]
    oof = report.get("oof") or {}
    return {"kind": "submission", "title": f"Submission {out.name}", "out": str(out), "json": str(report_path(out)),
            "aggregation": report["aggregation"], "n_images": len(grams), "members": numbers["members"],
            "ensemble": numbers["ensemble"], "versus": numbers["versus"], "oof": oof,
            "cross_fitted": oof.get("cross_fitted_oof"), "shift_checked": shift is not None, "unusual": unusual,
            "quantile": QUANTILE, "photos": photos, "level": interval["level"] if interval else None,
            "totals": _totals_figure(numbers["test_totals"], numbers["train_totals"]),
            "random_weights": any(m["random"] for m in numbers["members"]), "resamples": numbers["resamples"]}


def write_submission_report(out: Path, result: EnsembleResult | None = None, resamples: int = 2000,
                            html: Path | None = None) -> Path:
    """With `result` (just after `submit`): add its numbers to NAME.report.json first; then render the page (into
    `html`, by default NAME.report.html)."""
    if result is not None:
        report = json.loads(report_path(out).read_text())
        write_json(report_path(out), {**report, "decision": decision_numbers(result, resamples)})
    return render("submission.html.j2", html or html_path(out), **submission_context(out))
