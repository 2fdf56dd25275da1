import pandas as pd
import pytest

from biomass_cache.cli.demo import DemoSize, run_demo
from biomass_cache.store.layout import open_store
from biomass_cache.store.reduce import Reduction
from biomass_cache.submit.submission import expected_sample_ids, validate_submission

TINY = DemoSize(n_train=36, n_test=6, photo=(128, 64), size=(64, 32), layers=(11,), views=2, epochs=2, folds=3,
                pcgrad=False)


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", progress=False, sizes=TINY)
    art = summary["artefacts"]
    data = tmp_path / "demo" / "data"
    sub = pd.read_csv(art["submission"])
    validate_submission(sub, expected_sample_ids(data / "test.csv"))
    assert (tmp_path / "demo" / "runs" / "heads" / "oof_density.csv").is_file()
    assert all(p.startswith(str(tmp_path)) for p in art["test_caches"] + art["member_predictions"])
    # the training cache reduced in the extraction pass, the test cache with its projection: no full store anywhere
    assert Reduction.of_store(open_store(art["train_cache"])) is not None
    assert [p.rsplit("-reduced-", 1)[-1] for p in art["test_caches"]] == [
        f"{Reduction.of_store(open_store(art['train_cache'])).sha256[:16]}.zarr"]
    assert art["run_report"].endswith("report.html") and art["submission_report"].endswith("submission.report.html")
    names = sorted(p.name for p in (tmp_path / "demo" / "cache").iterdir())  # no full test cache, no side store
    assert len(names) == 2 and "-reduced-" in names[0] and names[1] == "train.zarr", names
    assert -1 < summary["scores"]["competition_r2"] <= 1
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in printed and "--weights PATH" in printed and art["submission"] in printed


@pytest.mark.slow
def test_mean_baseline_is_the_score_of_a_mean_submission(tmp_path):
    """The printed floor equals scoring a submission.csv that predicts the training mean for every image."""
    from biomass_cache.common.data import read_long_csv, to_long
    from biomass_cache.cli.demo import mean_baseline
    from biomass_cache.submit.submission import score
    from biomass_cache.synth.generate import generate
    from biomass_cache.common.targets import TARGETS

    data = tmp_path / "data"
    generate(data, n_train=20, n_test=6, seed=1, size=(64, 32), progress=False)
    test = read_long_csv(data / "test.csv", check_images=False)
    mean = read_long_csv(data / "train.csv", check_images=False)[list(TARGETS)].mean()
    test[list(TARGETS)] = mean.to_numpy()
    to_long(test, pd.read_csv(data / "test.csv")["sample_id"]).to_csv(tmp_path / "mean.csv", index=False)
    assert mean_baseline(data) == score(tmp_path / "mean.csv", data / "test_labels.csv")["competition_r2"]
