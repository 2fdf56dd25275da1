"""`biomass export`: an ensemble of runs as one ONNX graph with its model.json (export/model.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.common.errors import DataError
from biomass_cache.common.io import check_output_folder
from biomass_cache.common.photo import list_photos

CHECK_PHOTOS = 8


def export_command(
    out: Path = typer.Option(..., "--out", help="The model folder to write (model.onnx, model.json)."),
    members: Optional[str] = typer.Option(None, "--members", help="Run folder(s), comma-separated, equal weights; "
                                          "RUN:HEAD picks one head of a run that trained several."),
    ensemble: Optional[Path] = typer.Option(None, "--ensemble", help="Ensemble TOML file (aggregation mean, oof or stack: fitted weights are baked in)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 quantisation of the "
                                           "weights (refused when its error exceeds the tolerance)."),
    photos: Optional[Path] = typer.Option(None, "--photos", help="A folder of photos the export is checked on "
                                          "(default: the first members' training photos)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file per backbone, BACKBONE=PATH."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="The four TTA views in the graph, as `biomass predict` "
                             "(--no-tta: the clean view alone, a quarter of the compute)."),
) -> None:
    """Export runs (their backbone, reduction, every fold model and the TTA views) as one ONNX graph."""
    import json

    import numpy as np

    from biomass_cache.export.model import MODEL_FILES, build_info_size, export
    from biomass_cache.export.runtime import preprocess
    from biomass_cache.submit.members import resolve_member
    from biomass_cache.submit.spec import spec_from_options

    if quantize not in (None, "int8"):
        raise DataError(f"--quantize {quantize!r}: the one quantisation is int8")
    check_output_folder(out, "--out")
    if out.exists() and any(out.iterdir()) and not (out / "model.json").is_file():
        raise DataError(f"--out {out}: exists and is not a model folder; choose another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FILES) if out.is_dir() else []
    if others:  # an export replaces the whole folder: never what the user put beside the model
        raise DataError(f"--out {out}: holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''} besides the "
                        "model, which re-exporting would delete; move them, or choose another --out")
    spec = spec_from_options(ensemble, members, weights=weights)
    info = build_info_size(spec)
    if photos is None:  # the first member's run folder (a checkpoint's: RUN/foldK/HEAD.json) says where they are
        config = resolve_member(spec.members[0], spec.weights_files).run_dir / "config.json"
        data = json.loads(config.read_text()).get("data") if config.is_file() else None
        if not data:
            raise DataError("say which photos to check the export on: --photos FOLDER")
        photos = Path(data) / "train"
    files = list_photos(photos)[:CHECK_PHOTOS]
    inputs = np.stack([preprocess(p, info) for p in files])
    result = export(spec, out, inputs, quantize, tta)
    check = result["check"]
    typer.echo(f"exported {len(spec.members)} member(s) to {out} ({result['bytes'] / 1e6:.1f} MB, "
               f"{quantize or 'fp32'}); checked on {len(files)} photos from {photos}: relative RMS "
               f"{check['rel_rms_vs_pytorch']:.1e} against PyTorch"
               + (f", int8 {check['int8_rel_rms_vs_fp32']:.1e} against fp32" if quantize else ""))
