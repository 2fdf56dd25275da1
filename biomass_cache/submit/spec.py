"""What an ensemble is: its members (run folders or head checkpoints), their weights, the weights file per
backbone, and the aggregation. Read from an ensemble TOML file (configs/ensemble_example.toml) or built from the
command line's `--members`; every mistake is one error naming the file or the option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from biomass_cache.common.config import read_config
from biomass_cache.common.errors import EnsembleError
from biomass_cache.submit.aggregate import STACK_ALPHA

AGGREGATIONS = ("mean", "mc_dropout", "oof", "stack")
FITTED = ("oof", "stack")  # aggregations fitted on the members' OOF predictions


@dataclass(frozen=True)
class Member:
    """One entry of an ensemble: a run folder (all its folds) or a single head checkpoint (.json)."""

    path: Path
    weight: float = 1.0
    head: str | None = None  # which head of a run folder trained several (a sweep); None: the only one

    @property
    def name(self) -> str:
        return f"{self.path}" + (f"[{self.head}]" if self.head else "")


@dataclass(frozen=True)
class EnsembleSpec:
    members: tuple[Member, ...]
    weights_files: dict[str, str] = field(default_factory=dict)  # backbone name -> weights file ("random" ok)
    aggregation: str = "mean"
    mc_samples: int = 16
    mc_seed: int = 0
    stack_alpha: float = STACK_ALPHA  # ridge strength of `stack` (aggregate.fit_stack)
    allow_collapsed: bool = False  # use members with a fold that predicts a constant (metrics.json `collapsed`)

    def __post_init__(self) -> None:
        if not self.members:
            raise EnsembleError("an ensemble needs at least one member")
        if self.aggregation not in AGGREGATIONS:
            raise EnsembleError(f"unknown aggregation {self.aggregation!r}; choose one of {list(AGGREGATIONS)}")
        if self.mc_samples < 2:
            raise EnsembleError(f"mc_samples must be at least 2, got {self.mc_samples}")
        if not (np.isfinite(self.stack_alpha) and self.stack_alpha >= 0):
            raise EnsembleError(f"stack_alpha must be a finite number >= 0, got {self.stack_alpha}")
        for m in self.members:
            if not (np.isfinite(m.weight) and m.weight >= 0):
                raise EnsembleError(f"member {m.name}: weight must be a finite number >= 0, got {m.weight}")
        if sum(m.weight for m in self.members) <= 0:
            raise EnsembleError("member weights sum to 0")


MEMBER_KEYS = {"path", "weight", "head"}
TOP_KEYS = {"aggregation", "mc_samples", "mc_seed", "stack_alpha", "weights", "member"}


def load_ensemble(path: str | Path) -> EnsembleSpec:
    """Parse an ensemble TOML file; unknown keys are errors (a typo must not silently change the ensemble). Every
    mistake in the file is a ConfigError naming it."""
    conf = read_config(path, what="ensemble", option="--ensemble", suffixes=None, tables=None,
                       see="configs/ensemble_example.toml")
    raw = conf.doc
    conf.check_keys(raw, TOP_KEYS)
    entries = raw.get("member", [])
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise conf.error("list the members as [[member]] tables with at least a `path`")
    members = []
    for k, entry in enumerate(entries, start=1):
        bad = set(entry) - MEMBER_KEYS
        if bad or "path" not in entry:
            raise conf.error(f"member #{k} " + (f"has unknown key(s) {sorted(bad)}" if bad else "has no `path`")
                             + f"; allowed: {sorted(MEMBER_KEYS)}")
        try:
            members.append(Member(Path(entry["path"]), float(entry.get("weight", 1.0)), entry.get("head")))
        except (TypeError, ValueError):
            raise conf.error(f"member #{k}: weight must be a number, got {entry.get('weight')!r}") from None
    weights = raw.get("weights", {})
    if not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values()):
        raise conf.error("[weights] maps backbone names to weights files, e.g. "
                         'vit_small_patch16_dinov3 = "/models/dinov3_vits16.pth"')
    try:
        return EnsembleSpec(tuple(members), dict(weights), raw.get("aggregation", "mean"),
                            int(raw.get("mc_samples", 16)), int(raw.get("mc_seed", 0)),
                            float(raw.get("stack_alpha", STACK_ALPHA)))
    except EnsembleError as e:
        raise conf.error(str(e)) from None
    except (TypeError, ValueError) as e:  # int() of mc_samples / mc_seed, float() of stack_alpha
        raise conf.error(f"mc_samples and mc_seed must be integers, stack_alpha a number ({e})") from None


def parse_member(text: str) -> Member:
    """`RUN_DIR`, `RUN_DIR:HEAD` (one head of a run that trained several) or a checkpoint `RUN/foldK/HEAD.json`."""
    path, colon, head = text.rpartition(":")
    if colon and path and re.fullmatch(r"[A-Za-z_][\w-]*", head) and not Path(text).exists():
        return Member(Path(path), head=head)
    return Member(Path(text))


def spec_from_options(ensemble: str | Path | None, members: str | None, aggregation: str | None = None,
                      mc_samples: int | None = None, weights: str | None = None,
                      allow_collapsed: bool = False) -> EnsembleSpec:
    """The command-line way: exactly one of an ensemble file or `--members A,B` (equal weights, every backbone
    setting taken from each run folder's config.json); `aggregation`, `mc_samples` and `weights`
    ("BACKBONE=PATH[,BACKBONE=PATH]", the weights file per backbone) override the file; `allow_collapsed`
    admits members with collapsed folds."""
    if (ensemble is None) == (members is None):
        raise EnsembleError("give exactly one of --ensemble FILE or --members RUN_DIR[,RUN_DIR...]")
    if ensemble is not None:
        spec = load_ensemble(ensemble)
    else:
        entries = [p.strip() for p in members.split(",")]
        if not all(entries):
            raise EnsembleError(f"--members {members!r} has an empty entry (two commas, or one at an end): give "
                                "RUN_DIR[:HEAD] entries separated by single commas")
        spec = EnsembleSpec(tuple(parse_member(p) for p in entries))
    overrides = {k: v for k, v in dict(aggregation=aggregation, mc_samples=mc_samples).items() if v is not None}
    if allow_collapsed:
        overrides["allow_collapsed"] = True
    if weights:
        pairs = [w.split("=", 1) for w in weights.split(",") if w.strip()]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise EnsembleError(f"--weights takes BACKBONE=PATH[,BACKBONE=PATH...], got {weights!r}")
        overrides["weights_files"] = {**spec.weights_files, **{k.strip(): v.strip() for k, v in pairs}}
    return replace(spec, **overrides) if overrides else spec

