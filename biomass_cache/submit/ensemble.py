"""Running an ensemble: every member predicts the test images (test caches built or reused, predictions cached),
and the predictions are combined.

The ensemble itself (members, weights, aggregation) is submit/spec.py; a member's checkpoints, test cache and
predictions are submit/members.py. Each member's predictions (grams, folds and TTA views averaged) are cached
under `<out_dir>/members/` keyed by `member_key`, so re-aggregating is instant and a photo changed under its old
name is predicted afresh. Aggregation (biomass_cache.submit.aggregate) happens in component space; a fitted one (`oof`,
`stack`) is fitted on the members' OOF predictions and also scored cross-fitted over the members' folds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from biomass_cache.common.content import content_hashes
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError, EnsembleError
from biomass_cache.common.folds import GROUP_COLUMNS, read_folds, visit_groups
from biomass_cache.common.io import check_output_file, write_csv, write_json
from biomass_cache.common.targets import COMPONENTS, TARGETS
from biomass_cache.submit.aggregate import (
    VAR_FLOOR,
    cross_fitted,
    fit_stack,
    fit_weights,
    inverse_variance_mean,
    oof_scores,
    stack_predict,
    weighted_mean,
)
from biomass_cache.submit.members import (
    ResolvedMember,
    check_mc_dropout,
    check_not_collapsed,
    ensure_test_cache,
    mc_dropout_variance,
    member_key,
    oof_file,
    predict_cache_member,
    resolve_member,
    store_positions,
    weights_file,
    with_backbone_options,
)
from biomass_cache.submit.spec import FITTED, EnsembleSpec
from biomass_cache.submit.submission import check_every_target, write_submission
from biomass_cache.submit.shift import ensemble_shift, warning_text
from biomass_cache.train.runs import read_oof


@dataclass(frozen=True)
class OofSet:
    """The training images every member predicted out of fold: their labels and visits, each member's OOF grams and
    the ensemble's (given weights applied to them; fitted weights: cross-fitted, each fold by weights fitted without
    it)."""

    image_ids: list[str]
    groups: np.ndarray  # the (Sampling_Date, State) visit of each image
    labels: np.ndarray
    members: list[np.ndarray]
    grams: np.ndarray


@dataclass
class EnsembleResult:
    image_ids: list[str]
    grams: np.ndarray  # (N, 5) the ensemble's predictions, identities exact
    member_names: list[str]
    member_grams: list[np.ndarray]
    weights: np.ndarray  # (M,) the weights used (mc_dropout: the mean of the per-image weights); stack: (3, M)
    report: dict  # aggregation, OOF scores where known, artefact paths
    caches: list[Path]
    member_files: list[Path]
    resolved: list[ResolvedMember]
    stores: list  # each member's test TokenStore (None for a LoRA member)
    oof: OofSet | None = None  # when every member has OOF predictions (fitted weights: cross-fitted)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"image_id": self.image_ids, **{t: self.grams[:, j] for j, t in enumerate(TARGETS)}})


def _read_member_csv(path: Path, image_ids: Sequence[str], columns: Sequence[str]) -> np.ndarray | None:
    """A cached member file, or None if it does not hold exactly these images (then it is recomputed)."""
    df = pd.read_csv(path, dtype={"image_id": str})
    if df["image_id"].tolist() != list(image_ids) or not set(columns) <= set(df.columns):
        return None
    return df[list(columns)].to_numpy(dtype=np.float64)


def _cached(path: Path, image_ids: Sequence[str], columns: Sequence[str], compute: Callable[[], np.ndarray],
            what: str) -> np.ndarray:
    """Read `path` if it holds these images, else compute and write it atomically."""
    if path.is_file():
        values = _read_member_csv(path, image_ids, columns)
        if values is not None:
            tqdm.write(f"{what}: cached predictions {path}")
            return values
    values = np.asarray(compute(), dtype=np.float64).reshape(len(image_ids), len(columns))
    write_csv(path, pd.DataFrame({"image_id": list(image_ids), **dict(zip(columns, values.T))}))
    tqdm.write(f"{what}: predictions written to {path}")
    return values


def run_ensemble(spec: EnsembleSpec, data_dir: str | Path, out_dir: str | Path, device: str = "cpu",
                 progress: bool = True, train_csv: str | Path | None = None, precision: str | None = None,
                 devices: Sequence[str] | None = None, require_oof: str | None = None) -> EnsembleResult:
    """Predict data_dir/test.csv's images with every member (caches built or reused) and aggregate.

    OOF labels come from `train_csv` (default data_dir/train.csv) when every member has OOF predictions. Test
    caches are extracted in the training cache's precision unless `precision` (not "auto") says otherwise, and on
    `devices` when given (one backbone split over them).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)

    table = read_long_csv(data_dir / "test.csv")
    check_every_target(data_dir / "test.csv")
    ids = table["image_id"].tolist()
    hashes = content_hashes({i: data_dir / p for i, p in zip(ids, table["image_path"])})  # the caches' keys
    resolved = [with_backbone_options(resolve_member(m, spec.weights_files), precision, devices)
                for m in spec.members]
    for rm in resolved:  # what can be refused is refused before any test image is predicted
        if not spec.allow_collapsed:
            check_not_collapsed(rm)
        if spec.aggregation == "mc_dropout":
            check_mc_dropout(rm)
    fitted = spec.aggregation in FITTED  # OOF inputs and folds checked before any test image is predicted
    oof = oof_inputs(resolved, Path(train_csv or data_dir / "train.csv"), required=fitted or bool(require_oof),
                      aggregation=require_oof or f"{spec.aggregation} aggregation")
    folds, folds_csv = oof_folds(resolved, oof[2]) if fitted else (None, None)
    preds, variances, caches, files, stores = [], [], [], [], []
    for rm in resolved:
        what = f"member {rm.member.name}"
        if rm.kind == "lora":
            weights_file(rm)  # a missing weights file is an error before anything runs
            key = member_key(rm, hashes)
            from biomass_cache.lora.predict import predict_member  # the LoRA path (peft, plots) only for its members

            compute = lambda rm=rm: predict_member(rm, table, data_dir, device, progress, rm.extract.get("precision"))
            store = rows = None
        else:
            store = ensure_test_cache(rm, data_dir, out_dir, hashes, progress)
            caches.append(store.path)
            rows = store_positions(store, ids)
            key = member_key(rm, hashes, store)
            compute = lambda rm=rm, store=store, rows=rows: predict_cache_member(rm, store, rows, device)
        stores.append(store)
        path = out_dir / "members" / f"{key}.csv"
        preds.append(_cached(path, ids, TARGETS, compute, what))
        files.append(path)
        if spec.aggregation == "mc_dropout":
            var_path = out_dir / "members" / f"{key}-mc{spec.mc_samples}-seed{spec.mc_seed}.csv"
            var = lambda rm=rm, store=store, rows=rows: mc_dropout_variance(
                rm, store, rows, spec.mc_samples, spec.mc_seed, device)
            variances.append(_cached(var_path, ids, ["mc_variance_g2"], var, f"{what} MC-dropout")[:, 0])
            files.append(var_path)
    names = [rm.member.name for rm in resolved]
    given = np.array([m.weight for m in spec.members], dtype=np.float64)
    report: dict = {"aggregation": spec.aggregation, "members": names, "n_images": len(ids)}
    fit, combine = fitter(spec)
    if fitted:
        weights = fit(oof[0], oof[1])
        grams = combine(preds, weights)
    elif spec.aggregation == "mc_dropout":
        var = np.stack(variances)
        grams = inverse_variance_mean(preds, var)
        inv = 1.0 / np.maximum(var, VAR_FLOOR)
        weights = (inv / inv.sum(axis=0)).mean(axis=1)
    else:
        weights = given / given.sum()
        grams = weighted_mean(preds, weights)
    report["weights"] = _weights_report(names, weights)
    if oof is not None:
        report["oof"] = {"n_images": len(oof[1]), "ensemble_weights": "fitted" if fitted else "given",
                         **oof_scores(oof[0], oof[1], weights, combine)}
        report["oof"]["members"] = dict(zip(names, report["oof"]["members"]))
        if fitted:
            held_out = cross_fitted(oof[0], oof[1], folds, fit, combine)
            oof_grams = held_out.pop("predictions")  # the honest OOF of fitted weights: intervals calibrate on it
            report["oof"]["cross_fitted_oof"] = {**held_out, "folds_csv": str(folds_csv)}
        else:
            oof_grams = combine(oof[0], weights)
    ensemble_oof = None if oof is None else OofSet(oof[2], oof[3], oof[1], oof[0], oof_grams)
    return EnsembleResult(ids, grams, names, preds, weights, report, caches, files, resolved, stores, ensemble_oof)


