"""The offline submission bundle: what is bundled, what is copied (never a token cache), checksums, the time
estimate, and the contract: in an environment holding only the stock Kaggle packages, with package indexes off,
run_submission.py installs the rest from the bundle and writes the same validated submission as `biomass submit`."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import biomass_cache.submit.bundle as bundle
from biomass_cache.cli import app
from biomass_cache.submit import bundle_run
from biomass_cache.submit.spec import load_ensemble


def ensemble_file(run: Path, path: Path) -> Path:
    path.write_text(bundle_run.toml_ensemble({"aggregation": "mean", "member": [
        {"path": str(run), "head": "mlp", "weight": 1.0}, {"path": str(run / "fold1" / "density.json"), "weight": 2.0}]}))
    return path


@pytest.mark.slow
def test_bundled_packages_are_the_closure_minus_the_stock_image():
    packages = bundle.bundled_packages(bundle.STOCK_KAGGLE)
    assert {"typer", "zarr", "numcodecs", "crc32c", "peft"} <= set(packages)
    assert not {"torch", "numpy", "pandas", "timm", "pillow", "typing-extensions", "scipy"} & set(packages)
    assert packages["typer"] == metadata.version("typer")  # pinned to what runs here
    assert "typer" not in bundle.bundled_packages([*bundle.STOCK_KAGGLE, "typer"])
    with pytest.raises(bundle.BundleError, match="not installed here"):
        bundle.closure(["surely-not-a-package-xyz"])


@pytest.mark.slow
def test_bundle_layout_checksums_and_estimate(pipeline, tmp_path, monkeypatch, capsys):
    root, data, run = pipeline

    def fake_wheels(packages, wheels, project=bundle.PROJECT):  # the real build is the slow test's
        wheels.mkdir(parents=True)
        (wheels / "biomass_cache-0-py3-none-any.whl").write_bytes(b"wheel")
        return sorted(wheels.glob("*.whl"))

    monkeypatch.setattr(bundle, "build_wheels", fake_wheels)
    out = tmp_path / "bundle"
    manifest = bundle.make_bundle(ensemble_file(run, tmp_path / "ens.toml"), None, out, test_images=10)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if ".zarr" in f] and "run_submission.py" in files
    assert "members/01-run/fold2/mlp.safetensors" in files and "members/02-run/fold1/density.json" in files
    assert "members/02-run/fold0/density.json" not in files  # a single-checkpoint member brings only its own
    spec = load_ensemble(out / "ensemble.toml")
    assert [str(m.path) for m in spec.members] == ["members/01-run", "members/02-run/fold1/density.json"]
    assert [m.weight for m in spec.members] == [1.0, 2.0]
    listed = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(listed) == set(files) - {"SHA256SUMS"}
    assert manifest["backbones"] == {"vit_small_patch16_dinov3": "random"}
    assert len(manifest["estimate"]) == 1 and "10 images x 4 views x" in manifest["estimate"][0]
    assert "measured on cpu, fp32" in manifest["estimate"][0]
    bundle_run.check_files(out)
    (out / "members/01-run/config.json").write_text("{}")
    with pytest.raises(SystemExit):
        bundle_run.check_files(out)
    assert "members/01-run/config.json" in capsys.readouterr().err
    with pytest.raises(bundle.BundleError, match="already exists"):
        bundle.make_bundle(None, str(run / "fold0" / "mlp.json"), out)


@pytest.mark.slow  # the `pipeline` fixture: extraction and training, 5 s
def test_a_bundle_error_is_one_line_through_the_command_and_a_traceback_under_debug(pipeline, tmp_path, monkeypatch):
    _, _, run = pipeline
    out = tmp_path / "taken"
    out.mkdir()
    monkeypatch.delenv("BIOMASS_DEBUG", raising=False)
    args = ["bundle", "--members", str(run / "fold0" / "mlp.json"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines() == [f"error: {out} already exists; choose another --out or pass "
                                                  "--overwrite"]
    debug = CliRunner().invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, bundle.BundleError)  # --debug keeps the traceback, as for every command
    assert list(out.iterdir()) == []


def registry_reachable(tmp_path: Path) -> bool:
    pin = f"typer=={metadata.version('typer')}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "probe"), pin]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def stock_environment(root: Path) -> Path:
    """A venv whose only packages (besides pip) are the stock Kaggle list and its dependencies, linked from this
    interpreter's site-packages through a .pth file (no copies of torch); returns its python."""
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"  # ensurepip's old setuptools would shadow the image's
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    stock = root / "stock"
    stock.mkdir()
    for name in bundle.closure(bundle.STOCK_KAGGLE):
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and source.exists() \
                    and not (stock / top).exists():
                (stock / top).symlink_to(source)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "kaggle-stock.pth").write_text(f"{stock}\n")
    return python


@pytest.mark.slow
def test_run_submission_offline_in_a_stock_environment(pipeline, tmp_path):
    root, data, run = pipeline
    if not registry_reachable(tmp_path):
        pytest.skip("no package registry reachable: the bundle's wheels cannot be built")
    out = tmp_path / "bundle"
    app = [sys.executable, "-m", "biomass_cache"]
    made = subprocess.run([*app, "bundle", "--ensemble", str(ensemble_file(run, tmp_path / "ens.toml")),
                           "--out", str(out)], capture_output=True, text=True, cwd=bundle.PROJECT)
    assert made.returncode == 0, made.stderr
    assert "MB;" in made.stdout and "test-time estimate:" in made.stdout
    python = stock_environment(tmp_path / "kaggle")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}  # every package index and find-links off
    probe = subprocess.run([python, "-c", "import torch, timm, pandas; import typer"], capture_output=True, env=env)
    assert probe.returncode != 0 and b"typer" in probe.stderr  # the environment lacks what the bundle brings
    work = tmp_path / "notebook"
    work.mkdir()
    ran = subprocess.run([python, out / "run_submission.py", "--data", data, "--out", "submission.csv",
                          "--weights", "vit_small_patch16_dinov3=random"], capture_output=True, text=True,
                         env=env, cwd=work)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "validated against" in ran.stdout
    direct = subprocess.run([*app, "submit", "--data", str(data), "--ensemble", str(tmp_path / "ens.toml"),
                             "--out", str(tmp_path / "direct.csv")], capture_output=True, text=True,
                            cwd=bundle.PROJECT)
    assert direct.returncode == 0, direct.stderr
    pd.testing.assert_frame_equal(pd.read_csv(work / "submission.csv"), pd.read_csv(tmp_path / "direct.csv"))
    assert json.loads((out / "bundle.json").read_text())["version"] in ran.stdout
