"""Ensembles: which trained heads predict the test images, from which test cache, and how they are combined.

An ensemble file (TOML, see configs/ensemble_example.toml) lists members - a run folder (every fold model, folds
averaged) or one head checkpoint - with a weight and, per backbone, the weights file the test cache is extracted
with. Members may mix backbones: one test cache per distinct extraction setting is built once under
`<out_dir>/cache/` and reused; each member's predictions (grams, folds and TTA views averaged) are cached under
`<out_dir>/members/` keyed by the checkpoints' sha256, the cache fingerprint and the photos' content sha256, so
re-aggregating is instant and a photo changed under its old name is predicted afresh.

A member is either heads on a token cache or, when its checkpoints say `kind: "lora"`, adapters + head on a live
backbone (biomass_cache.lora). Aggregation (biomass_cache.aggregate) happens in component space; a fitted one
(`oof`, `stack`) is fitted on the members' OOF predictions and also scored cross-fitted over the members' folds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from biomass_cache import inference, runs
from biomass_cache.aggregate import (STACK_ALPHA, VAR_FLOOR, cross_fitted, fit_stack, fit_weights,
                                     inverse_variance_mean, oof_scores, stack_predict, weighted_mean)
from biomass_cache.config import read_config
from biomass_cache.data import DataError
from biomass_cache.fingerprint import PRECISION_KEYS, FingerprintError, inherited_settings
from biomass_cache.targets import COMPONENTS, TARGETS, components_to_targets, to_grams

AGGREGATIONS = ("mean", "mc_dropout", "oof", "stack")
FITTED = ("oof", "stack")  # aggregations fitted on the members' OOF predictions


class EnsembleError(DataError):
    """An ensemble that cannot be built as described, with the member and file named."""


@dataclass(frozen=True)
class Member:
    """One entry of an ensemble: a run folder (all its folds) or a single head checkpoint (.json)."""

    path: Path
    weight: float = 1.0
    head: str | None = None  # which head of a run folder trained several (a sweep); None: the only one

    @property
    def name(self) -> str:
        return f"{self.path}" + (f"[{self.head}]" if self.head else "")


@dataclass(frozen=True)
class EnsembleSpec:
    members: tuple[Member, ...]
    weights_files: dict[str, str] = field(default_factory=dict)  # backbone name -> weights file ("random" ok)
    aggregation: str = "mean"
    mc_samples: int = 16
    mc_seed: int = 0
    stack_alpha: float = STACK_ALPHA  # ridge strength of `stack` (aggregate.fit_stack)
    allow_collapsed: bool = False  # use members with a fold that predicts a constant (metrics.json `collapsed`)

    def __post_init__(self) -> None:
        if not self.members:
            raise EnsembleError("an ensemble needs at least one member")
        if self.aggregation not in AGGREGATIONS:
            raise EnsembleError(f"unknown aggregation {self.aggregation!r}; choose one of {list(AGGREGATIONS)}")
        if self.mc_samples < 2:
            raise EnsembleError(f"mc_samples must be at least 2, got {self.mc_samples}")
        if not (np.isfinite(self.stack_alpha) and self.stack_alpha >= 0):
            raise EnsembleError(f"stack_alpha must be a finite number >= 0, got {self.stack_alpha}")
        for m in self.members:
            if not (np.isfinite(m.weight) and m.weight >= 0):
                raise EnsembleError(f"member {m.name}: weight must be a finite number >= 0, got {m.weight}")
        if sum(m.weight for m in self.members) <= 0:
            raise EnsembleError("member weights sum to 0")


MEMBER_KEYS = {"path", "weight", "head"}
TOP_KEYS = {"aggregation", "mc_samples", "mc_seed", "stack_alpha", "weights", "member"}


def load_ensemble(path: str | Path) -> EnsembleSpec:
    """Parse an ensemble TOML file; unknown keys are errors (a typo must not silently change the ensemble). Every
    mistake in the file is a ConfigError naming it."""
    conf = read_config(path, what="ensemble", option="--ensemble", suffixes=None,
                       see="configs/ensemble_example.toml")
    raw = conf.doc
    conf.check_keys(raw, TOP_KEYS)
    entries = raw.get("member", [])
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise conf.error("list the members as [[member]] tables with at least a `path`")
    members = []
    for k, entry in enumerate(entries, start=1):
        bad = set(entry) - MEMBER_KEYS
        if bad or "path" not in entry:
            raise conf.error(f"member #{k} " + (f"has unknown key(s) {sorted(bad)}" if bad else "has no `path`")
                             + f"; allowed: {sorted(MEMBER_KEYS)}")
        try:
            members.append(Member(Path(entry["path"]), float(entry.get("weight", 1.0)), entry.get("head")))
        except (TypeError, ValueError):
            raise conf.error(f"member #{k}: weight must be a number, got {entry.get('weight')!r}") from None
    weights = raw.get("weights", {})
    if not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values()):
        raise conf.error("[weights] maps backbone names to weights files, e.g. "
                         'vit_small_patch16_dinov3 = "/models/dinov3_vits16.pth"')
    try:
        return EnsembleSpec(tuple(members), dict(weights), raw.get("aggregation", "mean"),
                            int(raw.get("mc_samples", 16)), int(raw.get("mc_seed", 0)),
                            float(raw.get("stack_alpha", STACK_ALPHA)))
    except EnsembleError as e:
        raise conf.error(str(e)) from None
    except (TypeError, ValueError) as e:  # int() of mc_samples / mc_seed, float() of stack_alpha
        raise conf.error(f"mc_samples and mc_seed must be integers, stack_alpha a number ({e})") from None


def spec_from_options(ensemble: str | Path | None, members: str | None, aggregation: str | None = None,
                      mc_samples: int | None = None, weights: str | None = None,
                      allow_collapsed: bool = False) -> EnsembleSpec:
    """The command-line way: exactly one of an ensemble file or `--members A,B` (equal weights, every backbone
    setting taken from each run folder's config.json); `aggregation`, `mc_samples` and `weights`
    ("BACKBONE=PATH[,BACKBONE=PATH]", the weights file per backbone) override the file; `allow_collapsed`
    admits members with collapsed folds."""
    if (ensemble is None) == (members is None):
        raise EnsembleError("give exactly one of --ensemble FILE or --members RUN_DIR[,RUN_DIR...]")
    if ensemble is not None:
        spec = load_ensemble(ensemble)
    else:
        spec = EnsembleSpec(tuple(Member(Path(p.strip())) for p in members.split(",") if p.strip()))
    overrides = {k: v for k, v in dict(aggregation=aggregation, mc_samples=mc_samples).items() if v is not None}
    if allow_collapsed:
        overrides["allow_collapsed"] = True
    if weights:
        pairs = [w.split("=", 1) for w in weights.split(",") if w.strip()]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise EnsembleError(f"--weights takes BACKBONE=PATH[,BACKBONE=PATH...], got {weights!r}")
        overrides["weights_files"] = {**spec.weights_files, **{k.strip(): v.strip() for k, v in pairs}}
    return replace(spec, **overrides) if overrides else spec


# ----------------------------------------------------------------------------------------------- members


@dataclass(frozen=True)
class ResolvedMember:
    """A member with its checkpoints found, their kind, and the backbone settings its predictions need."""

    member: Member
    run_dir: Path
    checkpoints: tuple[Path, ...]  # head JSONs: every fold model of a run folder, or the single checkpoint
    kind: str  # "cache": heads read a test token cache; "lora": adapters + head on a live backbone (biomass_cache.lora)
    extract: dict  # cache: the run's extraction settings; lora: backbone, weights; weights per the [weights] table
    reduction: Path | None = None  # cache: the run's reduction (reduce.py) that test stores go through, if any
    ignore: tuple[str, ...] = ()  # fingerprint keys the test cache may change: ("compute",) under --precision


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EnsembleError(f"{path}: not a readable JSON file ({e})") from e


def resolve_member(member: Member, weights_files: dict[str, str]) -> ResolvedMember:
    """Find a member's head checkpoints, their kind (the checkpoint JSON's `kind`) and its run's settings."""
    path = member.path
    if path.is_dir():
        run_dir = path
        fold = sorted(run_dir.glob("fold*/*.json")) or sorted(run_dir.glob("full/*.json"))
        names = sorted({p.stem for p in fold})
        if member.head is None and len(names) > 1:
            raise EnsembleError(f"member {member.name}: the run folder holds several heads {names}; "
                                f"say which with `head = \"...\"`")
        wanted = member.head or (names[0] if names else None)
        if wanted not in names:
            raise EnsembleError(f"member {member.name}: no head checkpoint {wanted or '*'}.json under "
                                f"{run_dir}/fold*/ or {run_dir}/full/ (heads found: {names})")
        try:
            checkpoints = tuple(runs.complete_checkpoints(run_dir, wanted))
        except DataError as e:
            raise EnsembleError(f"member {member.name}: {e}") from e
    elif path.suffix in (".json", ".safetensors") and path.with_suffix(".json").is_file():
        checkpoints = (path.with_suffix(".json"),)
        run_dir = checkpoints[0].parent.parent
    else:
        raise EnsembleError(f"member {member.name}: not a run folder or a head checkpoint (.json + .safetensors)")
    kinds = {_read_json(p).get("kind", "cache") for p in checkpoints}
    if len(kinds) > 1:
        raise EnsembleError(f"member {member.name}: its checkpoints mix kinds {sorted(kinds)}")
    kind = kinds.pop()
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise EnsembleError(f"member {member.name}: {config_path} not found (the run's settings)")
    config = _read_json(config_path)
    extract = _lora_settings(config, config_path) if kind == "lora" else _extract_settings(config, config_path)
    if extract["backbone"] in weights_files:
        extract["weights"] = weights_files[extract["backbone"]]
    reduction = None
    if kind == "cache" and "reduce" in config["cache"]["fingerprint"]:
        reduction = run_dir / "reduction.json"
        if not reduction.is_file():
            raise EnsembleError(f"member {member.name}: its heads were trained on a reduced token store, and the "
                                f"run folder lacks the projection {reduction} that test tokens must go through")
    return ResolvedMember(member, run_dir, checkpoints, kind, extract, reduction)


