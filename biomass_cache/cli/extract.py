"""`biomass extract` (extract_features.py; several GPUs: `torchrun --nproc-per-node N -m biomass_cache extract ...`):
the command line of stage one, over `extract.config.ExtractConfig`.

Settings come from `--config` (a JSON file, or a TOML file's [extract] table) with flags over them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from biomass_cache.backbone.views import TTA_VIEWS
from biomass_cache.cli.options import default_of, shown
from biomass_cache.common.errors import DataError
from biomass_cache.extract.config import EXTRACT_FLAGS, ExtractConfig, load_config_file, parse_layers
from biomass_cache.extract.pipeline import extract


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"store          {s['store']} ({s['split']}, {s['storage_dtype']})",
        f"shape          {s['shape']} (image, view, layer, token, channel), layers {s['layers']}",
        f"samples done   {s['samples_done']}/{s['samples_total']} ({s['already_done']} before this run, "
        f"{len(s['bad_ids'])} bad image(s))",
        f"on disk        {s['bytes_on_disk'] / 1e6:.1f} MB"
        + (f", {s['bytes_per_image_view'] / 1e3:.1f} kB per image-view" if s["bytes_per_image_view"] else ""),
        f"this run       {s['views_extracted']} views of {s['images_extracted']} images in {s['wall_s']:.1f} s "
        f"({s['views_per_s']:.2f} views/s, {s['images_per_s']:.2f} images/s, {s['ranks']} rank(s))",
    ]
    if s["random_weights"]:
        lines.append("WARNING: RANDOM BACKBONE WEIGHTS: this store is for demos and tests, not for real predictions")
    return "\n".join(lines)


def _pool(text: Optional[str]) -> int | str | None:
    return int(text) if text is not None and text.isdigit() else text


def _help(text: str, name: str) -> str:
    """An option's help ending in the ExtractConfig default it falls back to."""
    return f"{text} (default: {shown(default_of(ExtractConfig, name))}, unless the --config file sets it)."


