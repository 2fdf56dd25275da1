"""An exported model on a small CPU: size, latency per photo and agreement, for ViT-S and ViT-B at 448 x 224.

For each backbone, a model of the shape `biomass export --no-tta` writes (backbone, three cached blocks, a density
head at its defaults, the clean view alone) is built with random weights and exported as fp32 and as dynamic int8
(`export/model.write_model`, which checks the graph against PyTorch before writing it). Then, side by side in one
process, batch 1: milliseconds per photo in onnxruntime (fp32, int8) and in PyTorch eager, on 1 and 2 threads
(median of --reps after a warm-up), the files' sizes, and the relative RMS of the grams: fp32 graph against eager,
int8 against fp32. Random weights: the sizes and speeds hold for real weights of the same shape, the int8 error
does not (real weights' ranges differ). No student is distilled here (`biomass distill` is not built), so the
student-against-teacher OOF column of the issue is absent.

    python benchmarks/bench_edge.py [--reps 20] [--backbones vit_small_patch16_dinov3,vit_base_patch16_dinov3]

Writes benchmarks/results/edge.json.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from biomass_cache.backbone.views import IMAGENET_MEAN, IMAGENET_STD, ViewPolicy
from biomass_cache.backbone.vit import create_backbone
from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.common.targets import TARGETS, ZScore
from biomass_cache.export.model import Ensemble, rel_rms, write_model
from biomass_cache.extract.pipeline import default_layers
from biomass_cache.heads import create_head

SIZE = (448, 224)


def model_of(name: str) -> tuple[Ensemble, dict]:
    backbone = create_backbone(name, "random", seed=0)
    backbone.model.eval()
    layers = default_layers(backbone.depth)
    grid = (SIZE[1] // backbone.patch_size, SIZE[0] // backbone.patch_size)
    rng = np.random.default_rng(0)
    zscore = ZScore.fit(rng.lognormal(3, 0.5, (64, len(TARGETS))))
    head = create_head("density", n_layers=len(layers), channels=backbone.embed_dim, grid=grid, zscore=zscore).eval()
    model = Ensemble(backbone, layers, True, 1, None, [[(head, list(range(len(layers))))]], np.ones((3, 1)),
                     tta=False)
    policy = ViewPolicy()
    info = {"format": "biomass-cache onnx model", "input": {"name": "photos", "size": list(SIZE),
            "resize": policy.resample, "decode_oversample": policy.decode_oversample, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD)}, "backbone": {"name": name, "weights_sha256": "random", "layers": layers},
            "random_weights": True}
    return model.eval(), info


def latency(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backbones", default="vit_small_patch16_dinov3,vit_base_patch16_dinov3")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edge.json")
    args = ap.parse_args()
    keep_freed_memory()
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    photos = rng.standard_normal((4, 3, SIZE[1], SIZE[0])).astype(np.float32)
    one = photos[:1]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    try:
        for name in args.backbones.split(","):
            model, info = model_of(name)
            row = {"backbone": name, "size": list(SIZE), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            paths = {}
            for q in (None, "int8"):
                folder = work / f"{name}-{q or 'fp32'}"
                result = write_model(model, dict(info), folder, photos, q)
                paths[q or "fp32"] = folder / "model.onnx"
                row[f"{q or 'fp32'}_mb"] = result["bytes"] / 1e6
                row["check"] = result["check"]
            with torch.no_grad():
                eager = model(torch.from_numpy(photos)).numpy()
            for threads in (1, 2):
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
                sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                            for k, p in paths.items()}
                torch.set_num_threads(threads)
                with torch.no_grad():
                    row[f"eager_ms_{threads}t"] = latency(lambda: model(torch.from_numpy(one)), args.reps)
                for k, s in sessions.items():
                    row[f"ort_{k}_ms_{threads}t"] = latency(lambda s=s: s.run(None, {"photos": one}), args.reps)
                outs = {k: s.run(None, {"photos": photos})[0] for k, s in sessions.items()}
            row["fp32_vs_eager_rel_rms"] = rel_rms(outs["fp32"], eager)
            row["int8_vs_fp32_rel_rms"] = rel_rms(outs["int8"], outs["fp32"])
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "check"},
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, {"what": "an exported model (--no-tta shape: backbone + density head, random weights) at "
                          f"{SIZE[0]}x{SIZE[1]}, batch 1, median of {args.reps} after a warm-up",
                          "machine": {"cpu": platform.processor() or platform.machine(),
                                      "onnxruntime": ort.__version__, "torch": torch.__version__},
                          "goals": {"int8_vit_s_mb": 30, "ms_per_photo_one_core": 150, "int8_vs_fp32": 0.01},
                          "rows": rows, "weights": "random (sizes and speeds hold for real weights; errors do not)"})


if __name__ == "__main__":
    main()
