"""The run folder: everything a training run leaves behind, each file written atomically.

RUN_DIR/
  config.json                    resolved configuration (after config file + CLI flags)
  folds.csv                      image_id, group, fold (reused by later runs and stages)
  fold{k}/{head}.safetensors     head weights (EMA when on), tensors only
  fold{k}/{head}.json            what rebuilds and checks the head: config, z-score, aux encoding, cache
                                 fingerprint, layers, channels, grid, weights sha256, training metrics
  full/{head}.*                  the same for a model trained on all images (--full)
  oof.csv / oof_{head}.csv       out-of-fold predictions in grams (image_id + 5 targets)
  metrics.json                   pooled OOF and per-fold scores
  history.csv                    per fold/epoch/head losses and validation scores
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save

from biomass_cache.common.content import sha256_file
from biomass_cache.common.errors import DataError
from biomass_cache.common.runtime import command_line
from biomass_cache.common.io import left_by_killed, write_bytes, write_csv, write_json, writing
from biomass_cache.common.lock import WriterLock
from biomass_cache.common.targets import TARGETS, ZScore
from biomass_cache.heads import check_compatible as check_signature
from biomass_cache.heads import rebuild_head
from biomass_cache.store.fingerprint import relaxed_diff

FORMAT_VERSION = 1


def save_head(json_path: str | Path, head: torch.nn.Module, meta: dict) -> None:
    """Weights to `<stem>.safetensors`, then the JSON: a JSON on disk always has its weights beside it."""
    json_path = Path(json_path)
    weights = json_path.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    write_bytes(weights, save(tensors))
    write_json(json_path, {**meta, "weights_sha256": sha256_file(weights), "format_version": FORMAT_VERSION})


def load_head(json_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a head from its JSON + safetensors (eval mode, CPU) and check it is the head that was saved."""
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{json_path}: not a readable head checkpoint ({e})") from e
    if meta.get("kind") == "lora":
        raise DataError(f"{json_path}: a LoRA checkpoint (head + adapters on a live backbone, no token cache); "
                        "load it with biomass_cache.lora.load_checkpoint")
    missing = {"head", "zscore", "aux", "fingerprint", "layers", "channels", "grid", "weights_sha256"} - set(meta)
    if missing:
        raise DataError(f"{json_path}: head checkpoint lacks keys {sorted(missing)}")
    weights = json_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise DataError(f"{json_path}: its weights file {weights.name} is missing")
    if sha256_file(weights) != meta["weights_sha256"]:
        raise DataError(f"{weights}: sha256 differs from the one recorded in {json_path.name} (file changed?)")
    head = rebuild_head(meta["head"], ZScore.from_dict(meta["zscore"]))
    try:
        head.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as e:
        raise DataError(f"{weights}: weights do not fit the head described in {json_path.name}: {e}") from e
    expected = (len(meta["layers"]), meta["channels"], tuple(meta["grid"]))
    built = (meta["head"].get("n_layers"), meta["head"].get("channels"), tuple(meta["head"].get("grid", ())))
    if built != expected:
        raise DataError(f"{json_path}: head config (n_layers, channels, grid) {built} != checkpoint {expected}")
    return head.eval(), meta


def check_compatible(meta: dict, store, ignore: Sequence[str] = ()) -> None:
    """Refuse a cache the head was not trained on: other extraction settings, missing layers, other width/grid.

    A test cache differs from the training cache only in what fingerprint.relaxed_diff allows (TTA views instead of
    augmented ones) and the fingerprint keys `ignore` names (the compute precision, when the user chose another one).
    """
    where = f"head {meta.get('name', '?')} (fold {meta.get('fold', '?')})"
    trained, cache = meta["fingerprint"].get("reduce"), store.fingerprint.get("reduce")
    if trained and not cache:
        raise DataError(f"{where} was trained on a reduced token store ({trained}); {store.path} is not reduced: "
                        f"reduce it with `biomass reduce --cache {store.path} --like RUN_DIR --out STORE`")
    if cache and not trained:
        raise DataError(f"{where} was trained on unreduced tokens; {store.path} is a reduced store ({cache}): "
                        "use the store it was reduced from")
    try:
        check_signature(meta["head"], store)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from e
    diff = relaxed_diff(meta["fingerprint"], store.fingerprint, ignore)
    if diff:
        raise DataError(f"{where} was trained on tokens extracted with another configuration than the token "
                        f"store {store.path} (trained on -> store): " + "; ".join(diff))


