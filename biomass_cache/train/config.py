"""Stage two's settings: `TrainConfig`, the [train] section and its [[train.sweep]] members read from a config file,
the command line's flags laid over them (`resolve`), and the rules every value must follow.

The training loop that runs these settings is train/loop.py; the `biomass train` command line is cli/train.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from biomass_cache.common.config import SEED_RULE, Config, check_table, check_values, is_int, is_number, read_config
from biomass_cache.common.distributed import resolve_device
from biomass_cache.common.errors import DataError
from biomass_cache.heads import HEADS
from biomass_cache.train.bank import PRECISIONS


@dataclass
class TrainConfig:
    """Every training setting; configs/cpu_demo.toml documents each key (section [train])."""

    head: str = "density"  # a name in heads.HEADS
    head_kwargs: dict = field(default_factory=dict)  # passed to heads.create_head
    layers: list[int] = field(default_factory=list)  # cached block indices to read; empty = all of them
    folds: int = 5
    stratify: bool = False  # grouped folds that also spread each State over the folds (folds.grouped_folds)
    full: bool = False  # train one model on all images instead of cross-validating
    epochs: int = 120  # the heads need ~1000 steps (benchmarks/bench_heads.py)
    batch_size: int = 16
    eval_batch_size: int = 64
    eval_every: int = 5  # validate every N epochs (the last one always): validation only reads, never steers training
    lr: float = 4e-3
    uw_lr: float = 1e-2  # uncertainty-weighting log-variances: own optimizer group
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # share of all steps with a linear warmup, then cosine decay
    min_lr_ratio: float = 0.01  # final lr / peak lr
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema: bool = True  # evaluate and save an exponential moving average of the weights
    ema_decay: float = 0.99
    mixup: bool = False  # token-level manifold mixup (the reference recipe; costs OOF R^2 on small data, measured)
    mixup_alpha: float = 3.9
    mixup_prob: float = 0.96
    uw: bool = False  # uncertainty weighting of the task losses (else a plain sum)
    pcgrad: bool = True  # primary-anchored PCGrad of the auxiliary gradients (needs aux)
    aux: bool = False  # auxiliary tasks: height, NDVI, State
    interval_bins: int = 0  # auxiliary interval classification: K quantile bins per target (0 = off)
    interval_weight: float = 0.3  # factor of its cross-entropy in the loss
    interval_blend: float = 0.0  # share of the bins' expected value in the predicted components (0 = off)
    tta: str | int = "all"  # OOF predictions: "all" = mean over the stored views, or one view index
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0 = torch's default); 1 is fastest for small heads on a busy CPU
    workers: int = 2  # DataLoader workers when streaming from disk
    preload: bool | str = "auto"  # hold the tokens on the device or in RAM: true | false | "auto" (when they fit)
    precision: str = "auto"  # auto | bf16 | fp32: auto = bf16 where the GPU or CPU computes it natively
    stack_folds: bool | str = "auto"  # train the folds as one stacked model: true | false | "auto" (on a GPU)
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    plots: bool = True  # write RUN/plots/*.png at the end (plots.plot_run); needs the photos under the data folder


# keys every member of a sweep shares (they define the batches); the others may differ per member
SHARED_KEYS = ("folds", "stratify", "full", "epochs", "batch_size", "eval_batch_size", "eval_every", "tta", "seed",
               "device", "threads", "workers", "preload", "precision", "stack_folds", "plots")


def load_config(path: Path | Config | None) -> tuple[dict, list[dict], dict]:
    """A config file -> ([train] settings, [[train.sweep]] members, [extract] section); the file's keys and values
    are checked here, so a mistake in it is a ConfigError naming the file (flags are checked in `resolve`)."""
    conf = read_config(path)
    train = conf.section("train")
    sweep = train.pop("sweep", [])
    conf.check_keys(train, [f.name for f in fields(TrainConfig)], "[train]")
    check_table(conf, train, "train", RULES)
    if not isinstance(sweep, list) or not all(isinstance(e, dict) for e in sweep):
        raise conf.error("list the members as [[train.sweep]] tables", "[train]", "sweep")
    for k, entry in enumerate(sweep):
        conf.check_keys(entry, ["name", *_member_keys()], f"[[train.sweep]] #{k + 1}")
        check_table(conf, entry, "train.sweep", RULES, f"member {entry['name']!r}: " if "name" in entry
                    else f"[[train.sweep]] #{k + 1}: ")
    return train, sweep, conf.section("extract")


def _member_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.name not in SHARED_KEYS]


def resolve(base: dict, sweep: list[dict], overrides: dict, heads: list[str] | None) -> tuple[TrainConfig, dict]:
    """Config file values, then CLI flags; `--head a,b` replaces the file's sweep. Returns (base, members)."""
    cfg = replace(TrainConfig(), **{**base, **overrides})
    if heads:
        sweep = [{"name": h, "head": h} for h in heads]
    elif not sweep:
        sweep = [{"name": cfg.head}]
    names = [e.get("name", e.get("head", cfg.head)) for e in sweep]
    if len(set(names)) != len(names):
        raise DataError(f"sweep member names must be unique, got {names}")
    ablations = {k: v for k, v in overrides.items() if k in _member_keys()}
    members = {n: replace(cfg, **{**{k: v for k, v in e.items() if k != "name"}, **ablations})
               for n, e in zip(names, sweep)}
    for name, m in members.items():
        check_config(m, name if len(members) > 1 else None)
    resolve_device(cfg.device)
    return cfg, members


# key -> (is the value valid, what it must be); FLAGS: keys `biomass train` / `lora` also take as --key-with-dashes
FLAGS = {k: f"--{k.replace('_', '-')}" for k in ("head", "folds", "seed", "stratify", "epochs", "eval_every",
                                                 "batch_size", "lr", "device", "workers", "preload", "precision",
                                                 "stack_folds", "interval_bins")}
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "head": (lambda v: v in HEADS, f"one of {sorted(HEADS)}"),
    "folds": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "seed": SEED_RULE,
    **{k: (lambda v: isinstance(v, bool), "true or false")
       for k in ("stratify", "full", "ema", "mixup", "uw", "pcgrad", "aux", "plots")},
    "epochs": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval_every": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "lr": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "uw_lr": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "warmup_frac": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "min_lr_ratio": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "grad_clip": (lambda v: is_number(v) and v >= 0, "a number >= 0 (0 = off)"),
    "ema_decay": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mixup_alpha": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "mixup_prob": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "tta": (lambda v: v == "all" or (is_int(v) and v >= 0), "'all' or a view index >= 0"),
    "threads": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = torch's default)"),
    "workers": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "preload": (lambda v: isinstance(v, bool) or v == "auto", "true, false or 'auto'"),
    "precision": (lambda v: v in PRECISIONS, " | ".join(PRECISIONS)),
    "stack_folds": (lambda v: isinstance(v, bool) or v == "auto", "true, false or 'auto'"),
    "max_nonfinite": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "interval_bins": (lambda v: is_int(v) and (v == 0 or v >= 2), "0 (off) or an integer >= 2"),
    "interval_weight": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "interval_blend": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "head_kwargs": (lambda v: isinstance(v, dict), "a table, e.g. { hidden = 256 }"),
    "layers": (lambda v: isinstance(v, list) and all(is_int(x) for x in v) and len(set(v)) == len(v),
               "a list of distinct block indices"),
}


def check_config(cfg: TrainConfig, member: str | None = None) -> None:
    """Refuse a value no run could use, naming its flag and config key (before anything is written)."""
    check_values(cfg, RULES, FLAGS, "train", f"member {member!r}: " if member else "")
