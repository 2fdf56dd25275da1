"""`biomass bundle`: one folder to attach to an offline Kaggle notebook that writes the submission.

BUNDLE_DIR/
  run_submission.py   installs from wheels/ with pip (indexes off), runs `biomass submit`, validates the CSV
  README.md           how to run it, which backbone weights it needs
  wheels/             this project's wheel + pinned wheels of the dependencies the notebook image lacks
  members/NN-NAME/    each member's checkpoints and configs (never a token cache)
  ensemble.toml       the ensemble, member paths relative to the bundle
  bundle.json         manifest: version, Python, wheels, backbones and their weights sha256, time estimate
  SHA256SUMS          every file's sha256 (checked by run_submission.py)

The notebook image is assumed to ship the packages of STOCK_KAGGLE and everything they depend on; the bundle holds
the rest of the project's dependency closure at the versions installed here. Wheels are built by `pip wheel` for
this interpreter's Python version and platform (Kaggle's GPU image: CPython 3.11 on Linux x86_64).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import biomass_cache
from biomass_cache.backbone.views import TTA_VIEWS
from biomass_cache.common.content import sha256_file
from biomass_cache.common.errors import BundleError
from biomass_cache.common.io import atomic_folder, write_json
from biomass_cache.common.lock import WriterLock
from biomass_cache.submit import bundle_run
from biomass_cache.submit.members import ResolvedMember, resolve_member
from biomass_cache.submit.spec import spec_from_options

# What a stock Kaggle GPU notebook image ships (with their dependencies), so the bundle need not carry them.
STOCK_KAGGLE = ("torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "pillow", "matplotlib",
                "safetensors", "tqdm")
PROJECT = Path(biomass_cache.__file__).resolve().parents[1]
RUN_FILES = ("config.json", "folds.csv", "metrics.json", "reduction.json", "reduction.safetensors")


def closure(requirements: Iterable[str]) -> dict[str, str]:
    """Installed distributions (canonical name -> version) that `requirements` need, transitively, with the extras
    they ask for (torch -> cuda-toolkit[cudart] -> ...); markers are evaluated for this interpreter. A needed
    distribution that is absent is an error."""
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(text, "") for text in requirements]
    while todo:
        text, extra = todo.pop()
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        new = [e for e in ("", *sorted(req.extras)) if (name, e) not in seen]
        if not new:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise BundleError(f"{req.name} is needed but not installed here: install the project's dependencies "
                              "first (pip install -e .)") from None
        found[name] = dist.version
        for e in new:
            seen.add((name, e))
            todo += [(r, e) for r in dist.requires or []]
    return found


def project_requirements(project: Path = PROJECT) -> list[str]:
    pyproject = project / "pyproject.toml"
    if not pyproject.is_file():
        raise BundleError(f"{pyproject} not found: `biomass bundle` builds the project's wheel from its source "
                          "checkout")
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def bundled_packages(stock: Iterable[str], project: Path = PROJECT) -> dict[str, str]:
    """The project's dependency closure minus what the stock packages bring (name -> pinned version)."""
    shipped = closure(stock)
    return {n: v for n, v in sorted(closure(project_requirements(project)).items()) if n not in shipped}


def _pip(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        disk = next((words for errno_text, words in (("[Errno 27]", "over this process's file-size limit (ulimit -f)"),
                                                     ("[Errno 28]", "on a full disk")) if errno_text in output), None)
        cause = f"pip could not write {disk}" if disk else "a package registry must be reachable to build the bundle"
        tail = "\n".join(output.splitlines()[-8:])
        raise BundleError(f"{what} failed (pip {' '.join(args[:2])} ..., exit status {result.returncode}; {cause}):"
                          f"\n{tail}")


def build_wheels(packages: dict[str, str], wheels: Path, project: Path = PROJECT) -> list[Path]:
    """This project's wheel (built from a copy of its source) and one wheel per pinned package, into `wheels`."""
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="biomass-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(project / name, src / name)
        for package in ("biomass_cache",):
            shutil.copytree(project / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], "building the project wheel")
    if packages:
        _pip(["wheel", "--no-deps", "-w", str(wheels), *(f"{n}=={v}" for n, v in packages.items())],
             "fetching the dependency wheels")
    return sorted(wheels.glob("*.whl"))


@dataclass
class Copied:
    member: ResolvedMember
    path: str  # the member's path inside the bundle (a run folder, or one checkpoint's .json)


