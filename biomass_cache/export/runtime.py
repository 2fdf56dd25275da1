"""`biomass predict --model MODEL_DIR PHOTOS`: an exported model run without torch (onnxruntime, numpy, Pillow).

Nothing here imports torch (a test checks it in a process where importing torch fails), so the predictor runs
where PyTorch is not installed: a phone-sized deployment, a small container. The photo is decoded and resized as
the extraction does (a JPEG at a reduced DCT scale as the model's `decode_oversample` allows, then an antialiased
resize with the model's filter, which Pillow and torchvision give to one grey level), normalised, and run through
the graph; the CSV is `biomass predict`'s, and with `maps` (a model whose heads draw them) the same density-map
PNGs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from biomass_cache.common.errors import DataError
from biomass_cache.common.io import check_output_file, write_csv
from biomass_cache.common.maps import maps_folder, save_map_png
from biomass_cache.common.photo import check_photos, list_photos, load_image, report_skipped
from biomass_cache.common.targets import prediction_frame

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}
BATCH = 8


def read_model(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    try:
        info = json.loads((model_dir / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{model_dir / 'model.json'}: not readable ({e}); an exported model folder holds "
                        "model.onnx and model.json (biomass export)") from None
    if not isinstance(info, dict) or info.get("format") != "biomass-cache onnx model" \
            or not (model_dir / "model.onnx").is_file():
        raise DataError(f"{model_dir}: not a model folder written by `biomass export` (model.onnx + model.json)")
    spec = info.get("input")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (isinstance(spec, dict) and isinstance(spec.get("size"), list) and len(spec["size"]) == 2
            and all(isinstance(v, int) and v > 0 for v in spec["size"]) and spec.get("resize") in FILTERS
            and (spec.get("decode_oversample") is None or number(spec["decode_oversample"]))
            and all(isinstance(spec.get(k), list) and len(spec[k]) == 3 and all(map(number, spec[k]))
                    for k in ("mean", "std")) and all(v > 0 for v in spec["std"])):
        raise DataError(f"{model_dir / 'model.json'}: its input {spec!r} is not one `biomass export` writes (size "
                        f"[W, H], resize one of {sorted(FILTERS)}, decode_oversample a number, mean and std three "
                        "numbers each); export the model again")
    return info


def preprocess(path: Path, info: dict) -> np.ndarray:
    """(3, H, W) float32, normalised as the model's input."""
    spec = info["input"]
    w, h = spec["size"]
    o = spec["decode_oversample"]
    image = load_image(path, at_least=(math.ceil(w * o), math.ceil(h * o)) if o else None)
    x = np.asarray(image.resize((w, h), FILTERS[spec["resize"]]), np.float32) / 255.0
    return ((x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)).transpose(2, 0, 1)


def open_session(model_dir: Path, info: dict, threads: int = 0):
    try:
        import onnxruntime as ort
    except ImportError:
        raise DataError("predict --model needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...): a damaged file
        raise DataError(f"{Path(model_dir) / 'model.onnx'}: onnxruntime cannot load it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); export the model again") from None
    shape = session.get_inputs()[0].shape
    w, h = info["input"]["size"]
    if list(shape[1:]) != [3, h, w]:
        raise DataError(f"{model_dir}: model.json says the input is 3 x {h} x {w}, the graph takes {shape[1:]}; "
                        "the folder's files do not belong together (export again)")
    if len(session.get_outputs()) != 1 + bool(info.get("maps")):
        raise DataError(f"{model_dir}: model.json says the graph has {1 + bool(info.get('maps'))} output(s), it has "
                        f"{len(session.get_outputs())}; the folder's files do not belong together (export again)")
    return session


def predict_with_model(model_dir: Path, photo_dir: Path, out: Path, threads: int = 0, maps: bool = False,
                       skip_bad: bool = False) -> None:
    """As `biomass predict` with members: every photo decoded once before anything is written (`check_photos`:
    unreadable ones stop it or, with `skip_bad`, are left out and listed; stretched or enlarged ones warned of)."""
    out = Path(out)
    check_output_file(out, "--out")
    folder = maps_folder(out) if maps else None
    info = read_model(model_dir)
    if maps and not info.get("maps"):
        raise DataError(f"{model_dir}: this model has no density-map output (its heads draw none; export a member "
                        "with a density head), so --maps cannot be written")
    session = open_session(model_dir, info, threads)
    photos, bad = check_photos(list_photos(Path(photo_dir)), {tuple(info["input"]["size"])}, skip_bad)
    name = session.get_inputs()[0].name
    grams, dmaps = [], []
    for k in range(0, len(photos), BATCH):
        batch = np.stack([preprocess(p, info) for p in photos[k:k + BATCH]])
        outputs = session.run(None, {name: batch})
        grams.append(outputs[0])
        dmaps.append(outputs[1] if maps else None)
    grams = np.concatenate(grams)
    write_csv(out, prediction_frame([p.stem for p in photos], [str(p) for p in photos], grams))
    if maps:
        for k, (photo, m) in enumerate(zip(photos, np.concatenate(dmaps))):
            save_map_png(folder / f"{photo.stem}.png", photo, m, grams[k])
        print(f"density maps: {folder}/ ({len(photos)} PNG)")
    if info.get("random_weights"):
        print("NOTE: this model's backbone had RANDOMLY INITIALISED weights: a demo, not real predictions")
    print(f"predictions for {len(photos)} photos: {out} (grams and g/m^2), model {model_dir} "
          f"({info.get('quantization') or 'fp32'})")
    report_skipped(bad)
