"""The one reader of the TOML files a user writes: a config (configs/cpu_demo.toml), an ensemble file, a search space.

`read_config` reads a file once and hands out its sections ([extract], [reduce], [train] with its
[[train.sweep]] members, [lora]; an ensemble file is a document of its own); each step checks its own keys and
values (extract/config.py, store/reduce.py, train/config.py, lora/settings.py, submit/spec.py, train/tune_space.py)
through `Config`, so
every mistake in a file is one `ConfigError` naming the file, the table and the key: one `error:` line on the
command line (cli/errors.py).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import tomllib

from biomass_cache.common.errors import ConfigError, DataError

# The tables of a config file (configs/cpu_demo.toml); anything else at its top is a typo to refuse, not to skip.
CONFIG_TABLES = ("extract", "reduce", "train", "lora")


@dataclass(frozen=True)
class Config:
    """A parsed file (`path` None: no file given, every section empty)."""

    path: Path | None = None
    doc: dict = field(default_factory=dict)

    def where(self, table: str | None = None, key: str | None = None) -> str:
        """`FILE [table] key`, the place an error message names (`table` as written: "[train]", "[[member]] #2")."""
        return " ".join(str(p) for p in (self.path, table, key) if p is not None)

    def error(self, message: str, table: str | None = None, key: str | None = None) -> ConfigError:
        return ConfigError(f"{self.where(table, key)}: {message}")

    def section(self, name: str) -> dict:
        """A copy of the table `name` ({} when absent); a value that is not a table is refused, and so is a file
        of keys outside any table (only `extract --config` reads that flat form, through load_config_file)."""
        if self.doc and not any(k in CONFIG_TABLES for k in self.doc):
            raise self.error(f"key(s) {sorted(self.doc)} sit outside any table, so this command would not read "
                             f"them; put them under the table they belong to ([{name}] here)")
        table = self.doc.get(name, {})
        if not isinstance(table, dict):
            raise self.error(f"must be a table (a [{name}] header with keys under it), got {table!r}", key=name)
        return dict(table)

    def check_keys(self, table: dict, allowed: Iterable[str], label: str | None = None) -> None:
        """Refuse the keys of `table` (the file's `label` table) outside `allowed`, naming both."""
        allowed = sorted(allowed)
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise self.error(f"unknown key(s) {unknown}; allowed: {allowed}", label)


def read_config(path: str | Path | Config | None, what: str = "config", option: str = "--config",
                suffixes: tuple[str, ...] | None = (".toml",), see: str = "configs/cpu_demo.toml",
                tables: tuple[str, ...] | None = CONFIG_TABLES) -> Config:
    """Read a TOML file (JSON where ".json" is among `suffixes`; None: any name, read as TOML) once; a Config
    passes through.

    `what`, `option` and `see` only word the errors: another suffix, a missing file, a file that does not parse,
    a document that is not a table. With `tables`, a table outside them ([trian]) is refused with the nearest
    name, and so are keys outside any table beside tables.
    """
    if path is None:
        return Config()
    if isinstance(path, Config):
        return path
    path = Path(path)
    if suffixes is not None and path.suffix not in suffixes:
        kind = "a TOML file" if suffixes == (".toml",) else f"a {' or '.join(suffixes)} file"
        raise ConfigError(f"{path}: {option} takes {kind} (see {see}), not a {path.suffix or 'suffix-less'} file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable {what} file ({e})") from None
    try:
        doc: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a valid {'JSON' if path.suffix == '.json' else 'TOML'} {what} file ({e})"
                          ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a table of keys, got {type(doc).__name__}")
    conf = Config(path, doc)
    if tables is not None:
        check_tables(conf, tables)
    return conf


def check_tables(conf: Config, tables: tuple[str, ...]) -> None:
    """Refuse a table no step reads ([trian]), and keys outside any table in a file that has tables (TOML puts keys
    written above the first header there). A file without any of `tables` is the flat form (extract's keys, whose
    reader checks them); there only a near miss of a table name is refused."""
    structured = any(k in tables for k in conf.doc)
    allowed = ", ".join(f"[{t}]" for t in tables)
    for name, value in conf.doc.items():
        near = difflib.get_close_matches(name, tables, n=1)
        if isinstance(value, dict) and name not in tables and (structured or near):
            hint = f"did you mean [{near[0]}]? " if near else ""
            raise conf.error(f"unknown table [{name}]; {hint}a config file holds the tables {allowed} (see "
                             "configs/cpu_demo.toml)")
    loose = sorted(k for k, v in conf.doc.items() if not isinstance(v, dict) and k not in tables)
    if structured and loose:
        raise conf.error(f"key(s) {loose} sit outside any table (above the first [header]), so no command reads "
                         f"them; move them under the table they belong to ({allowed})")


# Value rules: key -> (is the value valid, what it must be); each step keeps its own (train.config.RULES,
# extract.config.EXTRACT_RULES, lora.settings.LORA_RULES) and checks a file's table and the final settings through these.
def is_int(v: object) -> bool:
    """An integer from a file or from code (numpy's too); never a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


MAX_SEED = 2**32 - 1  # numpy's and torch's generators take seeds from 0; fold seeds (seed * 1000 + k) stay in 64 bits
SEED_RULE = (lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_values(settings: object, rules: dict, flags: dict[str, str], section: str, where: str = "") -> None:
    """The first attribute of `settings` that breaks its rule is a DataError naming the flag and [section] key."""
    for key, (valid, rule) in rules.items():
        value = getattr(settings, key)
        if not valid(value):
            flag = f"{flags[key]} or " if key in flags else ""
            raise DataError(f"{where}{key} must be {rule}, got {value!r} ({flag}[{section}] {key})")


def check_table(conf: Config, table: dict, section: str, rules: dict, where: str = "") -> None:
    """The first value of a config file's table that breaks its rule is a ConfigError naming the file, the
    [section] key and the value."""
    for key, value in table.items():
        if key in rules and not rules[key][0](value):
            raise ConfigError(f"{conf.path}: {where}{key} must be {rules[key][1]}, got {value!r} ([{section}] {key})")
