"""What one extraction run is: `ExtractConfig`, the value rules of its keys (a bad value names the file and
[extract] key, or the flag) and the extraction config file."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from biomass_cache.backbone.precision import PRECISIONS
from biomass_cache.backbone.views import SPLITS, TTA_VIEWS, ViewPolicy, parse_view_size, validate_size, validate_tiles
from biomass_cache.common.config import SEED_RULE, Config, check_table, check_values, is_int, read_config
from biomass_cache.common.distributed import parse_devices
from biomass_cache.common.errors import ConfigError, DataError
from biomass_cache.common.io import check_output_folder
from biomass_cache.common.runtime import usable_cores
from biomass_cache.store.layout import STORAGE_DTYPES
from biomass_cache.store.reduce import CONFIG_KEYS, DEFAULT_DIM, DEFAULT_FIT_TOKENS, DEFAULT_POOL

DEVICES = ("auto", "cpu", "cuda")
REDUCE_KEYS = tuple(CONFIG_KEYS)  # the [reduce] table, shared with `biomass reduce --config`


def default_workers() -> int:
    """One DataLoader worker per CPU core this process may use: at the bare forward rate of a large GPU (166 ViT-L
    views/s) decoding 2000 x 1000 JPEGs and building their views takes many cores (on a CPU they share the cores with
    the forward)."""
    return usable_cores()


@dataclass
class ExtractConfig:
    """Everything one extraction run needs. Fields that change the tokens go into the store's fingerprint
    (fingerprint.of_extraction).

    `layers=None` picks three blocks spread over the second half of the network: the middle, three-quarter and
    last block (ViT-S/B, depth 12: [5, 8, 11]; ViT-L, depth 24: [11, 17, 23]). `batch_size` counts views per
    forward pass (whole images are batched: batch_size // views images, at least one). `norm` applies the final
    LayerNorm to every cached layer.
    """

    data_dir: Path
    out: Path
    split: str = "train"
    backbone: str = "vit_small_patch16_dinov3"
    weights: str = "random"
    size: tuple[int, int] = (960, 480)
    tiles: int = 1  # side-by-side pieces of `size` run through the backbone alone (backbone.forward_tokens)
    layers: Optional[list[int]] = None
    norm: bool = True
    views: int = 4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (precision.py)
    devices: Optional[list[str]] = None  # one backbone split over several devices, e.g. ["cuda:0", "cuda:1"]
    split_at: Optional[list[int]] = None  # first block on each further device (default: by parameter count)
    dtype: str = "float16"
    batch_size: int = 16
    num_workers: int = field(default_factory=default_workers)
    overwrite: bool = False
    skip_bad: bool = False
    retry_bad: bool = False  # retry every image marked bad (a bad photo whose content changed is always retried)
    recheck: bool = False  # verify finished samples first and re-extract the images with corrupt or missing data
    store_prefix: bool = True
    overrides: dict = field(default_factory=dict)
    policy: ViewPolicy = field(default_factory=ViewPolicy)
    # reduction in the pass (extract/inpass.py): the [reduce] table of a config file, or --reduce
    reduce: bool = False
    dim: int = DEFAULT_DIM
    pool: int | str = DEFAULT_POOL
    fit_tokens: int = DEFAULT_FIT_TOKENS
    like: Optional[Path] = None  # a reduced store or run folder whose projection to apply instead of fitting one
    keep_full: Optional[Path] = None  # also write the full store there

    def __post_init__(self) -> None:
        check_values(self, EXTRACT_RULES, EXTRACT_FLAGS, "extract", "invalid extraction settings: ")
        self.data_dir, self.out, self.weights = Path(self.data_dir), Path(self.out), str(self.weights)
        self.size = parse_view_size(self.size) if isinstance(self.size, str) else validate_size(tuple(self.size))
        self.tiles = validate_tiles(self.size, self.tiles)
        if isinstance(self.policy, dict):
            self.policy = ViewPolicy.from_dict(self.policy)
        if self.layers is not None:
            self.layers = list(self.layers)
        if isinstance(self.devices, str):
            self.devices = parse_devices(self.devices)
        if is_int(self.split_at):
            self.split_at = [self.split_at]
        problems = []  # rules between settings; each setting alone follows EXTRACT_RULES
        if self.split == "test" and self.views > len(TTA_VIEWS):
            problems.append(f"views must be at most {len(TTA_VIEWS)} (the TTA views {TTA_VIEWS}) for split 'test', "
                            f"got {self.views}")
        if self.devices is not None and (not self.devices or self.device != "auto"):
            problems.append(f"devices must name at least one device and leaves device at 'auto', got devices "
                            f"{self.devices!r}, device {self.device!r}")
        if self.split_at is not None and (self.devices is None or len(self.split_at) != len(self.devices) - 1):
            problems.append(f"split_at needs devices and names the first block of every device but the first, got "
                            f"split_at {self.split_at!r} for devices {self.devices!r}")
        if not self.reduce and (self.like is not None or self.keep_full is not None):
            problems.append("like and keep_full reduce in the pass: they need reduce (--reduce)")
        if self.keep_full is not None and Path(self.keep_full).resolve() in (
                Path(self.out).resolve(), fit_store_path(Path(self.out)).resolve()):
            problems.append(f"keep_full must be another store than out and its side store "
                            f"{fit_store_path(Path(self.out))}, got {self.keep_full}")
        if self.like is not None and Path(self.like).resolve() in (
                Path(p).resolve() for p in (self.out, self.keep_full) if p is not None):
            problems.append(f"like is the store or run whose projection is applied: out and keep_full must be other "
                            f"stores, got like {self.like}")
        if problems:
            raise DataError("invalid extraction settings: " + "; ".join(problems))
        self.like = None if self.like is None else Path(self.like)
        self.keep_full = None if self.keep_full is None else Path(self.keep_full)
        for option, path in (("--out", self.out), ("--keep-full", self.keep_full)):
            if path is not None:
                check_output_folder(path, option)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> ExtractConfig:
        """Build from a JSON/TOML mapping of field names; unknown keys are an error naming them."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{where}: unknown extraction keys {unknown}; known: {[f.name for f in fields(cls)]}")
        missing = [k for k in ("data_dir", "out") if d.get(k) is None]
        if missing:
            raise DataError(f"{where}: {missing} must be given (--data / --out)")
        return cls(**d)


