"""Readout heads on cached ViT tokens, by name (a la timm): adding a head is one file with `@register_head`.

`create_head(name, n_layers=, channels=, grid=, zscore=, aux=, **kw)` builds one; `create_head(**head.config,
zscore=zscore)` rebuilds the identical architecture.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from biomass_cache.common.targets import ZScore
from biomass_cache.heads import density, mlp, ridge, vitdet  # noqa: F401  (registers the built-in heads)
from biomass_cache.heads.common import FusedHead, check_compatible, enable_mc_dropout, head_signature, run_head
from biomass_cache.heads.registry import HEADS, register_head


def create_head(
    name: str,
    *,
    n_layers: int,
    channels: int,
    grid: Sequence[int],
    zscore: ZScore,
    aux: Mapping[str, Any] | None = None,
    **kw: Any,
) -> FusedHead:
    if name not in HEADS:
        raise ValueError(f"unknown head '{name}'; available heads: {sorted(HEADS)}")
    try:
        return HEADS[name](n_layers=n_layers, channels=channels, grid=grid, zscore=zscore, aux=aux, **kw)
    except TypeError as e:
        raise TypeError(f"head '{name}': {e}") from e


def rebuild_head(config: Mapping[str, Any], zscore: ZScore) -> FusedHead:
    """The head a saved `config` describes; keys a checkpoint predates take the head's `legacy_config` values (the
    behaviour it was trained with), not today's defaults."""
    legacy = getattr(HEADS.get(config.get("name")), "legacy_config", {})
    return create_head(**{**legacy, **config}, zscore=zscore)


def has_maps(config: Mapping[str, Any]) -> bool:
    """Whether the head a saved `config` describes draws density maps (its class's `has_maps`)."""
    return bool(getattr(HEADS.get(config.get("name")), "has_maps", False))


def count_parameters(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


__all__ = [
    "HEADS", "register_head", "create_head", "rebuild_head", "check_compatible", "head_signature", "enable_mc_dropout",
    "count_parameters", "FusedHead", "has_maps", "run_head",
]
