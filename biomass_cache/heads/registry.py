"""The head registry: `@register_head(name)` on a FusedHead subclass makes it available to `create_head` by name.

Apart from the package's __init__, so that head modules can register themselves without importing the package
that imports them."""

from __future__ import annotations

from typing import Callable

from biomass_cache.heads.common import FusedHead

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
