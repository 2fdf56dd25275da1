"""run_submission.py of an offline bundle (`biomass bundle`): install from the bundle, run `biomass submit`, validate.

This file is copied into every bundle. It runs before the project is installed, so at import it uses only the
standard library. In a Kaggle notebook without internet:

    python /kaggle/input/BUNDLE/run_submission.py --data /kaggle/input/COMPETITION --out submission.csv \\
        --weights vit_small_patch16_dinov3=/kaggle/input/WEIGHTS/dinov3_vits16.pth
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
MANIFEST, CHECKSUMS, ENSEMBLE, WHEELS = "bundle.json", "SHA256SUMS", "ensemble.toml", "wheels"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sha256(path: Path) -> str:
    """biomass_cache.common.content.sha256_file's digest, in the standard library only: this file runs before the package
    is installed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_files(bundle: Path) -> None:
    """Every file listed in SHA256SUMS exists with its checksum (a partial upload stops here, naming the file)."""
    listed = (bundle / CHECKSUMS).read_text().splitlines()
    bad = [name for digest, name in (line.split("  ", 1) for line in listed if line)
           if not (bundle / name).is_file() or sha256(bundle / name) != digest]
    if bad:
        fail(f"{bundle}: {len(bad)} file(s) missing or changed since the bundle was made: {bad[:5]}; upload the "
             "bundle folder again")


def toml_ensemble(doc: dict) -> str:
    """An ensemble file's TOML text (the keys biomass_cache.submit.spec.load_ensemble reads)."""
    lines = [f"{k} = {json.dumps(doc[k])}" for k in ("aggregation", "mc_samples", "mc_seed", "stack_alpha")
             if k in doc]
    for member in doc["member"]:
        lines += ["", "[[member]]"] + [f"{k} = {json.dumps(v)}" for k, v in member.items() if v is not None]
    return "\n".join(lines) + "\n"


def install(bundle: Path, version: str) -> None:
    """pip install the project from the bundle's wheels, package indexes off (what is already installed stays)."""
    try:
        if importlib.import_module("biomass_cache").__version__ == version:
            return
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(bundle / WHEELS),
           f"biomass-cache=={version}"]
    print("installing:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        fail("pip could not install the project from the bundle's wheels (see above): the environment may lack a "
             "package the bundle assumes it has (bundle.json lists the bundled ones); rebuild the bundle with "
             "`biomass bundle --stock ...` naming what this environment ships")
    importlib.invalidate_caches()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a validated submission.csv with the bundled ensemble, offline.")
    p.add_argument("--data", required=True, type=Path, help="Competition data folder (test.csv, test/).")
    p.add_argument("--out", default=Path("submission.csv"), type=Path, help="Submission file to write.")
    p.add_argument("--weights", action="append", default=[],
                   help="BACKBONE=PATH of the backbone weights file (repeat, or comma-separate).")
    p.add_argument("--work-dir", type=Path, help="Writable folder for test caches [/kaggle/working/biomass-work "
                   "on Kaggle, else biomass-work beside --out].")
    p.add_argument("--device", default="auto", help="Device of the heads: auto | cpu | cuda [auto].")
    p.add_argument("--precision", help="Backbone precision: auto | bf16 | fp16 | fp32 [each training cache's].")
    p.add_argument("--devices", help="Split the backbone over devices, e.g. cuda:0,cuda:1 (two T4s).")
    args = p.parse_args(argv)

    manifest = json.loads((HERE / MANIFEST).read_text())
    if tuple(sys.version_info[:2]) != tuple(manifest["python"]):
        print(f"WARNING: the bundle's wheels were built for Python {'.'.join(map(str, manifest['python']))}, this "
              f"is {sys.version.split()[0]}: binary wheels may not install", file=sys.stderr)
    if not (args.data / "test.csv").is_file():
        fail(f"{args.data / 'test.csv'} not found: --data must be the competition's data folder")
    check_files(HERE)
    install(HERE, manifest["version"])

    out = args.out.resolve()
    kaggle = Path("/kaggle/working")
    work = (args.work_dir or (kaggle / "biomass-work" if kaggle.is_dir() else out.parent / "biomass-work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    doc = tomllib.loads((HERE / ENSEMBLE).read_text())
    for member in doc["member"]:
        member["path"] = str(HERE / member["path"])
    (work / ENSEMBLE).write_text(toml_ensemble(doc))

    import torch  # the stock image's

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cmd = [sys.executable, "-m", "biomass_cache", "submit", "--data", str(args.data.resolve()), "--ensemble",
           str(work / ENSEMBLE), "--out", str(out), "--work-dir", str(work), "--device", device]
    weights = ",".join(w for w in args.weights if w)
    cmd += ["--weights", weights] if weights else []
    cmd += ["--precision", args.precision] if args.precision else []
    cmd += ["--devices", args.devices] if args.devices else []
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=work, env={**os.environ, "PYTHONNOUSERSITE": "1"}).returncode
    if code != 0:
        fail(f"biomass submit failed (exit status {code}, see above)")

    import pandas as pd

    from biomass_cache.submit.submission import expected_sample_ids, validate_submission  # installed by now

    sub = pd.read_csv(out, dtype={"sample_id": str})
    try:
        validate_submission(sub, expected_sample_ids(args.data / "test.csv"), where=str(out))
    except ValueError as e:
        fail(str(e))
    print(f"submission: {out} ({len(sub)} rows) validated against {args.data / 'test.csv'}")


if __name__ == "__main__":
    main()
