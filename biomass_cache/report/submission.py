"""The report of a submission (`NAME.report.html` beside `NAME.csv`, written by `biomass submit`).

The members with their weights and out-of-fold scores (each with a 95 % grouped-bootstrap interval), the
ensemble's in-sample and cross-fitted scores, the ensemble against its best member as a paired difference (does the
ensemble really beat the single run it might be swapped for?), the test photos unlike every training photo, and
the predicted totals beside the training totals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass_cache.report.html import figure_uri, plt, render
from biomass_cache.report.stats import bootstrap_r2, paired_difference
from biomass_cache.submit.ensemble import EnsembleResult, report_path
from biomass_cache.submit.shift import QUANTILE


def html_path(out: Path) -> Path:
    return Path(out).with_suffix(".report.html")


def _totals_figure(result: EnsembleResult) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    shown = [result.grams[:, 4]] + ([] if result.oof is None else [result.oof.labels[:, 4]])
    bins = np.histogram_bin_edges(np.concatenate(shown), 30)
    if result.oof is not None:
        ax.hist(result.oof.labels[:, 4], bins=bins, alpha=0.5, density=True, label="training photos: true")
    ax.hist(result.grams[:, 4], bins=bins, alpha=0.5, density=True, label="test photos: predicted")
    ax.set(xlabel="Dry_Total_g", ylabel="density")
    ax.legend()
    fig.tight_layout()
    return figure_uri(fig)


def submission_context(out: Path, result: EnsembleResult, resamples: int = 2000) -> dict[str, Any]:
    report, oof = result.report, result.oof
    weights = report.get("weights", {})
    members = []
    for k, name in enumerate(result.member_names):
        w = weights.get(name)
        members.append({"name": name, "weight": w if isinstance(w, dict) else float(w),
                        "random": result.resolved[k].extract.get("weights_sha256") == "random",
                        "oof": None if oof is None else bootstrap_r2(oof.labels, oof.members[k], oof.groups,
                                                                     resamples=resamples)})
    ensemble = versus = None
    if oof is not None:
        ensemble = bootstrap_r2(oof.labels, oof.grams, oof.groups, resamples=resamples)
        best = int(np.argmax([m["oof"].value for m in members]))
        versus = {"member": members[best]["name"],
                  "difference": paired_difference(oof.labels, oof.grams, oof.members[best], oof.groups,
                                                  resamples=resamples)}
    shift_file = Path(out).with_name(f"{Path(out).stem}.shift.csv")
    shift = pd.read_csv(shift_file) if shift_file.is_file() else None
    unusual = ([] if shift is None else shift.loc[shift["unusual"]].sort_values("shift_distance", ascending=False)
               .to_dict("records"))
    return {"kind": "submission", "title": f"Submission {Path(out).name}", "out": str(out),
            "json": str(report_path(out)), "aggregation": report["aggregation"], "n_images": len(result.image_ids),
            "members": members, "ensemble": ensemble, "versus": versus, "oof": report.get("oof"),
            "cross_fitted": (report.get("oof") or {}).get("cross_fitted_oof"), "shift_checked": shift is not None,
            "unusual": unusual, "quantile": QUANTILE, "totals": _totals_figure(result),
            "random_weights": any(m["random"] for m in members), "resamples": resamples}


def write_submission_report(out: Path, result: EnsembleResult, resamples: int = 2000) -> Path:
    return render("submission.html.j2", html_path(out), **submission_context(out, result, resamples))