class CollapsedMemberError(EnsembleError):
    """A member with a fold model that predicts a constant: it would drag the ensemble towards 0 g."""


def check_not_collapsed(rm: ResolvedMember) -> None:
    """Refuse a member whose run recorded collapsed folds (metrics.json `collapsed`) among the checkpoints used."""
    metrics = rm.run_dir / "metrics.json"
    if not metrics.is_file():
        return
    head = rm.checkpoints[0].stem
    used = {p.parent.name for p in rm.checkpoints}
    bad = [c for c in _read_json(metrics).get("heads", {}).get(head, {}).get("collapsed", []) if c["fold"] in used]
    if bad:
        raise CollapsedMemberError(
            f"member {rm.member.name}: head {head} " + "; ".join(f"{c['fold']} predicts a constant for "
                                                                 f"{', '.join(c['targets'])}" for c in bad)
            + f" (recorded in {metrics}); retrain it, leave it out, or pass --allow-collapsed to use it anyway")


def with_backbone_options(rm: ResolvedMember, precision: str | None, devices: Sequence[str] | None) -> ResolvedMember:
    """The member with the command line's backbone precision and devices; a precision other than the training
    cache's is allowed (with a warning), since a GPU may lack the one the heads were trained with."""
    from tqdm.auto import tqdm

    extract, ignore = dict(rm.extract), rm.ignore
    if devices and rm.kind == "cache":
        extract["devices"] = list(devices)
    if precision not in (None, "auto"):
        trained = extract.get("precision")
        if rm.kind == "cache" and trained != precision:
            tqdm.write(f"WARNING: member {rm.member.name}: its heads were trained on {trained} tokens; the test "
                       f"tokens are computed in {precision} (--precision), so they differ slightly")
            ignore = PRECISION_KEYS
        extract["precision"] = precision
    return replace(rm, extract=extract, ignore=ignore)


