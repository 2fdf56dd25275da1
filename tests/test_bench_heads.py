"""benchmarks/bench_heads.py helpers: ensemble rows on hand-built OOF grams, OOF files read back in table order, and
the synthetic training photos not depending on how many test photos are drawn (the techniques preset relies on it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from biomass_cache.train import runs
from biomass_cache.synth.generate import generate
from biomass_cache.common.targets import TARGETS, components_to_targets

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of scripts, not a package: load bench_heads by its path
_spec = importlib.util.spec_from_file_location("bench_heads", ROOT / "benchmarks" / "bench_heads.py")
bh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bh)


def _truth(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    comps = np.random.default_rng(seed).uniform(1, 50, size=(n, 3))
    return comps, components_to_targets(comps)


def test_ensemble_rows_mean_of_over_and_under_prediction_is_exact():
    comps, y = _truth()
    folds = np.arange(len(y)) % 5
    oofs = {"density": components_to_targets(1.2 * comps), "ridge": components_to_targets(0.8 * comps)}
    mean, stack = bh.ensemble_rows(oofs, y, folds)
    assert mean["model"] == "density+ridge (mean of OOF grams)"
    assert mean["competition_r2"] == pytest.approx(1.0)  # (1.2 + 0.8) / 2 = 1 in every component
    assert stack["model"] == "density+ridge (stack, cross-fitted)" and stack["per_target_r2"] is None
    assert stack["competition_r2"] > 0.99 and len(stack["folds"]) == 5  # weights near 1/2, fitted off-fold


def test_ensemble_rows_stack_is_honest_when_one_member_is_noise():
    comps, y = _truth(40)
    noise = components_to_targets(np.random.default_rng(1).uniform(1, 50, size=comps.shape))
    folds = np.arange(len(y)) % 5
    _, stack = bh.ensemble_rows({"density": components_to_targets(2 * comps), "ridge": noise}, y, folds)
    assert 0.9 < stack["competition_r2"] < 1.0  # learns to halve the first member and drop the noise, off-fold
    assert bh.ensemble_rows({"density": y}, y, folds) == []  # a member missing: no rows


def test_read_oofs_returns_rows_in_the_table_order(tmp_path):
    ids = ["a", "b", "c"]
    grams = np.arange(15, dtype=float).reshape(3, 5)
    runs.write_oof(tmp_path / "oof_density.csv", ids[::-1], grams[::-1])
    got = bh.read_oofs(tmp_path, ["density"], ids)
    np.testing.assert_allclose(got["density"], grams)
    assert list(got) == ["density"] and got["density"].shape == (3, len(TARGETS))


def test_training_photos_do_not_depend_on_the_number_of_test_photos(tmp_path):
    for n_test in (1, 3):
        generate(tmp_path / f"t{n_test}", n_train=3, n_test=n_test, seed=0, size=(32, 16), progress=False)
    a, b = tmp_path / "t1", tmp_path / "t3"
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    names = sorted(p.name for p in (a / "train").iterdir())
    assert names == sorted(p.name for p in (b / "train").iterdir()) and len(names) == 3
    assert all((a / "train" / n).read_bytes() == (b / "train" / n).read_bytes() for n in names)
    assert len(list((b / "test").iterdir())) == 3
