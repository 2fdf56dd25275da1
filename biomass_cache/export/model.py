"""`biomass export`: an ensemble as one ONNX graph, from a normalised photo tensor to the five targets in grams.

The graph holds what `biomass predict` runs for a member trained on a token cache: the backbone (its blocks whose
tokens were cached), the run's reduction when it has one, every fold model of every member, the TTA flips of a
test cache (the four views in one batch) and the weighted mean in component space, then the five targets with
the identities exact (GDM = clover + green, Total = clover + dead + green), and where a head draws density maps a
second output: the maps of the clean view, g/m^2 per patch, averaged over those heads (as `biomass predict --maps`).
Batch size is dynamic. `model.json` beside it says what the input must be (size, resize filter, normalisation),
what comes out and what made the graph.

An export checks itself: the graph in onnxruntime against the same module in PyTorch on real photos; a graph whose
relative error exceeds the tolerance (TOLERANCE, or INT8_TOLERANCE against the fp32 graph when quantised) is not
written. The weights are the given ones, or for `oof` and `stack` the ones `submit` fits on the out-of-fold
predictions. A LoRA run exports one checkpoint (a --full run: `biomass lora`, `biomass distill`), its adapters
merged into the backbone's weights; MC-dropout aggregation (per-photo weights) is refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from biomass_cache import __version__
from biomass_cache.backbone.views import IMAGENET_MEAN, IMAGENET_STD, TTA_VIEWS, ViewPolicy
from biomass_cache.backbone.vit import create_backbone, forward_tokens
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import atomic_folder, write_json
from biomass_cache.common.targets import COMPONENTS, PLOT_AREA_M2, TARGETS
from biomass_cache.heads import run_head
from biomass_cache.store.reduce import Reduction
from biomass_cache.submit.members import ResolvedMember, resolve_member, weights_file
from biomass_cache.submit.ensemble import fitter, oof_inputs
from biomass_cache.submit.predict import recorded_train_csv
from biomass_cache.submit.spec import FITTED, EnsembleSpec
from biomass_cache.train import runs

TOLERANCE = 1e-4  # relative RMS of the grams, onnxruntime fp32 against PyTorch
INT8_TOLERANCE = 0.02  # relative RMS of the grams, the int8 graph against the fp32 one
OPSET = 18
# what an export writes (model.onnx.data: the weights beside the graph, should they pass protobuf's 2 GB)
MODEL_FILES = ("model.onnx", "model.onnx.data", "model.json")


class Reduce(nn.Module):
    """The run's reduction as graph operations: layer norm, P x P average pooling, projection."""

    def __init__(self, red: Reduction):
        super().__init__()
        self.grid, self.pool = red.parent_grid, red.pool
        self.register_buffer("mean", torch.from_numpy(red.mean))
        self.register_buffer("components", torch.from_numpy(red.components))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L, T, C) -> (B, L, T', K)
        b, n_layers, _, c = tokens.shape
        x = F.layer_norm(tokens, (c,))
        if self.pool > 1:
            x = x.reshape(b * n_layers, self.grid[0], self.grid[1], c).permute(0, 3, 1, 2)
            x = F.avg_pool2d(x, self.pool).permute(0, 2, 3, 1).reshape(b, n_layers, -1, c)
        return (x - self.mean[:, None]) @ self.components


class Ensemble(nn.Module):
    """Photo tensor (B, 3, H, W), ImageNet-normalised -> (B, 5) grams: TTA views, backbone, heads, weighted mean;
    with heads that draw maps, (grams, (B, 3, rows, cols) density maps of the clean view, g/m^2)."""

    def __init__(self, backbone, layers: list[int], norm: bool, tiles: int, reduction: Reduction | None,
                 members: list[list[tuple[nn.Module, list[int]]]], weights: np.ndarray, tta: bool = True):
        super().__init__()
        self.tta = tta
        self.draws_maps = any(getattr(h, "has_maps", False) for folds in members for h, _ in folds)
        self.backbone, self.layers, self.norm, self.tiles = backbone, layers, norm, tiles
        self.vit = backbone.model  # registered: its weights are this module's (eval(), parameters(), export)
        self.reduce = None if reduction is None else Reduce(reduction)
        self.heads = nn.ModuleList(h for folds in members for h, _ in folds)
        self.plan = [[(sum(len(f) for f in members[:m]) + k, pos) for k, (_, pos) in enumerate(folds)]
                     for m, folds in enumerate(members)]
        self.register_buffer("weights", torch.as_tensor(np.asarray(weights, np.float32)))  # (3 components, M)
        to_targets = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 0, 0, 1], [0, 0, 1, 1, 1]], dtype=torch.float32)
        self.register_buffer("to_grams", to_targets * PLOT_AREA_M2)  # components (g/m^2) -> the five grams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]) if self.tta else x  # TTA_VIEWS' order
        tokens, _ = forward_tokens(self.backbone, views, self.layers, self.norm, self.tiles)
        if self.reduce is not None:
            tokens = self.reduce(tokens)
        total, maps = 0, []
        for m, folds in enumerate(self.plan):
            outs = [run_head(self.heads[k], tokens[:, pos], False, return_maps=self.heads[k].has_maps)
                    for k, pos in folds]
            comps = torch.stack([o["components"] for o in outs])
            comps = comps.mean(0).reshape(-1, x.shape[0], 3).mean(0)  # folds, then views
            total = total + self.weights[:, m] * comps
            maps += [o["density_map"][: x.shape[0]] for o in outs if "density_map" in o]  # the clean view comes first
        grams = total @ self.to_grams
        return (grams, torch.stack(maps).mean(0)) if self.draws_maps else grams

    def maps_info(self) -> dict | None:
        """model.json's description of the maps output (None: no head draws maps)."""
        if not self.draws_maps:
            return None
        grid = next(h.grid for h in self.heads if h.has_maps)
        return {"name": "density_map", "shape": [3, *map(int, grid)], "components": list(COMPONENTS),
                "units": "g/m^2", "view": TTA_VIEWS[0]}