def fitter(spec: EnsembleSpec) -> tuple[Callable, Callable]:
    """(fit, combine) of the aggregation: fit(preds, labels) -> weights, combine(preds, weights) -> grams."""
    if spec.aggregation == "stack":
        return (lambda p, y: fit_stack(p, y, spec.stack_alpha)), stack_predict
    return fit_weights, weighted_mean


def _weights_report(names: Sequence[str], weights: np.ndarray) -> dict:
    """member -> weight, or for a stack member -> {component: weight}."""
    if weights.ndim == 1:
        return dict(zip(names, weights.tolist()))
    return {name: dict(zip(COMPONENTS, col.tolist())) for name, col in zip(names, weights.T)}


def oof_inputs(resolved: Sequence[ResolvedMember], train_csv: Path, required: bool,
                aggregation: str) -> tuple[list[np.ndarray], np.ndarray, list[str], np.ndarray] | None:
    """The members' OOF predictions, the train labels, the ids of the images all of them predicted and their visits.

    Returns None when some member has no OOF file or there is no train.csv, unless `required`.
    """
    files = [oof_file(rm) for rm in resolved]
    if None in files or not train_csv.is_file():
        if not required:
            return None
        lacking = [rm.member.name for rm, f in zip(resolved, files) if f is None]
        raise EnsembleError(
            f"{aggregation} needs every member to be a run folder with out-of-fold predictions "
            "(oof_<head>.csv / oof.csv) and the labels' train.csv; "
            + (f"no OOF file for {lacking}" if lacking else f"{train_csv} not found")
        )
    table = read_long_csv(train_csv, check_images=False).set_index("image_id")
    labels = table[list(TARGETS)]
    frames = [read_oof(f).set_index("image_id")[list(TARGETS)] for f in files]
    common = labels.index[labels.notna().all(axis=1)]
    for f in frames:
        common = common.intersection(f.index[f.notna().all(axis=1)])
    if len(common) < 2:
        raise EnsembleError(f"the members' OOF files {[str(f) for f in files]} share fewer than 2 labelled images")
    rows = table.loc[common].reset_index()
    groups = (visit_groups(rows).to_numpy() if set(GROUP_COLUMNS) <= set(rows.columns)
              else rows["image_id"].to_numpy())  # without visits, every photo counts as its own
    return ([f.loc[common].to_numpy(np.float64) for f in frames], labels.loc[common].to_numpy(np.float64),
            common.tolist(), groups)