def _extract_settings(config: dict, path: Path) -> dict:
    """ExtractConfig settings (besides data_dir, split, out) that rebuild the run's cache for other images.

    Taken from the cache fingerprint recorded in config.json (what the heads were really trained on,
    fingerprint.inherited_settings); the weights file from the cache's `weights_path` (recorded at extraction), else
    the run's [extract] section, else "random" for a random backbone (None: the ensemble file or --weights must say
    where the weights are). The precision is the fingerprint's (tokens of other precisions differ), on the GPU when
    there is one.
    """
    try:
        settings = inherited_settings(config["cache"]["fingerprint"])
    except (KeyError, TypeError) as e:
        raise EnsembleError(f"{path}: config.json lacks the field cache.fingerprint") from e
    except FingerprintError as e:
        raise EnsembleError(f"{path}: {e}") from e
    sha = settings["weights_sha256"]
    recorded = config["cache"].get("weights_path") or (config.get("extract") or {}).get("weights")
    settings["weights"] = "random" if sha == "random" else (recorded if recorded not in (None, "random") else None)
    return settings


def _lora_settings(config: dict, path: Path) -> dict:
    """The base backbone of a LoRA run: its name, the weights file recorded at training and their sha256."""
    try:
        lora, sha = config["lora"], config["fingerprint"]["backbone"]["weights_sha256"]
        return {"backbone": lora["backbone"], "weights": lora["weights"], "weights_sha256": sha}
    except (KeyError, TypeError) as e:
        raise EnsembleError(f"{path}: config.json of a LoRA run lacks the field {e}") from e