def copy_member(rm: ResolvedMember, bundle: Path, k: int) -> Copied:
    """The member's checkpoints (.json + .safetensors) and its run's configs into members/NN-NAME/."""
    dest = Path("members") / f"{k:02d}-{rm.run_dir.name}"
    files = [rm.run_dir / n for n in RUN_FILES if (rm.run_dir / n).is_file()]
    files += sorted(rm.run_dir.glob("oof*.csv")) if rm.member.path.is_dir() else []
    files += [p for c in rm.checkpoints for p in (c, c.with_suffix(".safetensors"))]
    for f in files:
        target = bundle / dest / f.relative_to(rm.run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    inside = dest if rm.member.path.is_dir() else dest / rm.checkpoints[0].relative_to(rm.run_dir)
    return Copied(rm, inside.as_posix())


def seconds_per_view(rm: ResolvedMember) -> tuple[float, str] | None:
    """The backbone's measured seconds per view and where, recorded in the member's training cache (if still there)."""
    import zarr

    if rm.kind != "cache":
        return None
    path = json.loads((rm.run_dir / "config.json").read_text()).get("cache", {}).get("path")
    try:
        attrs = zarr.open_group(path, mode="r").attrs if path else {}
    except (FileNotFoundError, ValueError, OSError):
        return None
    timing = attrs.get("timing")
    return (float(timing["seconds_per_view"]), timing["on"]) if timing else None


def estimate_lines(copied: list[Copied], test_images: int | None) -> list[str]:
    """Test-time extraction estimate per distinct backbone setting: images x views x measured seconds per view."""
    out, seen = [], set()
    for c in copied:
        key = json.dumps({k: v for k, v in c.member.extract.items() if k != "weights"}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        measured = seconds_per_view(c.member)
        if measured is None:
            out.append(f"{c.member.member.name}: no measured seconds per view (its training cache records none)")
            continue
        s, on = measured
        if test_images:
            total = test_images * len(TTA_VIEWS) * s
            out.append(f"{c.member.member.name}: {test_images} images x {len(TTA_VIEWS)} views x {s:.3f} s/view "
                       f"(measured on {on}) = {total / 60:.1f} min")
        else:
            out.append(f"{c.member.member.name}: {len(TTA_VIEWS) * s:.2f} s per test image ({len(TTA_VIEWS)} views x "
                       f"{s:.3f} s/view measured on {on}); --test-images N for a total")
    return out


def make_bundle(ensemble: Optional[Path], members: Optional[str], out: Path, stock: Iterable[str] = STOCK_KAGGLE,
                test_images: int | None = None, overwrite: bool = False) -> dict:
    """Write the bundle folder (built under a temporary name, then renamed); returns its manifest."""
    spec = spec_from_options(ensemble, members)
    resolved = [resolve_member(m, {}) for m in spec.members]
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another --out or pass --overwrite")
    stock = sorted(canonicalize_name(s) for s in stock)
    packages = bundled_packages(stock)
    with WriterLock(out, "two bundles would mix their files"), atomic_folder(out, "partial") as tmp:
        tmp.mkdir(parents=True)
        wheels = build_wheels(packages, tmp / bundle_run.WHEELS)
        copied = [copy_member(rm, tmp, k) for k, rm in enumerate(resolved, start=1)]
        doc = {"aggregation": spec.aggregation, "mc_samples": spec.mc_samples, "mc_seed": spec.mc_seed,
               "stack_alpha": spec.stack_alpha,
               "member": [{"path": c.path, "weight": c.member.member.weight, "head": c.member.member.head}
                          for c in copied]}
        (tmp / bundle_run.ENSEMBLE).write_text(bundle_run.toml_ensemble(doc))
        shutil.copy2(Path(bundle_run.__file__), tmp / "run_submission.py")
        backbones = {rm.extract["backbone"]: rm.extract["weights_sha256"] for rm in resolved}
        estimate = estimate_lines(copied, test_images)
        manifest = {"version": biomass_cache.__version__, "python": list(sys.version_info[:2]), "stock": stock,
                    "packages": packages, "wheels": [w.name for w in wheels], "backbones": backbones,
                    "members": [c.path for c in copied], "estimate": estimate}
        write_json(tmp / bundle_run.MANIFEST, manifest)
        (tmp / "README.md").write_text(readme(manifest))
        sums = [f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}" for p in sorted(tmp.rglob("*"))
                if p.is_file()]
        (tmp / bundle_run.CHECKSUMS).write_text("\n".join(sums) + "\n")
    return manifest | {"bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file())}


def readme(manifest: dict) -> str:
    weights = [f"- `{name}`: " + ("random weights (a demo bundle: no file needed)" if sha == "random" else
                                  f"the weights file with sha256 `{sha}`: `--weights {name}=PATH`")
               for name, sha in manifest["backbones"].items()]
    return "\n".join([
        f"# biomass-cache {manifest['version']} submission bundle",
        "",
        "Attach this folder to the notebook as a dataset, attach the competition data and the backbone weights, "
        "switch the internet off, and run:",
        "",
        "```",
        "python /kaggle/input/BUNDLE/run_submission.py --data /kaggle/input/COMPETITION --out submission.csv "
        "[--weights BACKBONE=PATH]",
        "```",
        "",
        "It checks SHA256SUMS, installs the project from `wheels/` with `pip install --no-index --find-links`, "
        "runs `biomass submit` with `ensemble.toml` (test caches go to /kaggle/working/biomass-work), and "
        "validates the CSV. Options: `--device`, `--precision auto|bf16|fp16|fp32`, `--devices cuda:0,cuda:1`.",
        "",
        "Backbone weights:", *weights,
        "",
        f"Built for Python {'.'.join(map(str, manifest['python']))}; the image must already hold: "
        f"{', '.join(manifest['stock'])} (and their dependencies). Bundled: "
        f"{', '.join(f'{n}=={v}' for n, v in manifest['packages'].items())}.",
        "",
        "Estimated test-time extraction:", *[f"- {line}" for line in manifest["estimate"]],
        "",
    ])