def oof_folds(resolved: Sequence[ResolvedMember], image_ids: Sequence[str]) -> tuple[np.ndarray, Path]:
    """The fold of every OOF image, from the members' folds.csv, and the file it came from.

    Members cross-validated on different splits are refused: one member's OOF prediction for a held-out image
    would come from a model trained on images the stacker is scored on, so no split gives an honest score.
    """
    table = pd.DataFrame({"image_id": list(image_ids)})
    first: tuple[ResolvedMember, Path, np.ndarray] | None = None
    for rm in resolved:
        path = rm.run_dir / "folds.csv"
        if not path.is_file():
            raise EnsembleError(f"member {rm.member.name}: {path} not found; the cross-fitted OOF score of a "
                                f"fitted aggregation needs the folds the run was trained on")
        try:
            folds = read_folds(path, table)
        except DataError as e:
            raise EnsembleError(f"member {rm.member.name}: {e}") from e
        if first is None:
            first = (rm, path, folds)
        elif not np.array_equal(folds, first[2]):
            k = int(np.flatnonzero(folds != first[2])[0])
            raise EnsembleError(
                f"members {first[0].member.name} and {rm.member.name} were cross-validated on different folds "
                f"(image {image_ids[k]}: fold {first[2][k]} in {first[1]}, fold {folds[k]} in {path}); a fitted "
                f"aggregation needs one split: retrain with --folds-csv {first[1]}")
    if len(np.unique(first[2])) < 2:
        raise EnsembleError(f"the members' OOF images all lie in one fold of {first[1]}; cross-fitting needs two")
    return first[2], first[1]