def weights_file(rm: ResolvedMember) -> str:
    """The member's backbone weights ("random" or an existing file), or an error saying how to name them."""
    backbone, weights = rm.extract["backbone"], rm.extract["weights"]
    how = (f"say where it is with --weights {backbone}=PATH or in the ensemble file's [weights] table "
           f"({backbone} = \"PATH\")")
    if weights is None:
        raise EnsembleError(f"member {rm.member.name}: its heads were trained on tokens of {backbone} with weights "
                            f"sha256 {rm.extract['weights_sha256'][:12]}..., and the run does not record the file; "
                            + how)
    if weights != "random" and not Path(weights).is_file():
        raise EnsembleError(f"member {rm.member.name}: weights file {weights} for {backbone} not found; " + how)
    return weights


def ensure_test_cache(rm: ResolvedMember, data_dir: Path, out_dir: Path, hashes: dict[str, str | None],
                      progress: bool):
    """The member's test cache under out_dir/cache/ for the images `hashes` names: reused when complete and every
    photo's recorded content hash equals the current one, else extracted (only what is missing or changed); then
    reduced with the run's projection when its heads were trained on a reduced store (reduce.py)."""
    from biomass_cache.extract import ExtractConfig, extract
    from biomass_cache.reduce import Reduction, reduce_store
    from biomass_cache.store import open_store
    from biomass_cache.views import TTA_VIEWS

    weights = weights_file(rm)
    settings = {k: v for k, v in rm.extract.items() if k != "weights_sha256"}
    stamp = None if weights == "random" else (str(Path(weights).resolve()), Path(weights).stat().st_mtime_ns)
    image_ids = list(hashes)
    same_tokens = {k: v for k, v in settings.items() if k != "devices"}  # a split backbone gives the same tokens
    key = _digest({"settings": same_tokens, "weights": stamp, "images": image_ids})
    path = out_dir / "cache" / f"test-{key}.zarr"

    def complete(p: Path) -> bool:
        if not p.exists():
            return False
        store = open_store(p)
        recorded = store.content_hashes
        return (set(image_ids) <= set(store.image_ids) and bool(store.done()[_positions(store, image_ids)].all())
                and all(h is not None and recorded.get(i) == h for i, h in hashes.items()))

    if not complete(path):
        extract(ExtractConfig(data_dir=data_dir, split="test", out=path, views=len(TTA_VIEWS), **settings),
                progress=progress)
    if rm.reduction is None:
        return open_store(path)
    reduction = Reduction.load(rm.reduction.with_suffix(""))
    reduced = path.with_name(f"{path.stem}-reduced-{reduction.sha256[:16]}.zarr")
    if not complete(reduced):
        reduce_store(open_store(path), reduction, reduced, overwrite=True, progress=progress, ignore=rm.ignore)
    return open_store(reduced)


def _positions(store, image_ids: Sequence[str]) -> np.ndarray:
    position = {iid: k for k, iid in enumerate(store.image_ids)}
    return np.array([position[i] for i in image_ids], dtype=np.int64)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def member_key(rm: ResolvedMember, hashes: dict[str, str | None], store=None) -> str:
    """What a member's cached predictions depend on: its checkpoint files, the cache fingerprint (cache kind) or
    the backbone settings (lora kind), the images and their photos' contents (`hashes`: id -> sha256)."""
    from biomass_cache.content import sha256_file

    files = [(sha256_file(p), sha256_file(p.with_suffix(".safetensors"))) for p in rm.checkpoints]
    source = store.fingerprint if store is not None else rm.extract
    return _digest({"checkpoints": files, "source": source, "images": list(hashes), "kind": rm.kind,
                    "contents": list(hashes.values())})


