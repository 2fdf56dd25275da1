"""The search space of `biomass tune`: a TOML file whose [space] table searches [train] keys and head options and
whose [fixed] table sets the [train] keys every trial shares. Checked whole before any trial runs.

    [space]
    lr = { log_uniform = [1e-4, 1e-2] }
    head = { choice = ["density", "mlp"] }
    head_kwargs.dropout = { uniform = [0.0, 0.3] }
    [fixed]
    epochs = 60
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from biomass_cache.common.config import read_config
from biomass_cache.common.errors import ConfigError, DataError
from biomass_cache.heads import HEADS, FusedHead
from biomass_cache.train.config import TrainConfig, resolve

DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int")
# set once per study (the folds, the second stage's seeds) or not about quality: [fixed] only, never searched
# the same for every trial; eval_every too: trials report (and are pruned) at their validations, compared by count
NOT_SEARCHED = ("folds", "full", "seed", "device", "threads", "workers", "preload", "plots", "max_nonfinite",
                "eval_every")
# head constructor arguments supplied by the training loop, not by a config
SUPPLIED = ("n_layers", "channels", "grid", "zscore", "aux", "layers", "features", "self")


@dataclass(frozen=True)
class Param:
    """One searched setting: a [train] key, or `head_kwargs.NAME` for a head constructor argument."""

    name: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # choices, or (low, high)
    step: int = 1  # int only
    log: bool = False  # int only (log_uniform is the float one)

    def suggest(self, trial) -> Any:
        if self.kind == "choice":  # lists (e.g. layers) travel through Optuna as JSON text
            encoded = [v if _scalar(v) else json.dumps(v) for v in self.values]
            picked = trial.suggest_categorical(self.name, encoded)
            return picked if _scalar(self.values[encoded.index(picked)]) else json.loads(picked)
        if self.kind == "int":
            return trial.suggest_int(self.name, *self.values, step=self.step, log=self.log)
        return trial.suggest_float(self.name, *self.values, log=self.kind == "log_uniform")


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    fixed: dict = field(default_factory=dict)  # [train] values every trial shares
    doc: dict = field(default_factory=dict)  # the file's content, recorded in the study

    def train_section(self, trial) -> dict:
        """The trial's [train] settings: the fixed ones, then the sampled ones."""
        train = json.loads(json.dumps(self.fixed))
        for p in self.params:
            value = p.suggest(trial)
            if p.name.startswith("head_kwargs."):
                train.setdefault("head_kwargs", {})[p.name.removeprefix("head_kwargs.")] = value
            else:
                train[p.name] = value
        return train


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def head_options(head: str) -> set[str]:
    """Constructor arguments a config may give head `head` (its own and the shared FusedHead ones)."""
    if head not in HEADS:
        raise DataError(f"unknown head {head!r}; available heads: {sorted(HEADS)}")
    names = {n for cls in (HEADS[head], FusedHead) for n, p in inspect.signature(cls.__init__).parameters.items()
             if p.kind is p.KEYWORD_ONLY}
    return names - set(SUPPLIED)


def _param(where: str, name: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or len(set(spec) & set(DISTRIBUTIONS)) != 1:
        raise ConfigError(f"{where}: {name} needs exactly one of {list(DISTRIBUTIONS)}, e.g. "
                        f"{name} = {{ uniform = [0.0, 0.5] }}; got {spec!r}")
    kind = next(k for k in DISTRIBUTIONS if k in spec)
    extra = set(spec) - {kind} - ({"step", "log"} if kind == "int" else set())
    if extra:
        raise ConfigError(f"{where}: {name}: unknown option(s) {sorted(extra)} for {kind}")
    values = spec[kind]
    if not isinstance(values, list):
        raise ConfigError(f"{where}: {name}: {kind} takes a list, got {values!r}")
    if kind == "choice":
        if not values:
            raise ConfigError(f"{where}: {name}: empty choice list")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: {name}: choices listed twice in {values}")
        return Param(name, kind, tuple(values))
    numeric = int if kind == "int" else (int, float)
    if len(values) != 2 or not all(isinstance(v, numeric) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: {name}: {kind} takes [low, high] ({'integers' if kind == 'int' else 'numbers'}),"
                        f" got {values!r}")
    low, high = values
    if low >= high:
        raise ConfigError(f"{where}: {name}: empty range [{low}, {high}] (low must be below high; put a single "
                        f"value under [fixed])")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}: {name}: log_uniform needs low > 0, got {low}")
    step, log = spec.get("step", 1), spec.get("log", False)
    if not (isinstance(step, int) and step >= 1 and isinstance(log, bool)) or (log and step != 1):
        raise ConfigError(f"{where}: {name}: int needs step >= 1 (an integer) and log = true|false, not both")
    if log and low < 1:
        raise ConfigError(f"{where}: {name}: int with log = true needs low >= 1, got {low}")
    return Param(name, kind, (low, high), step, log)


