"""Readout heads on cached ViT tokens, by name (a la timm): adding a head is one file with `@register_head`.

`create_head(name, n_layers=, channels=, grid=, zscore=, aux=, **kw)` builds one; `create_head(**head.config,
zscore=zscore)` rebuilds the identical architecture.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from biomass_cache.targets import ZScore
from biomass_cache.heads.common import FusedHead, check_compatible, enable_mc_dropout, head_signature

HEADS: dict[str, Callable[..., FusedHead]] = {}


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: make a FusedHead subclass available to `create_head` as `name`."""

    def add(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"a head named '{name}' is already registered ({HEADS[name]})")
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


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


def count_parameters(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


from biomass_cache.heads import density, mlp, ridge, vitdet  # noqa: E402,F401  (registers the built-in heads)

__all__ = [
    "HEADS", "register_head", "create_head", "rebuild_head", "check_compatible", "head_signature", "enable_mc_dropout",
    "count_parameters", "FusedHead",
]