def _member_heads(rm: ResolvedMember, layers: list[int]) -> list[tuple[nn.Module, list[int]]]:
    out = []
    for path in rm.checkpoints:
        head, meta = runs.load_head(path)
        missing = [b for b in meta["layers"] if b not in layers]
        if missing:
            raise DataError(f"member {rm.member.name}: {path} reads blocks {missing} its cache did not hold")
        out.append((head.eval(), [layers.index(b) for b in meta["layers"]]))
    return out


def ensemble_weights(spec: EnsembleSpec, resolved: list[ResolvedMember]) -> np.ndarray:
    """(3, M) weights per component and member: the given ones, or for `oof` and `stack` the ones `submit` fits on
    the members' out-of-fold predictions (labels from the members' recorded training data)."""
    m = len(resolved)
    if spec.aggregation == "mean":
        given = np.array([x.weight for x in spec.members], np.float64)
        return np.broadcast_to(given / given.sum(), (3, m)).copy()
    if spec.aggregation not in FITTED:
        raise DataError(f"export bakes fixed weights into the graph: aggregation {spec.aggregation!r} weighs each "
                        "photo by its own MC-dropout variance (use mean, oof or stack)")
    train_csv = recorded_train_csv(spec)
    if train_csv is None:
        raise DataError(f"the {spec.aggregation} weights are fitted on the members' OOF predictions, and no member "
                        "records where its train.csv is")
    oof = oof_inputs(resolved, train_csv, required=True, aggregation=f"exporting a {spec.aggregation} ensemble")
    weights = np.asarray(fitter(spec)[0](oof[0], oof[1]), np.float64)
    return weights if weights.ndim == 2 else np.broadcast_to(weights, (3, m)).copy()


def build(spec: EnsembleSpec, tta: bool = True) -> tuple[Ensemble, dict]:
    """The PyTorch module of `spec` and the description `model.json` starts from."""
    resolved = [resolve_member(m, spec.weights_files) for m in spec.members]
    if any(rm.kind == "lora" for rm in resolved):
        return build_lora(resolved, tta)
    first = resolved[0].extract
    same = ("backbone", "weights_sha256", "size", "layers", "norm", "tiles", "overrides", "precision")
    for rm in resolved[1:]:
        differ = [k for k in same if rm.extract.get(k) != first.get(k)]
        if differ:
            raise DataError(f"members {resolved[0].member.name} and {rm.member.name} read different backbones or "
                            f"views ({differ}): export them one at a time")
        if (rm.reduction is None) != (resolved[0].reduction is None) or (
                rm.reduction is not None and Reduction.load(rm.reduction.with_suffix("")).sha256
                != Reduction.load(resolved[0].reduction.with_suffix("")).sha256):
            raise DataError(f"members {resolved[0].member.name} and {rm.member.name} were trained on different "
                            "reductions of the tokens: export them one at a time")
    weights = weights_file(resolved[0])
    backbone = create_backbone(first["backbone"], weights, seed=first.get("seed", 0),
                               overrides=first.get("overrides") or {})
    backbone.model.eval()
    layers = list(first["layers"])
    reduction = None if resolved[0].reduction is None else Reduction.load(resolved[0].reduction.with_suffix(""))
    weights = ensemble_weights(spec, resolved)
    model = Ensemble(backbone, layers, first["norm"], first.get("tiles", 1), reduction,
                     [_member_heads(rm, layers) for rm in resolved], weights, tta).eval()
    info = model_info(model, build_info_size(spec)["input"], tta, spec.aggregation, resolved, weights,
                      {"name": first["backbone"], "weights_sha256": first["weights_sha256"], "layers": layers},
                      None if reduction is None else reduction.sha256)
    return model, info


