"""`biomass predict PHOTO_DIR`: predictions (and density maps) for a plain folder of photos (submit/predict.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.common.errors import DataError


def predict_command(
    photo_dir: Path = typer.Argument(..., help="Folder of quadrat photos: JPEG, PNG, TIFF, WebP, BMP, GIF (no CSV needed)."),
    ensemble: Optional[Path] = typer.Option(None, "--ensemble", help="Ensemble TOML file (configs/...)."),
    members: Optional[str] = typer.Option(None, "--members", help="Run folder(s), comma-separated, equal weights; RUN:HEAD "
                                          "picks one head of a run that trained several."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write: one row per photo."),
    maps: bool = typer.Option(False, "--maps", help="Also write a PNG per photo with the density map overlaid "
                              "(members with density heads), into <out stem>_maps/."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Where test caches and member predictions "
                                            "are kept and reused [the folder of --out]."),
    train_csv: Optional[Path] = typer.Option(None, "--train-csv", help="train.csv with the labels of the "
                                             "members' OOF predictions (for aggregation oof/stack, --interval and OOF scores; default: "
                                             "the first member's recorded training data)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file per backbone for the test "
                                          "caches, BACKBONE=PATH[,...] (needed for real weights unless the run's "
                                          "config or the ensemble file names them)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda[:N] for the heads."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out photos that cannot be read and list them "
                                  "at the end (default: stop at the first, naming it)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Backbone precision of the test caches: "
                                            "auto | bf16 | fp16 | fp32 [each training cache's]."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Split the backbone over devices, e.g. "
                                          "cuda:0,cuda:1 [one device]."),
    model: Optional[Path] = typer.Option(None, "--model", help="An exported model folder (biomass export): run it "
                                         "with onnxruntime, without PyTorch (the other options but --out are for "
                                         "members)."),
    interval: Optional[float] = typer.Option(None, "--interval", help="Also write a lower and upper bound per "
                                             "target at this level (e.g. 0.9): split-conformal on the members' "
                                             "out-of-fold residuals."),
) -> None:
    """Predict biomass for a plain folder of photos: grams and g/m^2 per photo, optional density maps."""
    if model is not None:  # torch is never imported on this path
        given = {"--members": members, "--ensemble": ensemble, "--interval": interval, "--work-dir": work_dir,
                 "--train-csv": train_csv, "--weights": weights, "--device": None if device == "cpu" else device,
                 "--precision": precision, "--devices": devices}
        if any(v is not None for v in given.values()):
            raise DataError(f"--model runs an exported model alone (on the CPU, with what its folder holds): leave "
                            f"out {', '.join(k for k, v in given.items() if v is not None)}")
        from biomass_cache.export.runtime import predict_with_model

        predict_with_model(model, photo_dir, out, maps=maps, skip_bad=skip_bad)
        return
    from biomass_cache.common.distributed import parse_devices, resolve_device
    from biomass_cache.submit.predict import predict_photos
    from biomass_cache.submit.spec import spec_from_options

    device = str(resolve_device(device))
    spec = spec_from_options(ensemble, members, weights=weights)
    predict_photos(photo_dir, spec, out, work_dir or out.parent, maps=maps, device=device, train_csv=train_csv,
                   skip_bad=skip_bad, precision=precision, devices=parse_devices(devices), interval=interval)
