"""The report of a tuning study (`STUDY/report.html`, written by `biomass tune` and `biomass report STUDY`).

Every trial (state, score, settings), the parameters' importances, Optuna's history and parallel-coordinate plots
(STUDY/plots/), and the second stage: each top trial's search score beside its fresh-seed scores, so one sees how
much of a search winner's lead was the luck of its seed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from biomass_cache.common.errors import DataError
from biomass_cache.report.html import figure_uri, plt, png_uri, render
from biomass_cache.train.tune_study import load_optuna, open_storage


def is_study(path: Path) -> bool:
    return (Path(path) / "stage2.json").is_file() or (Path(path) / "study.db").is_file()


def _load(path: Path):
    optuna = load_optuna()
    summary = json.loads((path / "stage2.json").read_text()) if (path / "stage2.json").is_file() else {}
    url = summary.get("storage") or f"sqlite:///{(path / 'study.db').resolve()}"
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    name = summary.get("study") or (names[0] if len(names) == 1 else None)
    if name is None or name not in names:
        raise DataError(f"{path}: cannot tell which study to report (studies in {url}: {names}); run `biomass tune` "
                        "to the end, which records it in stage2.json")
    return optuna, optuna.load_study(study_name=name, storage=storage), summary


def _spread_figure(rows: list[dict]) -> str | None:
    if not rows or not any(r["r2"] for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    for k, r in enumerate(rows):
        ax.scatter(r["r2"], [k] * len(r["r2"]), color="tab:blue", label="fresh seeds" if k == 0 else None)
        ax.scatter([r["search_r2"]], [k], color="tab:orange", marker="D", label="search score" if k == 0 else None)
    ax.set(yticks=range(len(rows)), yticklabels=[f"trial {r['trial']}" for r in rows], xlabel="OOF competition_r2")
    ax.legend(loc="best")
    fig.tight_layout()
    return figure_uri(fig)


def study_context(path: Path) -> dict[str, Any]:
    path = Path(path)
    optuna, study, summary = _load(path)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "seconds": None if t.duration is None else t.duration.total_seconds()}
              for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    importances = None
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError):
            importances = None
    rows = summary.get("rows", [])
    best_toml = Path(summary["best_toml"]).read_text() if summary.get("best_toml") and \
        Path(summary["best_toml"]).is_file() else None
    plots = {name: png_uri(path / "plots" / f"{name}.png") for name in ("history", "importances", "parallel")
             if (path / "plots" / f"{name}.png").is_file()}
    return {"kind": "study", "title": f"Study {study.study_name}", "path": str(path), "trials": trials,
            "complete": len(complete), "pruned": sum(t["state"] == "PRUNED" for t in trials),
            "failed": sum(t["state"] == "FAIL" for t in trials),
            "best_search": max(complete, key=lambda t: t["value"]) if complete else None,
            "importances": importances, "rows": rows, "winner": summary.get("winner"), "best_toml": best_toml,
            "spread": _spread_figure(rows), "plots": plots, "params": sorted({k for t in trials for k in t["params"]}),
            "search_vs_seeds": [r["search_r2"] - r["mean"] for r in rows if r.get("mean") is not None],
            "np": np, "resamples": None}


def write_study_report(path: Path, out: Path | None = None) -> Path:
    return render("study.html.j2", out or Path(path) / "report.html", **study_context(path))