def predictions_frame(image_ids: Sequence[str], grams: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(image_ids), **{t: grams[:, j] for j, t in enumerate(TARGETS)}})


def write_oof(path: str | Path, image_ids: Sequence[str], grams: np.ndarray) -> None:
    write_csv(path, predictions_frame(image_ids, grams))


def read_oof(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"image_id": str})
    missing = [c for c in ("image_id", *TARGETS) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: OOF file lacks columns {missing}")
    return df


def write_config(run_dir: str | Path, config: dict) -> None:
    """config.json, with the command line that made the run when it came from one (`command`)."""
    write_json(Path(run_dir) / "config.json", {**config, **({"command": c} if (c := command_line()) else {})})


def write_metrics(run_dir: str | Path, metrics: dict) -> None:
    write_json(Path(run_dir) / "metrics.json", metrics)


def write_history(run_dir: str | Path, rows: list[dict]) -> None:
    write_csv(Path(run_dir) / "history.csv", pd.DataFrame(rows))



RESULTS = ("config.json", "reduction.json", "reduction.safetensors", "metrics.json", "history.csv", "oof*.csv",
           "fold[0-9]*", "full", "plots", "rounds")  # folds.csv stays; rounds/: a pseudo run's earlier rounds


def results(run_dir: Path) -> list[Path]:
    """The files and folders of a run in `run_dir` (RESULTS), folds.csv aside."""
    return sorted(p for pattern in RESULTS for p in run_dir.glob(pattern)) if run_dir.is_dir() else []


def remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def saved_models(run_dir: Path) -> list[Path]:
    """What makes a folder an earlier run worth keeping: its metrics, or a fold model it saved."""
    return sorted([*run_dir.glob("metrics.json"), *run_dir.glob("fold*/*.json"), *run_dir.glob("full/*.json")])


def prepare_run_dir(run_dir: str | Path, overwrite: bool) -> list[Path]:
    """The earlier files in `run_dir` a new training run replaces (folds.csv is kept and reused). A folder holding
    an earlier run's models or metrics is refused (its old heads would sit beside the new ones as ensemble
    members), unless `overwrite`; the leftovers of a run stopped before it saved a model are replaced either way."""
    run_dir = Path(run_dir)
    old = results(run_dir)
    if saved_models(run_dir) and not overwrite:
        raise DataError(f"{run_dir} already holds a training run ({', '.join(p.name for p in old[:6])}); "
                        "write to another --out, or pass --overwrite to replace that run (folds.csv is kept and "
                        "reused)")
    return old


@contextmanager
def claim_run_dir(run_dir: str | Path, overwrite: bool, writer: bool = True,
                  stops: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Hold `run_dir` for one training run (`writer`: rank 0; the other ranks write nothing) from before its
    expensive start to its end. Its writer lock refuses a second run on it instead of mixing the two. The earlier
    run (`prepare_run_dir`) is set aside, with a copy of folds.csv, and deleted when this run ends well; a run that
    fails or is stopped leaves the folder as it found it: the earlier run put back (whatever this one saved), or,
    in a folder without one, nothing unless it saved fold models, which stay and are named. A run killed outright
    (`kill -9`, a power cut) has its set-aside run put back by the next claim. `stops`: exceptions that end a run
    by design (a pruned tuning trial): what it saved stays, unsaid."""
    if not writer:
        yield
        return
    run_dir = Path(run_dir)
    with WriterLock(run_dir, "two runs would mix their models in one folder"):
        put_back_killed(run_dir)
        existed, had_folds = run_dir.exists(), (run_dir / "folds.csv").exists()
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
        old = prepare_run_dir(run_dir, overwrite)
        if old:
            aside.mkdir()
            for p in old:
                os.replace(p, aside / p.name)
            if had_folds:
                shutil.copy2(run_dir / "folds.csv", aside / "folds.csv")
            print(f"{'--overwrite: ' if overwrite else ''}the earlier files {[p.name for p in old]} are set aside "
                  f"until this run ends")
        try:
            with writing(run_dir):
                yield
        except stops:
            shutil.rmtree(aside, ignore_errors=True)
            raise
        except BaseException:
            kept = sorted(p for p in run_dir.rglob("*.json") if p.parent.name == "full"
                          or (p.parent.name.startswith("fold") and p.parent.name[4:].isdigit()))
            if old:
                put_back(run_dir, aside)
                print(f"{run_dir}: the run stopped; the earlier run is back as it was"
                      + (f" (this run's {', '.join(str(p.relative_to(run_dir)) for p in kept)} discarded)"
                         if kept else ""), file=sys.stderr)
            elif kept:
                print(f"{run_dir}: the run stopped after saving {', '.join(str(p.relative_to(run_dir)) for p in kept)}"
                      "; they stay (each works as a one-checkpoint member), but the run is unfinished: rerun it "
                      "with --overwrite", file=sys.stderr)
            else:
                remove(results(run_dir) + ([] if had_folds else [run_dir / "folds.csv"]))
                if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
                    run_dir.rmdir()
            raise
        shutil.rmtree(aside, ignore_errors=True)


def put_back_killed(run_dir: Path) -> None:
    """Undo what killed runs left in and beside `run_dir`: the earlier runs they had set aside
    (`.NAME.replaced-PID`, also of a pseudo run's rounds inside it) go back, their temporary files go."""
    for pattern_dir, pattern in ((run_dir.parent, f".{run_dir.name}.replaced-*"), (run_dir, "**/.*.replaced-*")):
        for stale in sorted(p for p in pattern_dir.glob(pattern) if p.is_dir() and left_by_killed(p)):
            target = stale.with_name(stale.name[1:].rpartition(".replaced-")[0])
            put_back(target, stale)
            print(f"{target}: put back the earlier run that a killed run (pid {stale.name.rpartition('-')[2]}) "
                  "had set aside")
    for stray in (p for p in run_dir.glob("**/.*.tmp-*") if p.is_file() and left_by_killed(p)):
        stray.unlink()


def put_back(run_dir: Path, aside: Path) -> None:
    """Replace what a stopped run wrote in `run_dir` by the earlier run it had set aside in `aside`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove(results(run_dir))
    for p in aside.iterdir():
        os.replace(p, run_dir / p.name)
    aside.rmdir()


def complete_checkpoints(run_dir: Path, head: str) -> list[Path]:
    """Every fold model of `head` in a finished run folder: fold0..K-1 for the K folds of folds.csv (or full/),
    with a metrics.json naming the head. An interrupted or incomplete run is an error saying what is missing."""
    metrics_path = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except FileNotFoundError:
        aside = [p.name for p in run_dir.parent.glob(f".{run_dir.name}.replaced-*") if left_by_killed(p)]
        if aside:
            raise DataError(f"{run_dir}: a killed `--overwrite` run left it half-made, its earlier run set aside in "
                            f"{aside[0]}; any `biomass train` (or lora, pseudo) on {run_dir} puts the earlier run "
                            "back first") from None
        raise DataError(f"{run_dir}: the run did not finish (no metrics.json); re-run its training, or name one "
                        "checkpoint (RUN/foldK/HEAD.json) as the member to use it alone") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{metrics_path}: not a readable JSON file ({e})") from e
    if head not in metrics.get("heads", {}):
        raise DataError(f"{metrics_path}: the run's metrics do not name head {head!r} (heads: "
                        f"{sorted(metrics.get('heads', {}))}): its checkpoints are not from this run")
    if metrics.get("full"):
        folders = [run_dir / "full"]
    else:
        try:
            k = int(pd.read_csv(run_dir / "folds.csv")["fold"].max()) + 1
        except (OSError, KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise DataError(f"{run_dir / 'folds.csv'}: needed to check the run's fold models ({e})") from e
        folders = [run_dir / f"fold{f}" for f in range(k)]
        extra = sorted(p.name for p in run_dir.glob(f"fold*/{head}.json") if p.parent not in folders)
        if extra:
            raise DataError(f"{run_dir}: {head}.json in {extra}, folds that folds.csv (0..{k - 1}) does not have: "
                            "the folder mixes runs; re-train it with --overwrite")
    lacking = [f.name for f in folders
               if not ((f / f"{head}.json").is_file() and (f / f"{head}.safetensors").is_file())]
    if lacking:
        raise DataError(f"{run_dir}: incomplete run: {head}.json/.safetensors missing in {lacking} of "
                        f"{[f.name for f in folders]}; re-run its training, or name one checkpoint "
                        "(RUN/foldK/HEAD.json) as the member to use it alone")
    return [f / f"{head}.json" for f in folders]
