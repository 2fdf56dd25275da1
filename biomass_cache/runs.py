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

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from biomass_cache.data import DataError
from biomass_cache.dataset import AuxSpec, TokenDataset, make_loader
from biomass_cache.io import atomic_path, write_csv, write_json
from biomass_cache.targets import TARGETS, ZScore, components_to_targets, to_grams

FORMAT_VERSION = 1
SPLIT_KEYS = ("split", "n_views")  # fingerprint keys a test cache may change (TTA views instead of augmented ones)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_head(json_path: str | Path, head: torch.nn.Module, meta: dict) -> None:
    """Weights to `<stem>.safetensors`, then the JSON: a JSON on disk always has its weights beside it."""
    json_path = Path(json_path)
    weights = json_path.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(tensors, tmp)
    write_json(json_path, {**meta, "weights_sha256": sha256_file(weights), "format_version": FORMAT_VERSION})


def load_head(json_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a head from its JSON + safetensors (eval mode, CPU) and check it is the head that was saved."""
    from heads import rebuild_head

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


def check_compatible(meta: dict, store) -> None:
    """Refuse a cache the head was not trained on: other extraction settings, missing layers, other width/grid.

    A test cache differs from the training cache only in SPLIT_KEYS (TTA views instead of augmented ones).
    """
    from heads import check_compatible as check_signature

    from biomass_cache.store import fingerprint_diff

    where = f"head {meta.get('name', '?')} (fold {meta.get('fold', '?')})"
    try:
        check_signature(meta["head"], store)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from e
    trained, cache = ({k: v for k, v in fp.items() if k not in SPLIT_KEYS}
                      for fp in (meta["fingerprint"], store.fingerprint))
    diff = fingerprint_diff(trained, cache)
    if diff:
        raise DataError(f"{where} was trained on tokens extracted with another configuration than the token "
                        f"store {store.path} (trained on -> store): " + "; ".join(diff))


@torch.no_grad()
def predict_components(
    head: torch.nn.Module, loader: Iterable[dict], tokens_fn: Callable[[dict], torch.Tensor]
) -> np.ndarray:
    """(N, 3) areal densities (clover, dead, green) of every sample the loader yields, in order."""
    head.eval()
    parts = [head(tokens_fn(batch))["components"].double().cpu().numpy() for batch in loader]
    return np.concatenate(parts)


def components_to_grams(components: np.ndarray) -> np.ndarray:
    """(N, 3) mean areal densities -> (N, 5) grams; the identities hold exactly."""
    return to_grams(components_to_targets(components))


def predict_store(
    head: torch.nn.Module,
    meta: dict,
    store,
    indices: Sequence[int] | None = None,
    views: str | int = "all",
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
) -> np.ndarray:
    """(N, 5) grams for store images `indices` (all by default): components averaged over the views, then rebuilt.

    `views` is "all" (TTA mean over every stored view) or one view index (0 = the clean view).
    """
    check_compatible(meta, store)
    indices = range(len(store.image_ids)) if indices is None else indices
    table = pd.DataFrame({"image_id": [store.image_ids[i] for i in indices]})
    view_list = list(range(store.n_views)) if views == "all" else [int(views)]
    head = head.to(device)
    aux = AuxSpec.from_dict(meta["aux"])
    comps = []
    for v in view_list:
        ds = TokenDataset(store, table, range(len(table)), meta["layers"], train=False, seed=0, view=v, aux=aux)
        loader = make_loader(ds, batch_size, shuffle=False, seed=0, workers=workers)
        comps.append(predict_components(head, loader, lambda b: b["tokens"].to(device)))
    return components_to_grams(np.mean(comps, axis=0))


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
    write_json(Path(run_dir) / "config.json", config)


def write_metrics(run_dir: str | Path, metrics: dict) -> None:
    write_json(Path(run_dir) / "metrics.json", metrics)


def write_history(run_dir: str | Path, rows: list[dict]) -> None:
    write_csv(Path(run_dir) / "history.csv", pd.DataFrame(rows))

