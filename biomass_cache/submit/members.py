"""One ensemble member made ready to predict: its checkpoints found, its kind (heads on a token cache, or LoRA
adapters on a live backbone), the backbone settings that rebuild its tokens for the test images, its test cache,
and its predictions.

A member's test cache is built once per distinct extraction setting under `<out_dir>/cache/` and reused while the
photos' contents are unchanged; `member_key` names what a member's cached predictions depend on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from biomass_cache.backbone.views import TTA_VIEWS
from biomass_cache.common.content import sha256_file
from biomass_cache.common.errors import CollapsedMemberError, DataError, EnsembleError, FingerprintError
from biomass_cache.common.targets import components_to_targets, to_grams
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.extract.pipeline import extract
from biomass_cache.heads import has_maps
from biomass_cache.store.fingerprint import PRECISION_KEYS, inherited_settings
from biomass_cache.store.layout import open_store
from biomass_cache.store.reduce import Reduction
from biomass_cache.submit.spec import Member
from biomass_cache.train import inference, runs
from biomass_cache.train.dataset import store_rows


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
            raise EnsembleError(f"member {member.name}: the run folder holds several heads {names}; say which: "
                                f"--members {member.path}:{_best_head(run_dir) or names[0]} (the run's best), or "
                                f"`head = \"...\"` in an ensemble file")
        wanted = member.head or (names[0] if names else None)
        if wanted not in names:
            seeds = sorted(p.parent for p in run_dir.glob("seed*/metrics.json"))
            raise EnsembleError(f"member {member.name}: no head checkpoint {wanted or '*'}.json under "
                                f"{run_dir}/fold*/ or {run_dir}/full/ (heads found: {names})" + (
                                    "; it holds the runs of a seed ensemble (train --seeds): name them, e.g. "
                                    f"--members {','.join(map(str, seeds))}" if seeds else ""))
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


def check_mc_dropout(rm: ResolvedMember) -> None:
    """Refuse, before any test image is predicted, a member MC-dropout cannot sample: a LoRA member (no token
    cache to sample on) or a checkpoint whose head has no dropout."""
    if rm.kind == "lora":
        raise EnsembleError(f"member {rm.member.name}: mc_dropout aggregation needs heads on a token cache, not LoRA "
                            "members")
    for path in rm.checkpoints:
        inference.enable_mc_dropout(runs.load_head(path)[0], f"member {rm.member.name}, checkpoint {path}")


def draws_maps(rm: ResolvedMember) -> bool:
    """Whether every checkpoint of the member has a head that draws density maps (read from the JSONs alone)."""
    return rm.kind == "cache" and all(has_maps(_read_json(p).get("head", {})) for p in rm.checkpoints)


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
    photo's recorded content hash equals the current one, else extracted (only what is missing or changed), reduced
    in the pass with the run's projection when its heads were trained on a reduced store (extract/inpass.py)."""
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

    if rm.reduction is not None:  # reduced in the extraction pass with the run's projection
        path = path.with_name(f"{path.stem}-reduced-{Reduction.load(rm.reduction.with_suffix('')).sha256[:16]}.zarr")
        settings |= {"reduce": True, "like": rm.reduction.parent}
    if not complete(path):
        extract(ExtractConfig(data_dir=data_dir, split="test", out=path, views=len(TTA_VIEWS), **settings),
                progress=progress, like_ignore=tuple(rm.ignore))
    return open_store(path)


def _positions(store, image_ids: Sequence[str]) -> np.ndarray:
    position = {iid: k for k, iid in enumerate(store.image_ids)}
    return np.array([position[i] for i in image_ids], dtype=np.int64)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def member_key(rm: ResolvedMember, hashes: dict[str, str | None], store=None) -> str:
    """What a member's cached predictions depend on: its checkpoint files, the cache fingerprint (cache kind) or
    the backbone settings (lora kind), the images and their photos' contents (`hashes`: id -> sha256)."""
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




def store_positions(store, image_ids: Sequence[str]) -> np.ndarray:
    """Row of every image in the store, all TTA views done (a clear error otherwise)."""
    return store_rows(store, list(image_ids), range(store.n_views))


def oof_file(rm: ResolvedMember) -> Path | None:
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