def load_checked_heads(rm: ResolvedMember, store) -> list[tuple[torch.nn.Module, dict]]:
    """Every checkpoint of the member, refused (naming the checkpoint and the cache) unless it fits `store`."""
    out = []
    for path in rm.checkpoints:
        head, meta = runs.load_head(path)
        try:
            runs.check_compatible(meta, store, rm.ignore)
        except DataError as e:
            raise EnsembleError(f"member {rm.member.name}: checkpoint {path} does not fit the test cache "
                                f"{store.path}: {e}") from e
        out.append((head, meta))
    return out


def predict_cache_member(rm: ResolvedMember, store, rows: np.ndarray, device: str) -> np.ndarray:
    """(N, 5) grams: every fold model predicts (mean over the TTA views); folds averaged on the components."""
    comps = [inference.predict_store(head, meta, store, rows, views="all", device=device, ignore=rm.ignore).grams[:, :3]
             for head, meta in load_checked_heads(rm, store)]
    return components_to_targets(np.mean(comps, axis=0))


def mc_dropout_variance(rm: ResolvedMember, store, rows: np.ndarray, n_samples: int, seed: int,
                        device: str) -> np.ndarray:
    """(N,) per-image variance (grams^2, summed over clover, dead, green) of the member's MC-dropout samples.

    One sample = one fold model with one set of dropout masks, averaged over the TTA views; the variance is
    taken over all folds x `n_samples` samples, so disagreement between fold models counts as uncertainty too.
    """
    samples = []
    for (head, meta), path in zip(load_checked_heads(rm, store), rm.checkpoints):
        inference.enable_mc_dropout(head, f"member {rm.member.name}, checkpoint {path}")
        samples.append(inference.predict_store(head, meta, store, rows, views="all", device=device,
                                               ignore=rm.ignore, samples=n_samples, seed=seed).samples)
    grams = to_grams(np.concatenate(samples))  # (folds * n_samples, N, 3)
    return grams.var(axis=0).sum(axis=1)


# ------------------------------------------------------------------------------------------ running an ensemble


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
    from biomass_cache.io import write_csv
    from tqdm.auto import tqdm

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
                 devices: Sequence[str] | None = None) -> EnsembleResult:
    """Predict data_dir/test.csv's images with every member (caches built or reused) and aggregate.

    OOF labels come from `train_csv` (default data_dir/train.csv) when every member has OOF predictions. Test
    caches are extracted in the training cache's precision unless `precision` (not "auto") says otherwise, and on
    `devices` when given (one backbone split over them).
    """
    from biomass_cache.data import read_long_csv

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    from biomass_cache.content import content_hashes

    table = read_long_csv(data_dir / "test.csv")
    ids = table["image_id"].tolist()
    hashes = content_hashes({i: data_dir / p for i, p in zip(ids, table["image_path"])})  # the caches' keys
    resolved = [with_backbone_options(resolve_member(m, spec.weights_files), precision, devices)
                for m in spec.members]
    if not spec.allow_collapsed:
        for rm in resolved:
            check_not_collapsed(rm)
    fitted = spec.aggregation in FITTED  # OOF inputs and folds checked before any test image is predicted
    oof = _oof_inputs(resolved, Path(train_csv or data_dir / "train.csv"), required=fitted,
                      aggregation=spec.aggregation)
    folds, folds_csv = oof_folds(resolved, oof[2]) if fitted else (None, None)
    preds, variances, caches, files, stores = [], [], [], [], []
    for rm in resolved:
        what = f"member {rm.member.name}"
        if rm.kind == "lora":
            from biomass_cache.lora.predict import predict_member

            weights_file(rm)  # a missing weights file is an error before anything runs
            key = member_key(rm, hashes)
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
            if store is None:
                raise EnsembleError(f"{what}: mc_dropout aggregation needs heads on a token cache, not LoRA members")
            var_path = out_dir / "members" / f"{key}-mc{spec.mc_samples}-seed{spec.mc_seed}.csv"
            var = lambda rm=rm, store=store, rows=rows: mc_dropout_variance(
                rm, store, rows, spec.mc_samples, spec.mc_seed, device)
            variances.append(_cached(var_path, ids, ["mc_variance_g2"], var, f"{what} MC-dropout")[:, 0])
            files.append(var_path)
    names = [rm.member.name for rm in resolved]
    given = np.array([m.weight for m in spec.members], dtype=np.float64)
    report: dict = {"aggregation": spec.aggregation, "members": names, "n_images": len(ids)}
    fit, combine = _fitter(spec)
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
            report["oof"]["cross_fitted_oof"] = {**cross_fitted(oof[0], oof[1], folds, fit, combine),
                                                 "folds_csv": str(folds_csv)}
    return EnsembleResult(ids, grams, names, preds, weights, report, caches, files, resolved, stores)


