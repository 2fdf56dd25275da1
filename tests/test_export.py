"""`biomass export` and `biomass predict --model` (export/): the graph checks itself against PyTorch, runs in a
process where importing torch fails, gives `biomass predict`'s numbers, quantises within its tolerance, and refuses
what it cannot do in one line with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from biomass_cache.backbone.views import TTA_VIEWS
from biomass_cache.cli import app
from biomass_cache.common.errors import DataError
from biomass_cache.common.targets import PLOT_AREA_M2, TARGETS
from biomass_cache.submit.bundle_run import toml_ensemble
from toys import ROOT

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime", reason='pip install -e ".[export]"')

NO_TORCH = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(name + " is blocked: predict --model must not need it")
sys.meta_path.insert(0, Block())
sys.argv = ["biomass", *sys.argv[1:]]
from biomass_cache.cli import main
main()
"""


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_export_then_predict_without_torch(pipeline, tmp_path, monkeypatch):
    """An `oof` ensemble (weights fitted on the OOF predictions, as `submit` fits them) of two heads."""
    root, data, run = pipeline
    ensemble = tmp_path / "ensemble.toml"
    ensemble.write_text(toml_ensemble({"aggregation": "oof", "member": [{"path": str(run), "head": "density"},
                                                                         {"path": str(run), "head": "mlp"}]}))
    made = cli("export", "--ensemble", ensemble, "--out", tmp_path / "model")
    assert made.exit_code == 0, made.output
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["check"]["rel_rms_vs_pytorch"] <= 1e-4 and info["quantization"] is None
    assert info["input"]["size"] == [64, 32] and info["random_weights"] and info["aggregation"] == "oof"
    weights = [m["weights"]["Dry_Clover_g"] for m in info["members"]]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1, abs=1e-6)
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    done = subprocess.run([sys.executable, str(script), "predict", str(data / "test"), "--model",
                           str(tmp_path / "model"), "--out", str(tmp_path / "onnx.csv"), "--maps"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert info["maps"]["shape"] == [3, 2, 4]  # the density member's maps (64 x 32 pixels: 4 x 2 patches)
    pngs = sorted(p.stem for p in (tmp_path / "onnx_maps").glob("*.png"))
    assert pngs == sorted(p.stem for p in (data / "test").iterdir())  # drawn without torch
    import biomass_cache.submit.predict as torch_predict

    torch_maps = {}  # the maps `biomass predict --maps` draws, as arrays
    monkeypatch.setattr(torch_predict, "save_map_png", lambda path, photo, m, g: torch_maps.__setitem__(photo.stem, m))
    reference = cli("predict", data / "test", "--ensemble", ensemble, "--out", tmp_path / "torch.csv", "--work-dir",
                    tmp_path / "work", "--maps")
    assert reference.exit_code == 0, reference.output
    from biomass_cache.export.runtime import open_session, preprocess

    photos = sorted((data / "test").iterdir())
    _, onnx_maps = open_session(tmp_path / "model", info).run(None, {"photos": np.stack([preprocess(p, info)
                                                                                      for p in photos])})
    assert rel_rms(onnx_maps, np.stack([torch_maps[p.stem] for p in photos])) < 1e-3
    a, b = pd.read_csv(tmp_path / "onnx.csv"), pd.read_csv(tmp_path / "torch.csv")
    shift = ["shift_distance", "unusual"]  # the training tokens it needs are not in a model folder
    assert list(a.columns) == [c for c in b.columns if c not in shift] and list(a["image_id"]) == list(b["image_id"])
    cols = list(TARGETS)
    assert rel_rms(a[cols].to_numpy(), b[cols].to_numpy()) < 1e-4
    totals = a[["Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g"]].sum(axis=1)
    assert np.allclose(a["Dry_Total_g"], totals, rtol=1e-5)  # the identities hold in the graph


def test_refusals(pipeline, tmp_path, monkeypatch):
    root, data, run = pipeline
    last = lambda r: r.output.strip().splitlines()[-1]  # noqa: E731
    assert last(cli("export", "--members", f"{run}:density", "--out", tmp_path / "m", "--quantize", "fp8")) == \
        "error: --quantize 'fp8': the one quantisation is int8"
    import biomass_cache.export.model as model

    class Tiny(torch.nn.Module):  # photos -> grams, cheap to export: the refusal does not depend on the backbone
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 2)[:, :5]

    photos = np.random.default_rng(0).standard_normal((3, 3, 16, 32)).astype(np.float32) + 0.1

    class Untraceable(torch.nn.Module):  # a head torch.export cannot trace: it branches on a value
        config = {"name": "odd", "n_layers": 1, "grid": [2, 2], "channels": 3}

        def forward(self, tokens):
            m = tokens.mean(dim=(1, 2))
            return m * 2 if m.sum() > 0 else m

    class WithHeads(Tiny):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([Untraceable()])

        def forward(self, x):
            return self.heads[0](x[:, :1, :4].reshape(len(x), 1, 4, -1)[..., :3]).repeat(1, 2)[:, :5]

    with pytest.raises(DataError, match=r"could not be exported to ONNX .*heads that fail: #0 odd; nothing written"):
        model.write_model(WithHeads(), {"input": {"size": [32, 16]}}, tmp_path / "m", photos)
    assert not (tmp_path / "m").exists()
    monkeypatch.setattr(model, "TOLERANCE", 0.0)
    with pytest.raises(DataError, match=r"tolerance 0\); nothing written"):
        model.write_model(Tiny(), {"input": {"size": [32, 16]}}, tmp_path / "m", photos)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    monkeypatch.undo()
    assert cli("export", "--members", f"{run}:density", "--out", tmp_path / "m", "--quantize", "int8",
               "--no-tta").exit_code == 0
    written = json.loads((tmp_path / "m" / "model.json").read_text())
    check = written["check"]
    assert written["tta"] == [TTA_VIEWS[0]] and written["quantization"] == "int8"
    assert check["int8_rel_rms_vs_fp32"] <= check["int8_tolerance"] == 0.02
    assert cli("predict", data / "test", "--model", tmp_path / "m", "--out", tmp_path / "q.csv").exit_code == 0
    refused = cli("predict", data / "test", "--model", tmp_path / "m", "--members", str(run), "--device", "cuda")
    assert last(refused) == (
        "error: --model runs an exported model alone (on the CPU, with what its folder holds): leave out --members, "
        "--device")
    (tmp_path / "q_maps").write_text("")
    assert "error: --maps" in last(cli("predict", data / "test", "--model", tmp_path / "m", "--out", tmp_path / "q.csv",
                                       "--maps")) and (tmp_path / "q_maps").is_file()
    for name, damage, says in (("list", lambda m: (m / "model.json").write_text("[1, 2]"), "not a model folder"),
                               ("lanczos", lambda m: (m / "model.json").write_text(json.dumps(
                                   {**written, "input": {**written["input"], "resize": "lanczos"}})),
                                "is not one `biomass export` writes"),
                               ("cut", lambda m: (m / "model.onnx").write_bytes((m / "model.onnx").read_bytes()[:999]),
                                "onnxruntime cannot load it")):
        shutil.copytree(tmp_path / "m", tmp_path / name)
        damage(tmp_path / name)
        assert says in last(cli("predict", data / "test", "--model", tmp_path / name, "--out", tmp_path / "d.csv"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(sorted((data / "test").iterdir())[0], mixed / "good.jpg")
    (mixed / "bad.jpg").write_bytes(b"not a jpeg")
    assert "--skip-bad skips" in last(cli("predict", mixed, "--model", tmp_path / "m", "--out", tmp_path / "s.csv"))
    skipped = cli("predict", mixed, "--model", tmp_path / "m", "--out", tmp_path / "s.csv", "--skip-bad")
    assert skipped.exit_code == 0 and "skipped 1 unreadable photo(s)" in skipped.output
    assert len(pd.read_csv(tmp_path / "s.csv")) == 1
    (tmp_path / "m" / "README.txt").write_text("mine")
    assert "holds README.txt besides the model" in last(cli("export", "--members", f"{run}:density", "--out",
                                                            tmp_path / "m"))
    assert (tmp_path / "m" / "README.txt").read_text() == "mine"
    from biomass_cache.export.runtime import open_session, preprocess

    session = open_session(tmp_path / "m", written)
    photos = np.stack([preprocess(p, written) for p in sorted((data / "test").iterdir())])
    grams, maps = session.run(None, {"photos": photos})
    assert maps.shape == (len(photos), 3, 2, 4)  # the density head's maps, g/m^2: their mean is its components
    # (to int8's error: the two einsums over the layers are quantised apart)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) * PLOT_AREA_M2, grams[:, :3], rtol=0.02)
    mlp_only = tmp_path / "mlp"
    assert cli("export", "--members", f"{run}:mlp", "--out", mlp_only, "--no-tta").exit_code == 0
    assert json.loads((mlp_only / "model.json").read_text())["maps"] is None
    no_maps = cli("predict", data / "test", "--model", mlp_only, "--maps", "--out", tmp_path / "n.csv")
    assert "this model has no density-map output" in last(no_maps) and not (tmp_path / "n.csv").exists()
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    info["input"]["size"] = [128, 64]
    (tmp_path / "m" / "model.json").write_text(json.dumps(info))
    mismatch = cli("predict", data / "test", "--model", tmp_path / "m", "--out", tmp_path / "p.csv")
    assert mismatch.exit_code == 2 and "the folder's files do not belong together" in last(mismatch)
    assert not (tmp_path / "p.csv").exists()
    assert "an exported model folder holds model.onnx and model.json" in last(cli("predict", data / "test", "--model",
                                                                               data))