def report_text(result: EnsembleResult) -> str:
    """Members, their weights and OOF scores, the ensemble's OOF score, the caches used."""
    r = result.report
    oof = r.get("oof")
    lines = [f"ensemble of {len(result.member_names)} member(s), aggregation {r['aggregation']!r}, "
             f"{r['n_images']} test images"]
    width = max(len(n) for n in result.member_names) + 2
    stacked = r["aggregation"] == "stack"
    header, wide = ("weights clover/dead/green", 27) if stacked else ("weight", 8)
    lines.append(f"  {'member':<{width}}{header:>{wide}}" + (f"{'OOF competition_r2':>20}" if oof else ""))
    for name in result.member_names:
        w = r["weights"][name]
        text = "/".join(f"{v:.3f}" for v in w.values()) if stacked else f"{w:.3f}"
        lines.append(f"  {name:<{width}}{text:>{wide}}" + (f"{oof['members'][name]:>20.4f}" if oof else ""))
    if oof:
        fitted = oof["ensemble_weights"] == "fitted"
        label = "ensemble (fitted, in-sample)" if fitted else "ensemble (given weights)"
        lines.append(f"  {label:<{width}}{'':>{wide}}{oof['ensemble']:>20.4f}   on {oof['n_images']} OOF images"
                     + ("  (fitted and scored on the same rows: optimistic)" if fitted else ""))
        cross = oof.get("cross_fitted_oof")
        if cross:
            lines.append(f"  {'ensemble (cross-fitted)':<{width}}{'':>{wide}}{cross['ensemble']:>20.4f}   fitted on "
                         f"the other folds, scored on each of the {cross['n_folds']} folds of {cross['folds_csv']}")
    else:
        lines.append("  (no OOF scores: some member has no oof.csv, or no train.csv with labels)")
    lines += [f"  test cache: {p}" for p in dict.fromkeys(result.caches)]
    lines += [f"  member predictions: {p}" for p in result.member_files]
    return "\n".join(lines)


def report_path(out: str | Path) -> Path:
    """Where submit writes the ensemble's report (weights, OOF scores) beside the submission: NAME.report.json."""
    return Path(out).with_suffix(".report.json")


def submit(spec, data: str | Path, out: str | Path, work_dir: str | Path | None = None, device: str = "cpu",
           progress: bool = True, precision: str | None = None, devices: Sequence[str] | None = None):
    """Run the ensemble on data/test.csv, write the validated submission and its report JSON beside it; returns
    (EnsembleResult, frame)."""
    data, out = Path(data), Path(out)
    check_output_file(out, "--out")
    check_output_file(report_path(out), "--out (its report)")
    result = run_ensemble(spec, data, Path(work_dir) if work_dir else out.parent, device=device, progress=progress,
                          precision=precision, devices=devices)
    sub = write_submission(out, result.frame(), data / "test.csv")
    report = {**result.report, "submission": str(out)}
    shift = ensemble_shift(result)
    if shift is not None:  # photos unlike every training photo: listed beside the submission, never silent
        write_csv(out.with_name(f"{out.stem}.shift.csv"), shift)
        report["shift"] = {"file": str(out.with_name(f"{out.stem}.shift.csv")),
                           "unusual": shift.loc[shift["unusual"], "image_id"].tolist()}
    write_json(report_path(out), report)
    print(report_text(result))
    if shift is not None and (warning := warning_text(shift)):
        print(warning, file=sys.stderr)
    print(f"submission: {out} ({len(sub)} rows, validated); report: {report_path(out)}")
    return result, sub