def extract_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Kaggle-format data folder (train.csv, test.csv, "
                                        "train/, test/)."),
    split: Optional[str] = typer.Option(None, help=_help("Which CSV to extract: train or test", "split")),
    out: Optional[Path] = typer.Option(None, "--out", help="Token store to create, resume or grow (a .zarr folder)."),
    backbone: Optional[str] = typer.Option(None, help=_help("timm DINOv3 name", "backbone")),
    weights: Optional[str] = typer.Option(None, help=_help("Local weights file, or 'random' (demo)", "weights")),
    size: Optional[str] = typer.Option(None, help=_help("Backbone input size WxH, multiples of 16", "size")),
    tiles: Optional[int] = typer.Option(None, "--tiles", help=_help("Cut each view into this many side-by-side tiles, "
                                        "run each through the backbone alone and stitch their token grids; --size "
                                        "stays the whole view (448x224 in 2 tiles: two 224x224)", "tiles")),
    layers: Optional[str] = typer.Option(None, help="Blocks to cache, comma-separated, negative counts from the "
                                         "end (default: middle, 3/4 and last block, e.g. 5,8,11 for depth 12)."),
    views: Optional[int] = typer.Option(None, help=_help("Views per image; view 0 is clean, train views are augmented, "
                                        f"test views are TTA flips (at most {len(TTA_VIEWS)})", "views")),
    seed: Optional[int] = typer.Option(None, help=_help("Augmentation seed (and random-weights seed)", "seed")),
    device: Optional[str] = typer.Option(None, help=_help("auto | cpu | cuda", "device")),
    precision: Optional[str] = typer.Option(None, "--precision", help=_help("Compute precision: auto | bf16 | fp16 | "
                                            "fp32; auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 "
                                            "on CPU", "precision")),
    devices: Optional[str] = typer.Option(None, "--devices", help="Split one backbone over several devices, e.g. "
                                          "cuda:0,cuda:1 (two T4s) (default: one device, --device)."),
    split_at: Optional[str] = typer.Option(None, "--split-at", help="With --devices: the first block on each "
                                           "further device, comma-separated (default: by parameter count)."),
    dtype: Optional[str] = typer.Option(None, help=_help("Storage dtype: float16 | bfloat16 | int8", "dtype")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=_help("Views per forward pass", "batch_size")),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers decoding images "
                                          "(default: one per CPU core this process may use)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store instead of resuming it."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images in the store and go on "
                                  "(default: stop with an error naming the file)."),
    retry_bad: bool = typer.Option(False, "--retry-bad", help="Retry every image marked bad in an earlier run "
                                   "(a photo whose content changed is retried without it)."),
    recheck: bool = typer.Option(False, "--recheck", help="Read back every finished sample first and re-extract "
                                 "the images with corrupt or missing data (see `biomass verify`)."),
    prefix: Optional[bool] = typer.Option(None, "--prefix/--no-prefix", help=_help("Also store CLS + register tokens",
                                                                                    "store_prefix")),
    norm: Optional[bool] = typer.Option(None, "--norm/--no-norm", help=_help("Apply the final LayerNorm to the cached "
                                                                             "layers", "norm")),
    reduce: Optional[bool] = typer.Option(None, "--reduce/--no-reduce", help="Write the reduced store in the pass "
                                          "(PCA channels, pooled grid, as `biomass reduce`): the projection is "
                                          "fitted on the clean views first; no full-size tokens are written (default:"
                                          " on when the --config file has a reduce table, else off)."),
    dim: Optional[int] = typer.Option(None, "--dim", help=_help("With --reduce: channels kept per layer", "dim")),
    pool: Optional[str] = typer.Option(None, "--pool", help=_help("With --reduce: P x P average pooling of the patch "
                                       "grid; 1 = none; auto = the coarsest that keeps 14 x 28 patches", "pool")),
    fit_tokens: Optional[int] = typer.Option(None, "--fit-tokens", help=_help("With --reduce: tokens per layer the "
                                             "PCA is fitted on", "fit_tokens")),
    like: Optional[Path] = typer.Option(None, "--like", help="With --reduce: apply the projection of this reduced "
                                        "store or run folder instead of fitting one (e.g. for a test store)."),
    keep_full: Optional[Path] = typer.Option(None, "--keep-full", help="With --reduce: also write the full store "
                                             "here."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON or TOML file of the same keys (a TOML "
                                          "file's extract table, and its reduce table); flags given here override "
                                          "it."),
) -> None:
    """Run the frozen backbone over every view of every image and cache its patch tokens in a Zarr store.

    Re-running resumes (finished samples are skipped) and appends images new in the CSV. Under
    `torchrun --nproc-per-node N` the images are split across ranks.
    """
    file_values = load_config_file(config) if config is not None else {}
    values = dict(file_values)
    flags = {"data_dir": data, "split": split, "out": out, "backbone": backbone, "weights": weights,
             "size": size, "tiles": tiles, "layers": None if layers is None else parse_layers(layers), "views": views,
             "seed": seed, "device": device, "precision": precision, "devices": devices,
             "split_at": None if split_at is None else parse_layers(split_at, "--split-at"), "dtype": dtype,
             "batch_size": batch_size, "num_workers": workers, "store_prefix": prefix, "norm": norm,
             "overwrite": overwrite or None, "skip_bad": skip_bad or None, "retry_bad": retry_bad or None,
             "recheck": recheck or None, "reduce": reduce, "dim": dim, "pool": _pool(pool),
             "fit_tokens": fit_tokens, "like": like, "keep_full": keep_full}
    values.update({k: v for k, v in flags.items() if v is not None})
    unused = [EXTRACT_FLAGS[k] for k in ("dim", "pool", "fit_tokens") if flags[k] is not None]
    if unused and not values.get("reduce"):
        raise DataError(f"{', '.join(unused)}: settings of the reduction in the pass, which needs --reduce (or a "
                        "[reduce] table in the --config file); without it the full tokens are written")
    if values.get("like") is not None:
        from biomass_cache.store.reduce import check_like, reduction_of

        reduction = reduction_of(values["like"])
        check_like(values["like"], reduction, {"dim": dim, "pool": _pool(pool), "fit_tokens": fit_tokens})
        check_like(values["like"], reduction, {k: file_values[k] for k in ("dim", "pool") if k in file_values},
                   config)
    summary = extract(ExtractConfig.from_dict(values, where=str(config) if config else "command line"))
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(format_summary(summary))