def _is_size(v: object) -> bool:
    try:
        parse_view_size(v) if isinstance(v, str) else validate_size(tuple(v))
    except (DataError, TypeError):
        return False
    return True


def _is_policy(v: object) -> bool:
    if not isinstance(v, dict):
        return isinstance(v, ViewPolicy)
    try:
        ViewPolicy.from_dict(v)
    except (ValueError, TypeError):  # ViewPolicy's own checks; a value of the wrong type
        return False
    return True


def _is_strs(v: object) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _is_ints(v: object) -> bool:
    return isinstance(v, (list, tuple)) and all(is_int(x) for x in v)


# ExtractConfig key -> (is the value valid, what it must be), as train.config.RULES; the flags that set them
EXTRACT_RULES = {
    "data_dir": (lambda v: isinstance(v, (str, Path)), "a folder"),
    "out": (lambda v: isinstance(v, (str, Path)), "a .zarr folder"),
    "split": (lambda v: v in SPLITS, f"one of {list(SPLITS)}"),
    "backbone": (lambda v: isinstance(v, str), "a timm DINOv3 name"),
    "weights": (lambda v: isinstance(v, (str, Path)), "a weights file or 'random'"),
    "size": (_is_size, "WxH or [W, H], positive multiples of 16, e.g. 960x480"),
    "tiles": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "layers": (lambda v: v is None or (_is_ints(v) and len(v) > 0), "a list of block indices"),
    "norm": (lambda v: isinstance(v, bool), "true or false"),
    "views": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "seed": SEED_RULE,
    "device": (lambda v: v in DEVICES, f"one of {list(DEVICES)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"),
    "devices": (lambda v: v is None or isinstance(v, str) or _is_strs(v), "a list of devices, e.g. cuda:0,cuda:1"),
    "split_at": (lambda v: v is None or is_int(v) or _is_ints(v), "a list of block indices"),
    "dtype": (lambda v: v in STORAGE_DTYPES, f"one of {list(STORAGE_DTYPES)}"),
    "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("overwrite", "skip_bad", "retry_bad", "recheck", "store_prefix")},
    "overrides": (lambda v: isinstance(v, dict), "a table of backbone settings, e.g. { depth = 2 }"),
    "reduce": (lambda v: isinstance(v, bool), "true or false"),
    "dim": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "pool": (lambda v: v == "auto" or (is_int(v) and v >= 1), "'auto' or an integer >= 1"),
    "fit_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "like": (lambda v: v is None or isinstance(v, (str, Path)), "a reduced store or run folder"),
    "keep_full": (lambda v: v is None or isinstance(v, (str, Path)), "a .zarr folder"),
    "policy": (_is_policy, "a table of ViewPolicy fields (views.py), probabilities in [0, 1] and ranges "
                           "[low, high], e.g. { p_hflip = 0.5 }"),
}