def build_lora(resolved: list[ResolvedMember], tta: bool) -> tuple[Ensemble, dict]:
    """One LoRA checkpoint (a `--full` run of `biomass lora` or `biomass distill`, or one fold's checkpoint) as a
    graph: its adapters merged into the backbone's weights, so the graph is the plain backbone's size."""
    rm = resolved[0]
    if len(resolved) > 1 or len(rm.checkpoints) > 1:
        raise DataError(f"member {rm.member.name}: a LoRA run exports one checkpoint (each fold adapts its own "
                        "backbone): train it with --full, or export one fold's RUN/foldK/HEAD.json")
    from biomass_cache.lora.adapters import is_lora_layer
    from biomass_cache.lora.checkpoint import load_checkpoint

    head, live, meta = load_checkpoint(rm.checkpoints[0], weights_file(rm), "cpu", "fp32")
    for module in live.model.modules():
        if is_lora_layer(module):
            module.merge()
    s = live.s
    model = Ensemble(live.bb, live.layers, s.norm, s.tiles, None, [[(head, list(range(len(live.layers))))]],
                     np.ones((3, 1)), tta).eval()
    info = model_info(model, lora_input(s.size), tta, "mean", resolved, np.ones((3, 1)),
                      {"name": s.backbone, "weights_sha256": meta["base"]["weights_sha256"], "layers": live.layers,
                       "lora": {"blocks": s.blocks, "finetune": s.finetune,
                                "rank": s.rank if s.finetune == "lora" else None, "merged": s.finetune == "lora"}},
                      None)
    return model, info


def model_info(model: Ensemble, size_input: dict, tta: bool, aggregation: str, resolved: list[ResolvedMember],
               weights: np.ndarray, backbone: dict, reduction: str | None) -> dict:
    """What `model.json` says of a model: its input and outputs, members and (3, M) weights, backbone, reduction."""
    return {"format": "biomass-cache onnx model", "version": __version__,
            "input": {"name": "photos", "layout": "NCHW", **size_input},
            "output": {"name": "grams", "targets": list(TARGETS)}, "maps": model.maps_info(),
            "tta": list(TTA_VIEWS) if tta else [TTA_VIEWS[0]], "aggregation": aggregation,
            "members": [{"name": rm.member.name, "weights": dict(zip(COMPONENTS, weights[:, k].round(8).tolist())),
                         "checkpoints": [str(p) for p in rm.checkpoints]} for k, rm in enumerate(resolved)],
            "backbone": backbone, "reduction": reduction, "random_weights": backbone["weights_sha256"] == "random"}


def lora_input(size) -> dict:
    """What the check photos of a LoRA member must be made into: its size, the live views' policy (the default)."""
    policy = ViewPolicy()
    return {"size": list(size), "resize": policy.resample, "decode_oversample": policy.decode_oversample,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def build_info_size(spec: EnsembleSpec) -> dict:
    """The input description of `spec`'s model (what the check photos must be made into), without building it."""
    rm = resolve_member(spec.members[0], spec.weights_files)
    if rm.kind == "lora":
        return {"input": lora_input(json.loads((rm.run_dir / "config.json").read_text())["lora"]["size"])}
    policy = ViewPolicy.from_dict(rm.extract["policy"]) if rm.extract.get("policy") else ViewPolicy()
    return {"input": {"size": list(rm.extract["size"]), "resize": policy.resample,
                      "decode_oversample": policy.decode_oversample, "mean": list(IMAGENET_MEAN),
                      "std": list(IMAGENET_STD)}}


def _ort(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b ** 2), 1e-12)))