def _fitter(spec: EnsembleSpec) -> tuple[Callable, Callable]:
    """(fit, combine) of the aggregation: fit(preds, labels) -> weights, combine(preds, weights) -> grams."""
    if spec.aggregation == "stack":
        return (lambda p, y: fit_stack(p, y, spec.stack_alpha)), stack_predict
    return fit_weights, weighted_mean


def _weights_report(names: Sequence[str], weights: np.ndarray) -> dict:
    """member -> weight, or for a stack member -> {component: weight}."""
    if weights.ndim == 1:
        return dict(zip(names, weights.tolist()))
    return {name: dict(zip(COMPONENTS, col.tolist())) for name, col in zip(names, weights.T)}


def store_positions(store, image_ids: Sequence[str]) -> np.ndarray:
    """Row of every image in the store, all TTA views done (a clear error otherwise)."""
    from biomass_cache.dataset import store_rows

    return store_rows(store, list(image_ids), range(store.n_views))


def _oof_file(rm: ResolvedMember) -> Path | None:
    if not rm.member.path.is_dir():
        return None
    head = rm.checkpoints[0].stem
    for path in (rm.run_dir / f"oof_{head}.csv", rm.run_dir / "oof.csv"):
        if path.is_file() and (path.name != "oof.csv" or _best_head(rm.run_dir) in (None, head)):
            return path
    return None


def _best_head(run_dir: Path) -> str | None:
    metrics = run_dir / "metrics.json"
    return _read_json(metrics).get("best") if metrics.is_file() else None


def _oof_inputs(resolved: Sequence[ResolvedMember], train_csv: Path, required: bool,
                aggregation: str) -> tuple[list[np.ndarray], np.ndarray, list[str]] | None:
    """The members' OOF predictions, the train labels and the ids of the images all of them predicted.

    Returns None when some member has no OOF file or there is no train.csv, unless `required`.
    """
    from biomass_cache.data import read_long_csv
    from biomass_cache.runs import read_oof

    files = [_oof_file(rm) for rm in resolved]
    if None in files or not train_csv.is_file():
        if not required:
            return None
        lacking = [rm.member.name for rm, f in zip(resolved, files) if f is None]
        raise EnsembleError(
            f"{aggregation} aggregation needs every member to be a run folder with out-of-fold predictions "
            "(oof_<head>.csv / oof.csv) and the labels' train.csv; "
            + (f"no OOF file for {lacking}" if lacking else f"{train_csv} not found")
        )
    labels = read_long_csv(train_csv, check_images=False).set_index("image_id")[list(TARGETS)]
    frames = [read_oof(f).set_index("image_id")[list(TARGETS)] for f in files]
    common = labels.index[labels.notna().all(axis=1)]
    for f in frames:
        common = common.intersection(f.index[f.notna().all(axis=1)])
    if len(common) < 2:
        raise EnsembleError(f"the members' OOF files {[str(f) for f in files]} share fewer than 2 labelled images")
    return ([f.loc[common].to_numpy(np.float64) for f in frames], labels.loc[common].to_numpy(np.float64),
            common.tolist())


def oof_folds(resolved: Sequence[ResolvedMember], image_ids: Sequence[str]) -> tuple[np.ndarray, Path]:
    """The fold of every OOF image, from the members' folds.csv, and the file it came from.

    Members cross-validated on different splits are refused: one member's OOF prediction for a held-out image
    would come from a model trained on images the stacker is scored on, so no split gives an honest score.
    """
    from biomass_cache.folds import read_folds

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
