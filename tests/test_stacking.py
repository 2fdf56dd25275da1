"""The stacker (aggregate.fit_stack) and the cross-fitted OOF score of fitted aggregations: on hand-made members,
then end to end through `biomass submit`."""

import json

import numpy as np
import pandas as pd
import pytest

from biomass_cache.submit.aggregate import cross_fitted, fit_stack, fit_weights, stack_predict, weighted_mean
from biomass_cache.common.errors import ConfigError
from biomass_cache.submit.spec import load_ensemble
from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import components_to_targets


def green_only(green):
    """(N, 5) grams of images holding only green: clover = dead = 0, so GDM = Total = green."""
    g = np.asarray(green, dtype=np.float64)
    return components_to_targets(np.stack([0 * g, 0 * g, g], axis=1))


# 3 folds of 2 images; member 1 predicts 1 g on the first image of each fold and 0 on the second, member 2 the
# reverse, so the stack's green weights are the mean truth of "its" images over the folds it is fitted on.
TRUTH = green_only([2, 1, 4, 3, 6, 2])
MEMBERS = [green_only([1, 0, 1, 0, 1, 0]), green_only([0, 1, 0, 1, 0, 1])]
FOLDS = np.array([0, 0, 1, 1, 2, 2])


def exact_stack(preds, y):
    return fit_stack(preds, y, alpha=0.0)


def test_cross_fitted_score_of_the_stack_by_hand():
    """Per image the five rows weigh 0.1 (clover, 0) + 0.1 (dead, 0) + 0.1 + 0.2 + 0.5 (green), so
    sum w = 6, the weighted mean is 0.8 * 18 / 6 = 2.4 and
    ss_tot = 6 * 0.2 * 2.4^2 + 0.8 * sum (g - 2.4)^2 = 6.912 + 0.8 * 18.16 = 21.44.
    In-sample: weights (mean of 2, 4, 6; mean of 1, 3, 2) = (4, 2), ss_res = 0.8 * (4 + 0 + 4 + 1 + 1 + 0) = 8.
    Cross-fitted: fold 0 held out -> (5, 2.5), fold 1 -> (4, 1.5), fold 2 -> (3, 2); ss_res = 0.8 * (9 + 2.25 +
    0 + 2.25 + 9 + 0) = 18. Fold 0 alone: mean 0.8 * 3 / 2 = 1.2, ss_tot = 2 * 0.2 * 1.44 + 0.8 * (0.64 + 0.04)
    = 1.12, ss_res = 0.8 * (9 + 2.25) = 9."""
    weights = exact_stack(MEMBERS, TRUTH)
    np.testing.assert_allclose(weights, [[0, 0], [0, 0], [4, 2]], atol=1e-12)
    in_sample = competition_r2(TRUTH, stack_predict(MEMBERS, weights))
    assert in_sample == pytest.approx(1 - 8 / 21.44, abs=1e-12)
    cross = cross_fitted(MEMBERS, TRUTH, FOLDS, exact_stack, stack_predict)
    assert cross["ensemble"] == pytest.approx(1 - 18 / 21.44, abs=1e-12)
    assert cross["n_folds"] == 3 and list(cross["folds"]) == ["fold0", "fold1", "fold2"]
    assert cross["folds"]["fold0"] == pytest.approx(1 - 9 / 1.12, abs=1e-12)
    assert in_sample > cross["ensemble"] + 0.4  # scoring on the fitting rows overstates


def test_cross_fitting_never_fits_on_the_rows_it_scores():
    rng = np.random.default_rng(0)
    truth = components_to_targets(rng.uniform(1, 30, (12, 3)))
    preds = [components_to_targets(truth[:, :3] * rng.uniform(0.5, 1.5, (12, 3))) for _ in range(2)]
    folds = np.repeat([0, 1, 2], 4)
    seen = []

    def spy(p, y):
        seen.append({int(np.flatnonzero((truth == row).all(axis=1))[0]) for row in y})
        return fit_weights(p, y)

    cross = cross_fitted(preds, truth, folds, spy, weighted_mean)
    assert seen == [set(range(4, 12)), set(range(4)) | set(range(8, 12)), set(range(8))]
    held = [weighted_mean([p[folds == k] for p in preds], fit_weights([p[folds != k] for p in preds],
                                                                       truth[folds != k])) for k in range(3)]
    assert cross["ensemble"] == pytest.approx(competition_r2(truth, np.concatenate(held)), abs=1e-12)


