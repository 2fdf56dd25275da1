"""How token values are stored: float16, bfloat16 as its raw uint16 bits, or int8 with a per-token scale.

`encode` refuses what it cannot store faithfully (NaN, inf, values beyond the float16 range); `decode` gives
the stored values back exactly, at their own precision. The token store (store/handle.py) writes and reads through these two.
"""

from __future__ import annotations

import numpy as np
import torch


class CodecError(ValueError):
    """Tokens that cannot be stored faithfully (the store reports it as a StoreError)."""


def encode(x: np.ndarray | torch.Tensor, dtype: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float input -> (stored array, per-token scales or None). Casts on the input's device (a GPU tensor crosses
    to the host at storage width); non-finite values are refused, never stored."""
    t = torch.as_tensor(x).detach()
    stored, scales, ok = encode_on_device(t, dtype, what)
    check_encoded(ok, dtype, what, t)
    return host_array(stored.cpu(), dtype), None if scales is None else scales.cpu().numpy()


def encode_on_device(t: torch.Tensor, dtype: str, what: str, checked: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`encode` without leaving the device and without a sync: (stored values, scales or None, ok), ok a (2,) bool
    tensor: the input is finite, the stored values are finite (float16's range). Check ok with `check_encoded`
    once it is on the host; `host_array` gives the stored array of the values. `checked`: the caller checks the
    input's finiteness itself (extraction: precision.finite_rows), so it is not checked again here."""
    if not t.is_floating_point():
        raise CodecError(f"{what}: expected floating point tokens, got {t.dtype}")
    finite = torch.ones((), dtype=torch.bool, device=t.device) if checked else _finite(t)
    if dtype == "float16":
        out = t.to(torch.float16)
        return out, None, torch.stack([finite, _finite(out)])
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16), None, torch.stack([finite, finite])
    q, scale = _quantize(t)
    return q, scale, torch.stack([finite, finite])


def check_encoded(ok: torch.Tensor, dtype: str, what: str, values: torch.Tensor | None = None) -> None:
    """Raise CodecError when `encode_on_device`'s ok flags say the values cannot be stored faithfully."""
    finite, in_range = (bool(v) for v in ok.cpu())
    if not finite:
        raise CodecError(f"{what}: contains NaN or inf")
    if not in_range:
        largest = "" if values is None else f" (max |x| = {values.abs().max().item():.4g})"
        raise CodecError(f"{what}: values beyond the {dtype} range{largest}; use --dtype bfloat16")


def host_array(stored: torch.Tensor, dtype: str) -> np.ndarray:
    """The numpy array the store writes for stored values already on the host (bfloat16 as its uint16 bits)."""
    return stored.numpy().view(np.uint16) if dtype == "bfloat16" else stored.numpy()


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-token scales: symmetric absmax / 127."""
    t = t.float()
    scale = t.abs().amax(dim=-1) / 127.0
    return torch.round(t / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127).to(torch.int8), scale


def stored_values(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a store of `dtype` gives back for float tokens `t` (`TokenStore.read_values`), on their device: a
    reduction made in the extraction pass then sees exactly the tokens a reduction of the full store reads
    (store/reduce.py)."""
    if dtype == "int8":
        q, scale = _quantize(t)
        return q.float() * scale[..., None]
    return t.to(torch.float16 if dtype == "float16" else torch.bfloat16)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """All finite, as a 0-d bool tensor on t's device, by one float32 sum (inf and NaN propagate; finite tokens sum
    far below float32's range): a tenth of the time of isfinite(t).all() (measured)."""
    return torch.isfinite(t.sum(dtype=torch.float32))


def decode(data: np.ndarray, scales: np.ndarray | None, dtype: str) -> torch.Tensor:
    """Stored values -> a tensor holding them exactly, at their own precision (float16, bfloat16; int8 times its
    scales in float32), sharing `data`'s memory where it can."""
    t = torch.from_numpy(data.view(np.int16) if dtype == "bfloat16" else data)
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)
    if dtype == "int8":
        return t.float() * torch.from_numpy(scales)[..., None]
    return t
