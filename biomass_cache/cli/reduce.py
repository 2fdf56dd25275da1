"""`biomass reduce`: a smaller derived token store (store/reduce.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.common.errors import DataError
from biomass_cache.store.layout import open_store
from biomass_cache.store.reduce import (
    CONFIG_KEYS,
    DEFAULT_DIM,
    DEFAULT_FIT_TOKENS,
    DEFAULT_POOL,
    MIN_GRID,
    check_like,
    check_out,
    fit_reduction,
    keep_clean_views,
    load_settings,
    reduce_store,
    reduction_of,
)


def reduce_command(
    cache: Path = typer.Option(..., "--cache", help="Token store to reduce (written by `biomass extract`)."),
    out: Path = typer.Option(..., "--out", help="Reduced token store to write."),
    dim: Optional[int] = typer.Option(None, "--dim", help=f"Channels kept per layer, PCA components ({DEFAULT_DIM})."),
    pool: Optional[str] = typer.Option(None, "--pool", help="P x P average pooling of the patch grid; 1 = none; "
                                       f"auto = the coarsest that keeps {MIN_GRID[0]} x {MIN_GRID[1]} patches "
                                       f"({DEFAULT_POOL})."),
    like: Optional[Path] = typer.Option(None, "--like", help="Apply the projection of this reduced store or run "
                                        "folder instead of fitting one (e.g. for a test store)."),
    fit_tokens: Optional[int] = typer.Option(None, "--fit-tokens", help="Tokens per layer the PCA is fitted on "
                                             f"({DEFAULT_FIT_TOKENS})."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config whose [reduce] table sets the "
                                          "defaults (see configs/cpu_demo.toml)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out store."),
) -> None:
    """Derive a smaller token store: per-layer PCA of the layer-normed tokens and P x P pooling of the grid."""
    given = {k: v for k, v in dict(dim=dim, pool=pool, fit_tokens=fit_tokens).items() if v is not None}
    table = load_settings(config)
    settings = {**CONFIG_KEYS, **table, **given}
    if settings["fit_tokens"] < 1:
        raise DataError(f"--fit-tokens {settings['fit_tokens']}: must be at least 1")
    src = open_store(cache)
    check_out(src, out, overwrite)  # before the fit: it takes minutes at full scale
    clean = None
    if like is not None:
        reduction = reduction_of(like)
        check_like(like, reduction, given)
        check_like(like, reduction, table, config)
    else:
        clean = {} if keep_clean_views(src, settings["pool"]) else None  # view 0 read and normed once
        reduction = fit_reduction(src, settings["dim"], settings["pool"], settings["fit_tokens"], keep=clean)
    store = reduce_store(src, reduction, out, overwrite=overwrite, clean=clean)
    size = store.nbytes_on_disk()
    typer.echo(f"reduced {cache} ({src.channels} channels, grid {list(src.grid)}) -> {out} ({reduction.dim} "
               f"channels, grid {list(store.grid)}, {size / 1e9:.2f} GB, {src.nbytes_on_disk() / max(size, 1):.1f}x "
               f"smaller); projection sha256 {reduction.sha256[:12]}")