def test_stack_weights_are_non_negative_where_least_squares_wants_a_negative_one():
    rng = np.random.default_rng(1)
    comps = rng.uniform(5, 40, (30, 3))
    truth = components_to_targets(comps)
    good = components_to_targets(1.2 * comps + 3)  # 20 % too high plus 3 g
    flat = components_to_targets(np.full_like(comps, 10.0))  # 10 g of everything: subtracting it would help
    green = np.stack([good[:, 2], flat[:, 2]], axis=1)
    np.testing.assert_allclose(np.linalg.lstsq(green, truth[:, 2], rcond=None)[0], [1 / 1.2, -0.25])
    weights = fit_stack([good, flat], truth, alpha=0.0)
    assert weights.shape == (3, 2) and (weights >= 0).all()
    np.testing.assert_array_equal(weights[:, 1], 0.0)  # the flat member is dropped, not subtracted
    stacked = stack_predict([good, flat], weights)
    assert (stacked >= 0).all()
    np.testing.assert_allclose(stacked[:, 3], stacked[:, 0] + stacked[:, 2], rtol=1e-12)  # GDM
    np.testing.assert_allclose(stacked[:, 4], stacked[:, :3].sum(axis=1), rtol=1e-12)  # Total


def test_a_strong_ridge_gives_the_equal_weight_mean():
    rng = np.random.default_rng(2)
    truth = components_to_targets(rng.uniform(1, 30, (10, 3)))
    preds = [components_to_targets(truth[:, :3] * s) for s in (0.5, 2.0, 1.1)]
    weights = fit_stack(preds, truth, alpha=1e9)
    np.testing.assert_allclose(weights, 1 / 3, atol=1e-6)
    np.testing.assert_allclose(stack_predict(preds, weights), weighted_mean(preds, [1, 1, 1]), rtol=1e-5)
    light = fit_stack(preds, truth, alpha=0.0)
    assert competition_r2(truth, stack_predict(preds, light)) == pytest.approx(1.0, abs=1e-9)


def test_stack_alpha_in_the_ensemble_file(tmp_path):
    path = tmp_path / "ens.toml"
    path.write_text('aggregation = "stack"\nstack_alpha = 0.5\n[[member]]\npath = "runs/a"\n')
    spec = load_ensemble(path)
    assert spec.aggregation == "stack" and spec.stack_alpha == 0.5
    path.write_text('aggregation = "stack"\nstack_alpha = -1\n[[member]]\npath = "runs/a"\n')
    with pytest.raises(ConfigError, match="ens.toml: stack_alpha must be a finite number >= 0, got -1"):
        load_ensemble(path)


def test_the_bundle_keeps_stack_alpha(tmp_path):
    from biomass_cache.submit import bundle_run

    path = tmp_path / "ensemble.toml"
    path.write_text(bundle_run.toml_ensemble({"aggregation": "stack", "stack_alpha": 0.25, "member": [{"path": "a"}]}))
    spec = load_ensemble(path)
    assert (spec.aggregation, spec.stack_alpha) == ("stack", 0.25)


# ------------------------------------- end to end through `biomass submit` on conftest's tiny pipeline
def stack_file(tmp_path, run_a, run_b, alpha=0.0):
    path = tmp_path / "ens.toml"
    path.write_text(f'stack_alpha = {alpha}\n[[member]]\npath = "{run_a}"\nhead = "density"\n'
                    f'[[member]]\npath = "{run_b}"\nhead = "mlp"\n')
    return path