EXTRACT_FLAGS = {"data_dir": "--data", "num_workers": "--workers", "store_prefix": "--prefix/--no-prefix",
                 "norm": "--norm/--no-norm", "split_at": "--split-at", "batch_size": "--batch-size",
                 "reduce": "--reduce/--no-reduce", "fit_tokens": "--fit-tokens", "keep_full": "--keep-full",
                 **{k: f"--{k}" for k in ("out", "split", "backbone", "weights", "size", "tiles", "layers", "views",
                                          "seed", "device", "precision", "devices", "dtype", "dim", "pool",
                                          "like")}}


def load_config_file(path: Path | Config) -> dict[str, Any]:
    """Extraction keys from a JSON or TOML file (a TOML file's [extract] table when it has one), unknown keys
    refused naming the file. A [reduce] table (dim, pool, fit_tokens) reduces in the pass unless [extract] says
    `reduce = false`."""
    conf = read_config(path, suffixes=(".toml", ".json"))
    if "extract" in conf.doc or isinstance(conf.doc.get("reduce"), dict):  # a file of tables, as configs/*.toml
        values, label = dict(conf.section("extract")) if "extract" in conf.doc else {}, "[extract]"
    else:
        values, label = dict(conf.doc), None
    conf.check_keys(values, [f.name for f in fields(ExtractConfig)], label)
    unused = [k for k in REDUCE_KEYS if k in values]
    if unused and not values.get("reduce", isinstance(conf.doc.get("reduce"), dict)):
        raise ConfigError(f"{conf.path}: {unused} set the reduction in the pass, which needs reduce = true (or the "
                          "settings in a [reduce] table); without it the full tokens are written")
    if "reduce" in conf.doc and label is not None:
        table = conf.section("reduce")
        conf.check_keys(table, REDUCE_KEYS, "[reduce]")
        check_table(conf, table, "reduce", {k: EXTRACT_RULES[k] for k in REDUCE_KEYS})
        values = {"reduce": True, **table, **values}
    check_table(conf, values, "extract", EXTRACT_RULES)
    return values


def parse_layers(text: str, option: str = "--layers") -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise DataError(f"{option} must be comma-separated block indices such as 5,8,11 or -1, got {text!r}") from None


def fit_store_path(out: Path) -> Path:
    """Phase one's side store (extract/inpass.py): cache/train.zarr -> cache/train.fit.zarr."""
    return out.with_name(out.name.removesuffix(".zarr") + ".fit.zarr")
