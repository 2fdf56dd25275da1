"""`biomass compare`: runs scored on the same images and folds, every pair's paired grouped-bootstrap difference.

Each run is a run folder, or RUN:HEAD for one of its heads (its best otherwise). Two runs compare only when their
out-of-fold predictions cover the same images split into the same folds: otherwise the difference would mix the
models with the luck of the split, and the refusal names what differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from biomass_cache.common.errors import DataError
from biomass_cache.report.run import Run, load_run
from biomass_cache.report.stats import Difference, Interval, bootstrap_r2, paired_difference


@dataclass(frozen=True)
class Entry:
    label: str
    run: Run
    head: str

    @property
    def pred(self) -> np.ndarray:
        return self.run.oof[self.head]


def parse(spec: str, data_dir: Path | None) -> Entry:
    path, _, head = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    run = load_run(Path(path), data_dir)
    head = head or run.metrics.get("best") or next(iter(run.oof))
    if head not in run.oof:
        raise DataError(f"{path}: no head {head!r}; its heads: {', '.join(run.oof)}")
    return Entry(f"{Path(path).name}:{head}", run, head)


def check_same_split(entries: list[Entry]) -> None:
    first = entries[0]
    for other in entries[1:]:
        a, b = first.run, other.run
        ids_a, ids_b = list(a.table["image_id"]), list(b.table["image_id"])
        if set(ids_a) != set(ids_b):
            only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
            raise DataError(f"{first.label} and {other.label} were scored on different images ({len(only_a)} only "
                            f"in the first, e.g. {only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}): "
                            "compare runs of the same train.csv")
        fold_b = dict(zip(ids_b, b.folds))
        moved = [i for i, k in zip(ids_a, a.folds) if fold_b[i] != k]
        if moved:
            raise DataError(f"{first.label} and {other.label} split the images into different folds ({len(moved)} "
                            f"image(s) in another fold, e.g. {moved[:3]}): train the second with --folds-csv "
                            f"{a.path / 'folds.csv'} to compare them")


@dataclass(frozen=True)
class Comparison:
    entries: list[Entry]
    scores: list[Interval]
    pairs: list[tuple[str, str, Difference]]


def compare(specs: list[str], data_dir: Path | None = None, resamples: int = 2000) -> Comparison:
    if len(specs) < 2:
        raise DataError("compare needs at least two runs (RUN or RUN:HEAD)")
    entries = [parse(s, data_dir) for s in specs]
    check_same_split(entries)
    base = entries[0].run
    order = {i: k for k, i in enumerate(base.table["image_id"])}
    preds = []
    for e in entries:  # every run's rows in the first run's image order
        rows = np.argsort([order[i] for i in e.run.table["image_id"]])
        preds.append(e.pred[rows])
    scores = [bootstrap_r2(base.truth, p, base.groups, resamples=resamples) for p in preds]
    pairs = [(entries[i].label, entries[j].label,
              paired_difference(base.truth, preds[i], preds[j], base.groups, resamples=resamples))
             for i, j in combinations(range(len(entries)), 2)]
    return Comparison(entries, scores, pairs)


def text(c: Comparison) -> str:
    width = max(len(e.label) for e in c.entries)
    lines = [f"{'run':<{width}}  competition_r2  95 % interval", *[
        f"{e.label:<{width}}  {s.value:14.4f}  [{s.low:.4f}, {s.high:.4f}]" for e, s in zip(c.entries, c.scores)], "",
        "paired differences (A - B) on the same visit resamples:"]
    for a, b, d in c.pairs:
        lines.append(f"  {a} - {b}: {d.difference.value:+.4f} [{d.difference.low:+.4f}, {d.difference.high:+.4f}], "
                     f"P(A better) = {d.p_a_better:.2f}")
    groups = c.scores[0].groups
    lines.append(f"({len(c.entries[0].run.truth)} images, {groups} visits resampled {c.scores[0].level:.0%} "
                 "intervals; an interval that holds 0 says the data cannot tell the two apart)")
    return "\n".join(lines)