@pytest.mark.slow
def test_submit_stack_and_oof_report_a_cross_fitted_score(pipeline, tmp_path):
    from typer.testing import CliRunner

    from biomass_cache.submit.aggregate import fit_stack, stack_predict
    from biomass_cache.common.data import read_long_csv
    from biomass_cache.cli.errors import script_app
    from biomass_cache.common.metrics import competition_r2
    from biomass_cache.submit.submission import long_to_wide, read_long_file
    from biomass_cache.cli.submit import submit_command
    from biomass_cache.common.targets import COMPONENTS, TARGETS

    root, data, run = pipeline
    ens_file = stack_file(tmp_path, run, run)
    reports = {}
    for aggregation in ("stack", "oof"):
        out = tmp_path / f"{aggregation}.csv"
        result = CliRunner().invoke(script_app(submit_command), [
            "--data", str(data), "--ensemble", str(ens_file), "--aggregation", aggregation, "--out", str(out),
            "--work-dir", str(root / "work")])
        assert result.exit_code == 0, result.output
        assert "ensemble (fitted, in-sample)" in result.output and "ensemble (cross-fitted)" in result.output
        reports[aggregation] = json.loads((tmp_path / f"{aggregation}.report.json").read_text())
        y = long_to_wide(read_long_file(out), str(out)).to_numpy()
        np.testing.assert_allclose(y[:, 3], y[:, 0] + y[:, 2], rtol=1e-12)  # GDM
        np.testing.assert_allclose(y[:, 4], y[:, :3].sum(axis=1), rtol=1e-12)  # Total
    stack, oof = reports["stack"], reports["oof"]
    assert stack["aggregation"] == "stack" and stack["submission"] == str(tmp_path / "stack.csv")
    assert all(list(w) == list(COMPONENTS) and min(w.values()) >= 0 for w in stack["weights"].values())
    assert sum(oof["weights"].values()) == pytest.approx(1.0)
    for report in (stack, oof):
        cross = report["oof"]["cross_fitted_oof"]
        assert cross["n_folds"] == 3 and list(cross["folds"]) == ["fold0", "fold1", "fold2"]
        assert cross["folds_csv"] == str(run / "folds.csv") and np.isfinite(report["oof"]["ensemble"])
    # the same number from the run's files alone: each fold's stack fitted on the other folds' images
    labels = read_long_csv(data / "train.csv", check_images=False).set_index("image_id")[list(TARGETS)]
    members = [pd.read_csv(run / f"oof_{h}.csv", dtype={"image_id": str}).set_index("image_id")[list(TARGETS)]
               for h in ("density", "mlp")]
    fold_of = pd.read_csv(run / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
    ids = labels.index[labels.notna().all(axis=1)]
    pooled = pd.DataFrame(np.nan, index=ids, columns=list(TARGETS))
    for k in range(3):
        fit_on, held = ids[fold_of.loc[ids].to_numpy() != k], ids[fold_of.loc[ids].to_numpy() == k]
        weights = fit_stack([m.loc[fit_on].to_numpy() for m in members], labels.loc[fit_on].to_numpy(), alpha=0.0)
        pooled.loc[held] = stack_predict([m.loc[held].to_numpy() for m in members], weights)
    expected = competition_r2(labels.loc[ids].to_numpy(), pooled.to_numpy())
    assert stack["oof"]["cross_fitted_oof"]["ensemble"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.slow
def test_fitted_aggregations_refuse_members_cross_validated_on_different_folds(pipeline, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from biomass_cache.cli.errors import script_app
    from biomass_cache.cli.submit import submit_command

    root, data, run = pipeline
    other = tmp_path / "run"
    shutil.copytree(run, other)
    folds = pd.read_csv(other / "folds.csv", dtype={"image_id": str})
    a, b = folds.index[folds["fold"] == 0][0], folds.index[folds["fold"] == 1][0]
    folds.loc[[a, b], "fold"] = [1, 0]
    folds.to_csv(other / "folds.csv", index=False)
    args = ["--data", str(data), "--ensemble", str(stack_file(tmp_path, run, other)), "--out",
            str(tmp_path / "s.csv"), "--work-dir", str(root / "work")]
    result = CliRunner().invoke(script_app(submit_command), [*args, "--aggregation", "stack"])
    assert result.exit_code == 2 and not (tmp_path / "s.csv").exists()
    assert result.output.startswith("error: members ") and result.output.count("\n") == 1, result.output
    assert "different folds" in result.output and f"--folds-csv {run / 'folds.csv'}" in result.output
    first = sorted(set(folds["image_id"][[a, b]]) & set(pd.read_csv(run / "oof_density.csv", dtype=str)["image_id"]))
    assert any(f"image {i}: fold" in result.output for i in first)
    assert CliRunner().invoke(script_app(submit_command), [*args, "--aggregation", "mean"]).exit_code == 0
