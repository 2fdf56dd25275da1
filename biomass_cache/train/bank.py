"""A run's tokens held once where its heads train, in the dtype they compute in; batches gathered there by index.

A run reads every stored view of the same few hundred images for hundreds of epochs, so its tokens are read from the
store once (`TokenBank.load`) and every batch is one indexing operation on the bank: no per-sample copies, casts
or collation. The bank is laid out (layers, rows x views, T, C), so a batch's gather copies whole (T, C) blocks into
(L, B, T, C): each layer's slice of it is contiguous for the heads' per-layer matmuls.

A head whose first step is the parameter-free LayerNorm of the tokens (`input_norm`, the density head) would redo
that normalisation on the same fixed tokens at every step; a `normed` bank holds them normalised once (computed in
fp32 from the stored values: the same numbers the head computes). Token-level mixup mixes raw tokens, so a run with
mixup keeps them raw.

Where the bank lives and in what dtype is `plan_bank`'s choice: the training device if the tokens fit its memory
budget, else the host (batches copied to the device), else none (the DataLoader streams from the store).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from biomass_cache.backbone.precision import native_bf16
from biomass_cache.common.runtime import available_ram

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
HOST_RAM_FRACTION = 0.5  # a bank in host RAM may take this share of the available RAM
DEVICE_FRACTION = 0.8  # ... and this share of a GPU's free memory (the rest: heads, activations, allocator slack)


def training_precision(name: str, device: torch.device) -> str:
    """The compute precision of the heads' training: "auto" is bf16 where the device computes it natively (a GPU
    of compute capability 8.0 and up, a CPU with AVX512-BF16 or AMX), else fp32."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"


def budget(device: torch.device) -> int:
    """Bytes a bank may take on `device`."""
    if device.type == "cuda":
        return int(DEVICE_FRACTION * torch.cuda.mem_get_info(device)[0])
    return int(HOST_RAM_FRACTION * available_ram())


@dataclass(frozen=True)
class BankPlan:
    """Where a run's tokens are held and how: `device`, `dtype`, `normed` (see the module docstring)."""

    device: torch.device
    dtype: torch.dtype
    normed: bool
    nbytes: int

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.nbytes / 1e9:.2f} GB of tokens held on {self.device} in {dtype}"
                + (", LayerNorm applied once" if self.normed else ""))


def bank_nbytes(store, n_rows: int, n_views: int, n_layers: int, dtype: torch.dtype) -> int:
    rows, cols = store.grid
    return n_rows * n_views * n_layers * rows * cols * store.channels * dtype.itemsize


def plan_bank(store, n_rows: int, n_views: int, n_layers: int, device: torch.device, precision: str,
              norm: bool, budgets: dict[str, int] | None = None) -> tuple[BankPlan | None, list[str]]:
    """The first arrangement that fits, and what did not fit (one phrase each), in this order of preference:
    on the training device, then in host RAM; in the compute dtype (bf16, or fp32 with the LayerNorm applied once
    when `norm`), then in the store's own dtype (float16 stays float16; raw tokens). `budgets` ({"cuda": bytes,
    "cpu": bytes}) replaces the measured budgets (tests)."""
    storage = torch.float16 if store.storage_dtype == "float16" else torch.float32
    compute = DTYPES[precision]
    arrangements = [(compute, norm)] + ([(storage, False)] if storage != compute else [])
    places = [device] + ([torch.device("cpu")] if device.type != "cpu" else [])
    refused = []
    for place in places:
        room = (budgets or {}).get(place.type, None)
        room = budget(place) if room is None else room
        for dtype, normed in arrangements:
            need = bank_nbytes(store, n_rows, n_views, n_layers, dtype)
            if need <= room:
                return BankPlan(place, dtype, normed, need), refused
            refused.append(f"{need / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')} on {place} "
                           f"(room for {room / 1e9:.2f} GB)")
    return None, refused


@dataclass
class TokenBank:
    """Tokens (L, rows x views, T, C) of some store rows (row-major: row k's view j is k * len(views) + j), on
    `tokens.device` in `tokens.dtype`."""

    tokens: torch.Tensor
    position: dict[int, int]  # store row -> bank row
    views: list[int]
    layers: list[int]
    normed: bool  # LayerNorm over the channels already applied (heads with `input_norm`)

    @classmethod
    def load(cls, store, rows: Sequence[int], views: Sequence[int], layers: Sequence[int],
             plan: BankPlan) -> "TokenBank":
        from tqdm.auto import tqdm

        grid_rows, cols = store.grid
        out = torch.empty((len(layers), len(rows) * len(views), grid_rows * cols, store.channels), dtype=plan.dtype,
                          device=plan.device)
        for k in tqdm(range(len(rows)), desc="load tokens", leave=False, disable=len(rows) < 64):
            for j, v in enumerate(views):
                x = torch.from_numpy(store.read(int(rows[k]), v, layers)).to(plan.device)
                out[:, k * len(views) + j] = F.layer_norm(x, x.shape[-1:]) if plan.normed else x
        return cls(out, {int(r): k for k, r in enumerate(rows)}, list(views), list(layers), plan.normed)

    def gather(self, bank_rows: torch.Tensor, views: torch.Tensor, layer_pos: list[int] | None = None) -> torch.Tensor:
        """(B, L, T, C) tokens of bank rows `bank_rows` in bank views `views` (positions in `self.views`); a
        transposed view of an (L, B, T, C) tensor, so that every layer's tokens are contiguous."""
        where = (bank_rows * len(self.views) + views).to(self.tokens.device)
        layers = range(len(self.layers)) if layer_pos is None else layer_pos
        out = self.tokens.new_empty((len(layers), len(where), *self.tokens.shape[2:]))
        for k, l in enumerate(layers):  # one index_select per layer: 3x faster than one over dim 1 (CPU, measured)
            torch.index_select(self.tokens[l], 0, where, out=out[k])
        return out.transpose(0, 1)
