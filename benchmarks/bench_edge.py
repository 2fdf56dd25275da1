"""An exported model on a small CPU (size, latency per photo, agreement), and distilled students against their
teacher (out-of-fold score), for ViT-S and ViT-B.

Exported models (the default): for each backbone, a model of the shape `biomass export --no-tta` writes (backbone,
three cached blocks, a density head at its defaults with its density-map output, the clean view alone) at 448 x 224
is built with random weights and exported as fp32 and as dynamic int8 (`export/model.write_model`, which checks the
graph against PyTorch before writing it). Then, side by side in one process, batch 1: milliseconds per photo in
onnxruntime (fp32, int8) and in PyTorch eager, on 1 and 2 threads (median of --reps after a warm-up), the files'
sizes, and the relative RMS of the grams: fp32 graph against eager, int8 against fp32. Random weights: the sizes
and speeds hold for real weights of the same shape, the int8 error does not (real weights' ranges differ).

Students (`--students`): on the quality bar's data and ViT-S token cache (bench_heads.py's `full` preset: 160
synthetic training photos, 224 x 112 views, 4 views, grouped 5 folds) with 40 unlabelled photos, the teacher is
its 5-fold density run (120 epochs); each student arm is `biomass distill` on the teacher's folds (LoRA or full
fine-tuning of the last 4 blocks, with or without the feature loss, --epochs), its pooled OOF competition_r2
beside the teacher's on the same images, and its training seconds. Every backbone has random weights (the
students another seed than the teacher's): the scores say whether the machinery learns, not what a real student
keeps of a real teacher.

    python benchmarks/bench_edge.py [--reps 20] [--backbones vit_small_patch16_dinov3,vit_base_patch16_dinov3]
    python benchmarks/bench_edge.py --students [--epochs 8] [--work DIR]

Writes benchmarks/results/edge.json, or with --students edge_students.json.
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


STUDENT_ARMS = [  # (backbone, finetune, feature-loss weight)
    ("vit_small_patch16_dinov3", "lora", 0.0),
    ("vit_small_patch16_dinov3", "lora", 1.0),
    ("vit_small_patch16_dinov3", "full", 1.0),
    ("vit_base_patch16_dinov3", "lora", 1.0),
]


def students(args: argparse.Namespace) -> None:
    """The teacher's OOF score beside each distilled student's, on the same folds and images."""
    from bench_heads import FOLDS, LAYERS, PRESETS, folds_of, prepare, train_heads

    from biomass_cache.lora.settings import LoraSettings
    from biomass_cache.submit.distill import distill
    from biomass_cache.submit.spec import spec_from_options
    from biomass_cache.train.config import TrainConfig

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-students-"))
    sz = {**PRESETS["full"], "n_test": 40, "int8": False}
    data, cache, _, _ = prepare(work, sz)
    folds_of(data, work)
    teacher = work / "teacher"
    t = time.perf_counter()
    if not (teacher / "metrics.json").is_file():
        train_heads(cache, data, teacher, work / "folds.csv", {"density": {}}, epochs=sz["epochs"], threads=2,
                    plots=False)
    teacher_s = time.perf_counter() - t
    rows = []
    for backbone, finetune, features in STUDENT_ARMS:
        s = LoraSettings(backbone=backbone, backbone_seed=1, size=tuple(sz["size"]), layers=list(LAYERS),
                         finetune=finetune)
        cfg = TrainConfig(head="density", folds=FOLDS, epochs=args.epochs, device="cpu", workers=1, tta=0,
                          plots=False)
        out = work / f"student-{backbone.split('_')[1]}-{finetune}-f{features:g}"
        t = time.perf_counter()
        metrics = distill(spec_from_options(None, str(teacher)), data, out, s, cfg, photo_dirs=[data / "test"],
                          work_dir=work, overwrite=True, progress=False, features=features)
        row = {"student": backbone, "finetune": finetune, "features": features, "epochs": args.epochs,
               "oof_competition_r2": metrics["competition_r2"],
               "teacher_oof_competition_r2": metrics["distill"]["teacher_oof_competition_r2"],
               "labels": metrics["distill"]["labels"], "n_unlabelled": metrics["distill"]["n_unlabelled"],
               "seconds": time.perf_counter() - t}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_json(args.out or Path(__file__).parent / "results" / "edge_students.json", {
        "what": f"students distilled from a 5-fold density teacher on the quality bar's data ({sz['n_train']} "
                f"synthetic training photos, {sz['size'][0]}x{sz['size'][1]} views, grouped {FOLDS} folds, 40 "
                "unlabelled photos); alpha 0.5, unlabelled weight 0.5, LoRA or full fine-tuning of the last 4 blocks",
        "weights": "random (teacher ViT-S seed 0, students seed 1): whether the machinery learns, not what a real "
                   "student keeps of a real teacher",
        "teacher": {"backbone": "vit_small_patch16_dinov3", "epochs": sz["epochs"], "seconds": teacher_s},
        "rows": rows, "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "work": str(work)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backbones", default="vit_small_patch16_dinov3,vit_base_patch16_dinov3")
    ap.add_argument("--students", action="store_true", help="distilled students against their teacher")
    ap.add_argument("--epochs", type=int, default=8, help="--students: each student's epochs")
    ap.add_argument("--work", type=Path, default=None, help="--students: data, cache and runs (kept, reused)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    keep_freed_memory()
    if args.students:
        students(args)
        return
    args.out = args.out or Path(__file__).parent / "results" / "edge.json"
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
                eager = model(torch.from_numpy(photos))[0].numpy()  # (grams, density maps)
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