def worst_error(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The largest relative RMS over the outputs (grams, and the maps where there are)."""
    return max(rel_rms(a, b) for a, b in zip(got, expected, strict=True))


def export(spec: EnsembleSpec, out: Path, check_inputs: np.ndarray, quantize: str | None = None,
           tta: bool = True) -> dict:
    """Write OUT/model.onnx (and OUT/model.json) after checking it on `check_inputs` (N, 3, H, W), normalised."""
    model, info = build(spec, tta)
    return write_model(model, info, out, check_inputs, quantize)


def untraceable(model: nn.Module) -> str:
    """", the heads that fail: ..." for the heads of `model` that torch.export cannot trace alone (on tokens of
    their own shape), or "" when each traces alone (or the model has no heads)."""
    failing = []
    for k, head in enumerate(getattr(model, "heads", [])):
        cfg = head.config
        tokens = torch.randn(2, cfg["n_layers"], cfg["grid"][0] * cfg["grid"][1], cfg["channels"])
        try:
            torch.export.export(head, (tokens,))
        except Exception:
            failing.append(f"#{k} {cfg.get('name', type(head).__name__)}")
    return f", the heads that fail: {', '.join(failing)}" if failing else ""


def write_model(model: nn.Module, info: dict, out: Path, check_inputs: np.ndarray, quantize: str | None = None
                ) -> dict:
    """Export `model` (photos -> grams) to OUT/model.onnx with `info` as OUT/model.json, checked first."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise DataError(f"export needs onnx, onnxruntime and onnxscript: pip install -e \".[export]\" ({e})") from None
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # its optimiser's notes on ops it leaves alone
    out, model = Path(out), model.eval()
    w, h = info["input"]["size"]
    if check_inputs.shape[1:] != (3, h, w):
        raise DataError(f"the check photos are {check_inputs.shape[1:]}, the model takes (3, {h}, {w})")
    with torch.no_grad():
        outputs = model(torch.from_numpy(check_inputs))
    expected = [t.numpy() for t in (outputs if isinstance(outputs, tuple) else (outputs,))]
    names = ["grams", "density_map"][: len(expected)]
    with atomic_folder(out, "exporting") as tmp:
        tmp.mkdir(parents=True)
        batch = torch.export.Dim("batch", min=1)
        example = np.concatenate([check_inputs, check_inputs])[:2]  # a batch of 1 would pin the batch size
        logging.disable(logging.WARNING)  # torch.export's logged graphs and guesses, pages of them on a failure
        try:
            program = torch.onnx.export(model, (torch.from_numpy(example),), dynamo=True, opset_version=OPSET,
                                        input_names=["photos"], output_names=names,
                                        dynamic_shapes={"x": {0: batch}}, verbose=False)
        except Exception as e:  # its reason is pages long too: the first line, and which head fails
            first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])[:300]
            raise DataError(f"the model could not be exported to ONNX ({type(e).__name__}: {first})"
                            f"{untraceable(model)}; nothing written") from None
        finally:
            logging.disable(logging.NOTSET)
        program.save(str(tmp / "model.onnx"))
        got = _ort(tmp / "model.onnx", check_inputs)
        error = worst_error(got, expected)
        info["check"] = {"photos": len(check_inputs), "rel_rms_vs_pytorch": error, "tolerance": TOLERANCE}
        if not error <= TOLERANCE:
            raise DataError(f"the exported graph differs from PyTorch by a relative RMS of {error:.2e} on "
                            f"{len(check_inputs)} photos (tolerance {TOLERANCE:g}); nothing written")
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            logging.disable(logging.WARNING)  # its advice to pre-process a model for static quantisation
            try:
                quantize_dynamic(str(tmp / "model.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
            error = worst_error(_ort(tmp / "int8.onnx", check_inputs), got)
            info["check"].update(int8_rel_rms_vs_fp32=error, int8_tolerance=INT8_TOLERANCE)
            if not error <= INT8_TOLERANCE:
                raise DataError(f"the int8 graph differs from the fp32 one by a relative RMS of {error:.2e} "
                                f"(tolerance {INT8_TOLERANCE:g}); nothing written (export without --quantize)")
            (tmp / "int8.onnx").replace(tmp / "model.onnx")
            (tmp / "model.onnx.data").unlink(missing_ok=True)  # the fp32 weights of a large graph
        for extra in tmp.glob("model.onnx.data"):  # weights beyond 2 GB go to external data, kept beside
            info["external_data"] = extra.name
        info["quantization"] = quantize
        info["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
        write_json(tmp / "model.json", info)
    return info