def values_to_check(p: Param) -> list:
    """The values of a searched setting that must all be valid: every choice, every integer of an int range (up
    to 1000 of them: a rule may leave a hole, e.g. interval_bins 1), both ends of a float range."""
    if p.kind == "int" and (p.values[1] - p.values[0]) // p.step < 1000:
        return list(range(p.values[0], p.values[1] + 1, p.step))
    return list(p.values)


def parse_space(path: Path) -> Space:
    """Read and check a space file: [space] searched keys, [fixed] shared [train] values; see docs/tune.md."""
    doc = read_config(path, what="space", option="--space", suffixes=None, see="configs/tune_example.toml",
                      tables=None).doc
    if set(doc) - {"space", "fixed"}:
        raise ConfigError(f"{path}: unknown section(s) {sorted(set(doc) - {'space', 'fixed'})}; allowed: [space], "
                        "[fixed]")
    keys = [f.name for f in fields(TrainConfig)]
    space, fixed = doc.get("space", {}), dict(doc.get("fixed", {}))
    if not space:
        raise ConfigError(f"{path}: [space] is empty or missing: nothing to search")
    bad = sorted(k for k in fixed if k not in keys) + sorted(k for k in space if k not in keys)
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {bad}; allowed: the [train] keys {keys}")
    for k in ("full",):
        if fixed.get(k):
            raise ConfigError(f"{path} [fixed]: {k} = true trains without folds; a study needs OOF scores")
    params = []
    for name, spec in space.items():
        if name in NOT_SEARCHED:
            raise ConfigError(f"{path} [space]: {name} cannot be searched (the same for every trial); set it "
                            f"under [fixed]")
        if name == "head_kwargs":
            if not isinstance(spec, dict):
                raise ConfigError(f"{path} [space]: head_kwargs takes a table, e.g. head_kwargs.hidden = "
                                "{ int = [64, 512] }")
            params += [_param(f"{path} [space]", f"head_kwargs.{k}", v) for k, v in spec.items()]
        else:
            params.append(_param(f"{path} [space]", name, spec))
    names = [p.name for p in params]
    both = sorted({n for n in names if n in fixed}
                  | {n for n in names if n.removeprefix("head_kwargs.") in fixed.get("head_kwargs", {})})
    if both:
        raise ConfigError(f"{path}: {both} both searched and fixed; keep one")
    head_param = next((p for p in params if p.name == "head"), None)
    heads = list(head_param.values) if head_param else [fixed.get("head", TrainConfig.head)]
    options = [n.removeprefix("head_kwargs.") for n in names if n.startswith("head_kwargs.")]
    options += list(fixed.get("head_kwargs", {}))
    for head in heads:
        unknown = sorted(set(options) - head_options(str(head)))
        if unknown:
            raise ConfigError(f"{path}: head {head!r} takes no option(s) {unknown}; its options: "
                            f"{sorted(head_options(str(head)))}")
    space_ = Space(tuple(params), fixed, doc)
    try:
        resolve(fixed, [], {}, None)
    except DataError as e:
        raise ConfigError(f"{path}: [fixed]: {e}") from None
    for p in params:  # every value a trial may draw, so that none fails on one midway through the study
        for value in values_to_check(p) if "." not in p.name else ():
            try:
                resolve({**fixed, p.name: value}, [], {}, None)
            except DataError as e:
                raise ConfigError(f"{path}: [space] {p.name} can take {value!r}: {e}") from None
    return space_
