"""The docs site's generated pages (docs/generate.py): they must say what the code and the results files say."""

from __future__ import annotations

import importlib.util
import json

import click
import pytest
from typer.main import get_command

from biomass_cache.cli import app
from toys import ROOT

_spec = importlib.util.spec_from_file_location("biomass_docs_generate", ROOT / "docs" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_cli_reference_lists_every_command_and_option():
    text = generate.cli_reference()
    group = get_command(app)
    root = click.Context(group, info_name="biomass")
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        assert f"## `biomass {name}`" in text
        for p in command.get_params(click.Context(command, info_name=name, parent=root)):
            for opt in p.opts + p.secondary_opts:
                if opt != "--help":
                    assert opt in text, (name, opt)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json")))
def test_every_results_file_renders(name):
    text = generate.bench(ROOT / "benchmarks" / "results", name)
    assert text.startswith(f"*From `benchmarks/results/{name}`.*") and "| --- |" in text


def test_absent_results_file_is_a_note_and_a_missing_key_fails(tmp_path):
    assert "has not been recorded yet" in generate.bench(tmp_path, "scale.json")
    data = json.loads((ROOT / "benchmarks" / "results" / "heads.json").read_text())
    del data["rows"][0]["per_target_r2"]["GDM_g"]
    (tmp_path / "heads.json").write_text(json.dumps(data))
    with pytest.raises(generate.GenerateError, match="heads.json.*GDM_g"):
        generate.bench(tmp_path, "heads.json")


def test_markers_expand_and_unknown_ones_fail(tmp_path):
    (tmp_path / "x.toml").write_text("a = 1\n")
    page = "intro\n<!-- generate: include x.toml toml -->\nend"
    assert generate.expand(page, tmp_path) == "intro\n```toml\na = 1\n```\nend"
    with pytest.raises(generate.GenerateError, match="unknown marker"):
        generate.expand("<!-- generate: nonsense -->", tmp_path)
    with pytest.raises(generate.GenerateError, match="no renderer"):
        generate.expand("<!-- generate: bench other.json -->", tmp_path)


def test_transfer_table_has_a_column_per_cell_and_the_worst_margin(tmp_path):
    def rows(colour: float, density: float) -> list[dict]:
        return [{"model": "colour ridge", "competition_r2": colour}, {"model": "density head", "competition_r2": density}]

    cells = [{"n_train": n, "style": st, "seed": 0, "rows": rows(c, h)}
             for n, st, c, h in ((80, "blades", 0.7, 0.75), (357, "canopy", 0.6, 0.5))]
    d = {"settings": {"styles": ["blades", "canopy"], "seeds": [0], "sizes": [80, 357], "photo": [448, 224],
                      "folds": 5, "backbone": "b", "size": [224, 112], "layers": [5], "views": 4, "epochs": 120,
                      "tta": 0, "train_defaults": "t", "colour_stats": 33, "quick": False},
         "cells": cells, "skipped": {"ridge": "not registered"}, "machine": {"cores": 2},
         "summary": {"colour ridge": {"mean": 0.65, "worst_margin_vs_colour": None},
                     "density head": {"mean": 0.625, "worst_margin_vs_colour": -0.1}}}
    (tmp_path / "heads_transfer.json").write_text(json.dumps(d))
    text = generate.bench(tmp_path, "heads_transfer.json")
    assert "| model | blades s0, 80 | canopy s0, 357 | mean | worst margin over colour ridge |" in text
    assert "| density head | 0.750 | 0.500 | 0.625 | -0.100 |" in text and "| colour ridge | 0.700 | 0.600 | 0.650 |  |" in text
    assert "Not run: ridge (not registered)." in text and "not a measurement" not in text


def test_techniques_table_has_margins_and_blank_targets_for_the_stack(tmp_path):
    per = {t: 0.5 for t in generate.TARGET_LABELS}
    rows = [{"model": "colour", "competition_r2": 0.7, "per_target_r2": per},
            {"model": "density head", "competition_r2": 0.8, "per_target_r2": per},
            {"model": "stack", "competition_r2": 0.75, "per_target_r2": None},
            {"model": "tiles", "competition_r2": 0.8, "per_target_r2": per, "token_change_vs_whole_view": 2.5e-7}]
    r2 = {r["model"]: r["competition_r2"] for r in rows}
    d = {"settings": {"n_train": 160, "n_test": 40, "photo": [448, 224], "backbone": "b", "size": [224, 112],
                      "layers": [5], "views": 4, "folds": 5, "epochs": 120, "tta": 0, "train_defaults": "t",
                      "colour_stats": 33, "quick": False},
         "rows": rows, "margin_vs_density": {m: v - 0.8 for m, v in r2.items()},
         "margin_vs_colour": {m: v - 0.7 for m, v in r2.items()}, "machine": {"cores": 2},
         "density_seeds": [0, 1], "density_seed_spread": 0.012}
    (tmp_path / "heads_techniques.json").write_text(json.dumps(d))
    text = generate.bench(tmp_path, "heads_techniques.json")
    assert "| stack | 0.750 | -0.050 | +0.050 |  |  |  |  |  |" in text
    assert "| colour | 0.700 | -0.100 | +0.000 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |" in text
    assert "Seed spread of the density head (seeds [0, 1], same folds, max - min): 0.012" in text
    assert "tiles: its tokens differ from the whole view's by 2.5e-07" in text and "not a measurement" not in text
