"""The backbone's compute precision (`--precision auto|bf16|fp16|fp32`) and the guard against fp16 overflow.

`auto` is bf16 autocast on a GPU that computes bf16 natively (compute capability 8.0 and up), fp16 autocast on an
older GPU (T4, P100, V100), fp32 on the CPU. The resolved precision is recorded in a store's fingerprint as its
`compute` value, since tokens computed in other precisions differ. Large ViTs can overflow fp16 (max 65504): every
batch is checked and a non-finite token stops the run before anything of that batch is written.
"""

from __future__ import annotations

from typing import Sequence

import torch

from biomass_cache.common.errors import DataError, NonFiniteError
from biomass_cache.common.runtime import cpu_has_native_bf16

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
COMPUTE = {"bf16": "bfloat16-autocast", "fp16": "float16-autocast", "fp32": "float32"}  # fingerprint values


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise DataError(f"precision must be one of {PRECISIONS}, got {name!r}")
    return name


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 at speed: a GPU of compute capability 8.0 and up (Ampere), a CPU with
    AVX512-BF16 or AMX; elsewhere bf16 is emulated, slowly, or not there at all."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """The concrete precision (bf16, fp16 or fp32) that `name` means on `device`."""
    check_precision(name)
    if name != "auto":
        return name
    if device.type == "cpu":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def precision_of_compute(compute: str) -> str:
    """The precision a fingerprint's `compute` value records (the inverse of COMPUTE)."""
    for precision, value in COMPUTE.items():
        if value == compute:
            return precision
    raise ValueError(f"unknown compute precision {compute!r} in a fingerprint (known: {sorted(COMPUTE.values())})")


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """Autocast to the precision's dtype on `device` (disabled for fp32)."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def finite_rows(tokens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """(B, L) bool on the tokens' device, without a sync: row b's block l holds no inf/NaN (tokens and prefix).
    By float32 sums (an inf or NaN makes the sum one; finite tokens sum far below float32's range): a tenth of the
    time of `isfinite(...).all()` (measured)."""
    def ok(x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x.flatten(2).sum(-1, dtype=torch.float32))
    return ok(tokens) & ok(prefix)


def non_finite_error(finite: torch.Tensor, image_ids: Sequence[str], views_per_image: Sequence[int],
                     layers: Sequence[int], precision: str) -> NonFiniteError | None:
    """The error naming the first image and cached block with inf/NaN in `finite` ((B, L), from `finite_rows`), or
    None. Rows belong to the images in order, `views_per_image[k]` rows to image k."""
    bad = ~finite.cpu()
    if not bool(bad.any()):
        return None
    row, pos = (int(v) for v in bad.nonzero()[0])
    image = next(i for i, end in zip(image_ids, torch.tensor(list(views_per_image)).cumsum(0).tolist()) if row < end)
    hint = ("fp16 overflowed (its largest value is 65504): extract with --precision bf16 on a GPU with native "
            "bf16, or --precision fp32" if precision == "fp16" else "check the backbone weights")
    return NonFiniteError(f"non-finite tokens (inf or NaN) from image {image!r} at cached block {layers[pos]} "
                          f"(the first cached block affected) in {precision} compute; {hint}; nothing of this image "
                          "was written")
