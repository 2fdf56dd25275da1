"""What determines a token store's tokens, in one place: the typed record, its builders (extraction, the live tokens
of a LoRA run, a LoRA prefix cache), the comparison naming every difference, what a test cache may differ in and
inherits from the training cache, and the JSON it is stored as.

The JSON is part of the store format (group attribute `fingerprint`, docs/store-format.md) and of run folders
(config.json, head checkpoints), so `to_dict` writes it exactly as it always was: keys in field order, a field a
kind does not have (None) left out, `tiles` left out when 1. Stores written before `tiles` or `compute` existed read
back as they are. Comparisons work on the JSON: any JSON object is a store's fingerprint (tests and benchmarks make
their own), and a reduced store chains its parent's as {"parent": ..., "reduce": ...} (reduce.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from biomass_cache import __version__
from biomass_cache.backbone.precision import COMPUTE, precision_of_compute
from biomass_cache.backbone.views import ViewPolicy
from biomass_cache.common.errors import FingerprintError

if TYPE_CHECKING:
    from biomass_cache.backbone.vit import Backbone

KINDS = (None, "lora", "lora_prefix")  # None: an extraction store
TEST_CACHE_MAY_DIFFER = ("split", "n_views")  # a test cache holds the TTA views, a training cache augmented ones
PRECISION_KEYS = ("compute",)  # what a test cache may also differ in when the user picks another precision
# fingerprint key -> ExtractConfig field: what a test cache inherits from the training cache (besides the backbone,
# tiles and precision, see inherited_settings)
TEST_CACHE_INHERITS = {"size": "size", "layers": "layers", "norm": "norm", "storage_dtype": "dtype",
                       "prefix": "store_prefix", "policy": "policy", "seed": "seed"}


@dataclass(frozen=True)
class Fingerprint:
    """What determined a set of tokens. The field order is the stored JSON's key order; None = absent."""

    kind: str | None = None  # KINDS
    backbone: dict | None = None  # backbone.vit.backbone_fingerprint: name, weights sha256 or random seed, overrides, ...
    size: tuple[int, int] | None = None  # backbone input (width, height)
    grid: tuple[int, int] | None = None  # patch grid (rows, cols), tiles stitched
    tiles: int = 1  # side-by-side pieces run through the backbone alone
    block: int | None = None  # lora_prefix: the first adapted block (the cache holds the hidden state entering it)
    layers: tuple[int, ...] | None = None
    norm: bool | None = None  # final LayerNorm on every layer
    storage_dtype: str | None = None
    prefix: bool | None = None  # CLS + register tokens stored
    split: str | None = None
    n_views: int | None = None
    view_seed: int | None = None  # lora kinds: the augmentation seed
    policy: dict | None = None  # asdict(ViewPolicy)
    seed: int | None = None  # extraction: the augmentation seed
    compute: str | None = None  # precision.COMPUTE value
    version: str | None = None  # the package version that extracted
    adapted_blocks: tuple[int, ...] | None = None  # lora: the blocks with adapters

    def __post_init__(self) -> None:
        for name in ("backbone", "policy"):  # their JSON form, so a built record equals the one read back
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _json(getattr(self, name)))

    def to_dict(self) -> dict:
        """The JSON object as stored (tuples become lists, in the backbone's overrides too)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (f.name == "tiles" and value == 1):
                out[f.name] = value
        return json.loads(json.dumps(out, allow_nan=False))

    @classmethod
    def from_dict(cls, d: Any, where: str = "fingerprint") -> Fingerprint:
        """Read a stored fingerprint (not a reduced store's chain: take `root` of it first)."""
        if not isinstance(d, dict):
            raise FingerprintError(f"{where}: a fingerprint is a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FingerprintError(f"{where}: unknown fingerprint keys {unknown} (known: {sorted(known)})")
        if d.get("kind") not in KINDS:
            raise FingerprintError(f"{where}: unknown fingerprint kind {d['kind']!r} (known: {list(KINDS)})")
        return cls(**{k: tuple(v) if isinstance(v, list) and k != "backbone" else v for k, v in d.items()})


# ---- building ----------------------------------------------------------------------------------------------------
class ExtractSettings(Protocol):
    """The extract.ExtractConfig fields that determine the tokens (a protocol: extract.py imports this module)."""

    size: tuple[int, int]
    tiles: int
    norm: bool
    dtype: str
    store_prefix: bool
    split: str
    views: int
    policy: ViewPolicy
    seed: int


class LiveSettings(Protocol):
    """The lora.LoraSettings fields that determine the live tokens."""

    size: tuple[int, int]
    tiles: int
    norm: bool
    view_seed: int


def _backbone(bb: Backbone) -> dict:
    from biomass_cache.backbone.vit import backbone_fingerprint  # timm: only where a backbone exists anyway

    return backbone_fingerprint(bb)


def of_extraction(cfg: ExtractSettings, bb: Backbone, layers: Sequence[int], grid: tuple[int, int],
                  precision: str) -> Fingerprint:
    """An extraction store's. The resolved compute precision is in it (bf16, fp16 and fp32 tokens differ); the
    devices are not (a backbone split over several gives the tokens of one)."""
    return Fingerprint(backbone=_backbone(bb), size=tuple(cfg.size), grid=tuple(grid), tiles=cfg.tiles,
                       layers=tuple(layers), norm=cfg.norm, storage_dtype=cfg.dtype, prefix=cfg.store_prefix,
                       split=cfg.split, n_views=cfg.views, policy=cfg.policy.to_dict(), seed=cfg.seed,
                       compute=COMPUTE[precision], version=__version__)


def of_lora(bb: Backbone, s: LiveSettings, layers: Sequence[int], adapted: Sequence[int]) -> Fingerprint:
    """The live tokens of a LoRA run before training: backbone, image size, read layers, norm, views."""
    return Fingerprint(kind="lora", backbone=_backbone(bb), size=tuple(s.size), tiles=s.tiles, layers=tuple(layers),
                       norm=s.norm, view_seed=s.view_seed, policy=asdict(ViewPolicy()), adapted_blocks=tuple(adapted))


def of_prefix_cache(bb: Backbone, s: LiveSettings, block: int) -> Fingerprint:
    """A LoRA prefix cache: the hidden state entering `block` of every view."""
    return Fingerprint(kind="lora_prefix", backbone=_backbone(bb), size=tuple(s.size), block=block,
                       view_seed=s.view_seed, policy=asdict(ViewPolicy()))


def reduced(parent: dict, reduce: dict) -> dict:
    """A reduced store's fingerprint: the parent's chained with the reduction's settings."""
    return {"parent": parent, "reduce": reduce}


def root(fp: dict) -> dict:
    """The fingerprint at the root of a chain of reductions (the fingerprint itself if unreduced)."""
    while "reduce" in fp and isinstance(fp.get("parent"), dict):
        fp = fp["parent"]
    return fp


# ---- comparing ---------------------------------------------------------------------------------------------------
def _json(fp: Fingerprint | dict) -> Any:
    if isinstance(fp, Fingerprint):
        return fp.to_dict()
    try:
        return json.loads(json.dumps(fp, allow_nan=False))  # as stored: tuples equal lists
    except (TypeError, ValueError) as e:
        raise FingerprintError(f"fingerprint must be JSON-serialisable: {e}") from e


def diff(old: Fingerprint | dict, new: Fingerprint | dict) -> list[str]:
    """Every difference by key path, e.g. ["layers: [3, 5] -> [3, 6]", "a.b: <missing> -> 1"]; [] when equal."""

    def walk(a: dict, b: dict, prefix: str) -> list[str]:
        out = []
        for key in sorted(set(a) | set(b)):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                out += walk(a[key], b[key], f"{prefix}{key}.")
            elif key not in a or key not in b or a[key] != b[key]:
                show = [json.dumps(d[key]) if key in d else "<missing>" for d in (a, b)]
                out.append(f"{prefix}{key}: {show[0]} -> {show[1]}")
        return out

    return walk(_json(old), _json(new), "")


def relaxed(fp: Fingerprint | dict, ignore: Sequence[str] = ()) -> dict:
    """The fingerprint without what a test cache may change (TEST_CACHE_MAY_DIFFER and `ignore`), at every level
    of a reduction chain."""
    out = {k: v for k, v in _json(fp).items() if k not in (*TEST_CACHE_MAY_DIFFER, *ignore)}
    if isinstance(out.get("parent"), dict):
        out["parent"] = relaxed(out["parent"], ignore)
    return out


def relaxed_diff(trained: Fingerprint | dict, cache: Fingerprint | dict, ignore: Sequence[str] = ()) -> list[str]:
    """The differences between a training cache's fingerprint and a test cache's that matter for heads trained on
    the first: all but TEST_CACHE_MAY_DIFFER and the keys `ignore` names (PRECISION_KEYS under another precision)."""
    return diff(relaxed(trained, ignore), relaxed(cache, ignore))


def inherited_settings(fp: dict) -> dict:
    """ExtractConfig settings (besides data_dir, split, views, out, weights) that extract a test cache the heads
    trained on the store of `fp` can read: TEST_CACHE_INHERITS, the backbone (name, overrides, weights sha256),
    `tiles` (only when recorded: a test cache of an older store keeps its settings) and the precision of `compute`.
    Of a reduced store, the extraction's at the root of the chain."""
    record = Fingerprint.from_dict(root(fp), "the cache fingerprint")
    stored = record.to_dict()
    missing = [k for k in (*TEST_CACHE_INHERITS, "backbone", "compute") if k not in stored]
    backbone = stored.get("backbone") or {}
    missing += [f"backbone.{k}" for k in ("name", "weights_sha256") if k not in backbone]
    if missing:
        raise FingerprintError(f"the cache fingerprint lacks the field(s) {missing}")
    try:
        precision = precision_of_compute(record.compute)
    except ValueError as e:
        raise FingerprintError(str(e)) from e
    settings = {field: stored[key] for key, field in TEST_CACHE_INHERITS.items()}
    settings.update(backbone=backbone["name"], overrides=backbone.get("overrides") or {},
                    weights_sha256=backbone["weights_sha256"], precision=precision)
    if "tiles" in stored:
        settings["tiles"] = stored["tiles"]
    return settings
