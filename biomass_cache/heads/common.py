"""Pieces every head shares: target scaling, the per-layer -> component-space fusion, aux heads, MC-dropout.

A head only has to say how one layer's tokens become component masses (clover, dead, green) in g/m^2;
`FusedHead` fuses the layers with learned softmax weights in that space and rebuilds the five targets with
`components_to_targets`, so GDM = clover + green and Total = clover + dead + green hold by construction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from biomass_cache.common.targets import COMPONENTS, TOTAL, ZScore, components_to_targets, height_stats, target_stats
from biomass_cache.heads.intervals import IntervalHead, blend_components, normalise_interval

AUX_KEYS = ("height", "ndvi", "n_states")
FAN_IN_REF = 256  # `fan_in_lr_scales`: a weight with this fan-in or less trains at the configured learning rate
TOTAL_SCALES = ("std", "g/m^2")  # of the total's softplus; "g/m^2" only rebuilds old checkpoints


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus^-1, stable for large x (log(expm1(x)) = x + log(-expm1(-x)))."""
    return x + torch.log(-torch.expm1(-x))


def normalise_aux(aux: Mapping[str, Any] | None) -> dict:
    """Validated aux switches: height (bool), ndvi (bool), n_states (int, 0 = no State head)."""
    aux = dict(aux or {})
    unknown = sorted(set(aux) - set(AUX_KEYS))
    if unknown:
        raise ValueError(f"unknown aux option(s) {unknown}; expected a subset of {list(AUX_KEYS)}")
    n_states = int(aux.get("n_states", 0) or 0)
    if n_states < 0 or n_states == 1:
        raise ValueError(f"aux n_states must be 0 (off) or at least 2, got {n_states}")
    return {"height": bool(aux.get("height", False)), "ndvi": bool(aux.get("ndvi", False)), "n_states": n_states}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class AuxHeads(nn.Module):
    """Height (cm), NDVI (z) and State logits from the head's shared features of every layer (B, L, D).

    Reading the features the primary readout uses (not the raw tokens) is what lets the auxiliary tasks shape that
    representation, and gives PCGrad shared parameters to arbitrate.
    """

    def __init__(self, n_layers: int, features: int, aux: dict, dropout: float, height: tuple[float, float]):
        super().__init__()
        self.names = [n for n in ("height", "ndvi") if aux[n]]
        self.n_states = aux["n_states"]
        n_out = len(self.names) + self.n_states
        self.body = nn.Sequential(nn.LayerNorm(n_layers * features), nn.Dropout(dropout))
        self.out = nn.Linear(n_layers * features, n_out)
        self.register_buffer("height_stats", torch.tensor(height, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.out(self.body(features.flatten(1)))
        out: dict[str, torch.Tensor] = {}
        for k, name in enumerate(self.names):
            if name == "height":
                out["height"] = self.height_stats[0] + self.height_stats[1] * raw[:, k]
            else:
                out["ndvi_z"] = raw[:, k]
        if self.n_states:
            out["state_logits"] = raw[:, len(self.names) :]
        return out


class FusedHead(nn.Module):
    """Base class: per-layer component predictions, softmax layer fusion in component space, the contract outputs.

    Subclasses pass `features` (the width D of their shared per-layer representation) and implement
    `layer_components(tokens, return_maps)` returning components (B, L, 3) g/m^2 >= 0, density maps
    (B, L, 3, rows, cols) when asked and supported (else None), and the shared features (B, L, D) that the
    auxiliary heads read. The target statistics live in buffers so a checkpoint carries the exact scaling its
    weights were trained with. `interval` ({"bins": K, "blend": a}, see heads/intervals.py) adds bin logits of the
    five targets on the same features; a blend > 0 mixes their expected value into the components. A head whose
    `layer_components` returns maps sets `has_maps = True`: callers ask the head (or `heads.has_maps(config)` for a
    checkpoint), never its name.

    A head whose first step is the parameter-free LayerNorm of the tokens over their channels sets `input_norm =
    True`: `forward` applies it, unless told the tokens are `normed` already (a run's token bank normalises them
    once). Under autocast (bf16 training) only `layer_components` runs in the lower precision: the fusion, the
    five targets, intervals and auxiliary heads are computed in fp32.
    """

    name = "base"
    has_maps = False  # True: forward(tokens, return_maps=True) gives "density_map"
    input_norm = False  # True: the head starts with F.layer_norm(tokens) without parameters (see above)

    def __init__(
        self,
        *,
        n_layers: int,
        channels: int,
        grid: Sequence[int],
        zscore: ZScore,
        features: int,
        aux: Mapping[str, Any] | None = None,
        dropout: float = 0.1,
        layers: Sequence[int] | None = None,
        interval: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if n_layers < 1 or channels < 1 or len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"{self.name} head: need n_layers >= 1, channels >= 1, grid (rows, cols) >= 1; "
                             f"got n_layers={n_layers}, channels={channels}, grid={grid}")
        if layers is not None and len(layers) != n_layers:
            raise ValueError(f"{self.name} head: layers {list(layers)} do not match n_layers={n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self.name} head: dropout must be in [0, 1), got {dropout}")
        self.n_layers, self.channels, self.grid, self.dropout = int(n_layers), int(channels), grid, float(dropout)
        self.aux = normalise_aux(aux)
        self.total_scale = "std"  # of a total + ratio readout; `set_total_scale` records another choice
        self.layers = None if layers is None else [int(l) for l in layers]
        mean, std = target_stats(zscore)
        self.register_buffer("target_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(std, dtype=torch.float32))
        self.fusion_logits = nn.Parameter(torch.zeros(n_layers))
        self.aux_heads = (
            AuxHeads(n_layers, features, self.aux, dropout, height_stats(zscore))
            if any(self.aux.values()) else None
        )
        self.interval = normalise_interval(interval)
        self.interval_head = (IntervalHead(n_layers, features, self.interval["bins"], dropout)
                              if self.interval else None)
        self._extra_config: dict[str, Any] = {}

    def _set_config(self, **kw: Any) -> None:
        """Record the head-specific constructor arguments (JSON-able) for `config`."""
        self._extra_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the z-score needed to rebuild this architecture with `create_head(**config, zscore=)`."""
        return {
            "name": self.name,
            "n_layers": self.n_layers,
            "channels": self.channels,
            "grid": list(self.grid),
            "aux": dict(self.aux),
            "dropout": self.dropout,
            "layers": self.layers,
            **({"interval": dict(self.interval)} if self.interval else {}),
            **self._extra_config,
        }

    def lr_scales(self) -> dict[int, float]:
        """Learning-rate multiplier per parameter (by `id`), 1 where absent; `fan_in_lr_scales` is one choice."""
        return {}

    def fan_in_lr_scales(self) -> dict[int, float]:
        """min(1, FAN_IN_REF / fan-in) for the weights of every Linear and convolution.

        Adam moves every weight by about the learning rate per step, whatever its gradient, so the change of a
        unit's input per step grows with the unit's fan-in: at lr 4e-3 a readout of a 1024-channel cache (fan-in
        2048) or a 4096-wide bottleneck moves the prediction by tens of std in one step. Dividing by the fan-in
        (muP's rule for Adam) makes the step size of the function independent of the cache's width and the head's.
        """
        scales = {}
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):  # each output cell sees in_channels inputs at stride = kernel
                fan_in = m.in_channels * math.prod(k // s for k, s in zip(m.kernel_size, m.stride))
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
            elif isinstance(m, nn.Linear):
                fan_in = m.in_features
            else:
                continue
            scales[id(m.weight)] = min(1.0, FAN_IN_REF / max(fan_in, 1))
        return scales

    def components_mean(self) -> torch.Tensor:
        """Training mean of the component densities, for output-bias initialisation."""
        return self.target_mean[: len(COMPONENTS)].clamp_min(1e-3)

    def set_total_scale(self, total_scale: str) -> None:
        """Choose (and record in `config`) the scale of the softplus on the total; see `total_ratio_to_components`."""
        if total_scale not in TOTAL_SCALES:
            raise ValueError(f"{self.name} head: total_scale must be one of {list(TOTAL_SCALES)}, got {total_scale!r}")
        self.total_scale = total_scale
        self._extra_config["total_scale"] = total_scale

    def total_ratio_to_components(self, raw: torch.Tensor) -> torch.Tensor:
        """(..., 4) = raw total + 3 ratio logits -> (..., 3) component masses, >= 0.

        "std": total = target std * softplus(raw), the softplus in units of the total's training std, so an
        overshoot of a few std below 0 g still has a gradient that brings it back. "g/m^2" (checkpoints from
        before the key existed): softplus of the inverse z-score in g/m^2, a hard floor whose gradient is 0 once
        the raw total sits a fraction of a std below 0 g, where a head can stay for good.
        """
        std = self.target_std[TOTAL]
        if self.total_scale == "std":
            total = std * F.softplus(raw[..., 0])
        else:
            total = F.softplus(raw[..., 0] * std + self.target_mean[TOTAL])
        return total[..., None] * torch.softmax(raw[..., 1:], dim=-1)

    def total_ratio_layers(
        self, outputs: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        """Per-layer (raw total + ratio logits (B, 4), shared features (B, D)) -> `layer_components`' triple."""
        raw, features = (torch.stack(x, dim=1) for x in zip(*outputs))
        return self.total_ratio_to_components(raw), None, features

    def init_total_ratio_readout(self, linear: nn.Linear) -> None:
        """Start at the training mean for every image: zero weights (muP's readout initialisation: the first steps
        cannot swing the prediction through a wide hidden layer), bias = the raw total that gives the mean total
        and ratio logits = log of the mean composition. Old checkpoints ("g/m^2") started with random weights."""
        mean = self.components_mean()
        start = inverse_softplus(self.target_mean[TOTAL].clamp_min(1e-3) / self.target_std[TOTAL])
        with torch.no_grad():
            if self.total_scale == "std":
                linear.weight.zero_()
            linear.bias[0] = start if self.total_scale == "std" else 0.0
            linear.bias[1:] = torch.log(mean / mean.sum())

    def layer_components(
        self, tokens: torch.Tensor, return_maps: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(components (B, L, 3), maps (B, L, 3, rows, cols) or None, shared features (B, L, D) or, when not
        `uses_features`, None)."""
        raise NotImplementedError

    def check_tokens(self, tokens: torch.Tensor) -> None:
        rows, cols = self.grid
        want = (self.n_layers, rows * cols, self.channels)
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != want:
            raise ValueError(f"{self.name} head expects tokens (B, L, T, C) = (B, {want[0]}, {want[1]}, {want[2]}) "
                             f"for grid {self.grid}, got {tuple(tokens.shape)}")

    def forward(self, tokens: torch.Tensor, return_maps: bool = False, normed: bool = False) -> dict[str, torch.Tensor]:
        self.check_tokens(tokens)
        if self.input_norm and not normed:
            tokens = F.layer_norm(tokens, tokens.shape[-1:])
        per_layer, maps, features = self.layer_components(tokens, return_maps)
        with torch.autocast(tokens.device.type, enabled=False):
            return self.fuse(per_layer.float(), None if maps is None else maps.float(),
                             None if features is None else features.float(), return_maps)

    @property
    def uses_features(self) -> bool:
        """Whether the shared features are read (by the auxiliary or interval heads): `layer_components` may skip
        computing them (None) otherwise."""
        return self.aux_heads is not None or self.interval_head is not None

    def fuse(self, per_layer: torch.Tensor, maps: torch.Tensor | None, features: torch.Tensor | None,
             return_maps: bool) -> dict[str, torch.Tensor]:
        """`layer_components`' outputs -> the contract outputs (fp32)."""
        weights = torch.softmax(self.fusion_logits, dim=0)
        components = torch.einsum("blk,l->bk", per_layer, weights)
        interval_logits = None if self.interval_head is None else self.interval_head(features)
        if interval_logits is not None and self.interval["blend"] > 0:
            components = blend_components(components, self.interval_head.expected(interval_logits),
                                          self.interval["blend"])
        total = components.sum(dim=-1)
        five = components_to_targets(components)
        out = {
            "components": components,
            "total_z": (total - self.target_mean[TOTAL]) / self.target_std[TOTAL],
            "ratio": components / total.clamp_min(1e-6)[..., None],
            "five_z": (five - self.target_mean) / self.target_std,
            "layer_weights": weights,
            "layer_components": per_layer,
        }
        if return_maps:
            if not self.has_maps:
                raise ValueError(f"the {self.name} head has no density maps (return_maps=True needs a head with "
                                 f"has_maps, e.g. 'density')")
            out["density_map"] = torch.einsum("blkhw,l->bkhw", maps, weights)
        if self.aux_heads is not None:
            out.update(self.aux_heads(features))
        if interval_logits is not None:
            out["interval_logits"] = interval_logits
        return out


def run_head(head: nn.Module, tokens: torch.Tensor, normed: bool = False, **kw: Any) -> dict[str, torch.Tensor]:
    """The one way to call a head on tokens: in bf16 autocast when the tokens are bf16 (a bf16 run's bank);
    `normed`: the tokens had the head's input LayerNorm applied already (`FusedHead.input_norm`)."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.dtype == torch.bfloat16):
        return head(tokens, normed=normed, **kw)


def head_signature(head: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """What a head needs from a token cache: layer count (and block indices if known), channels, grid."""
    cfg = head.config if isinstance(head, nn.Module) else head
    return {"n_layers": int(cfg["n_layers"]), "channels": int(cfg["channels"]), "grid": [int(g) for g in cfg["grid"]],
            "layers": None if cfg.get("layers") is None else [int(l) for l in cfg["layers"]]}


def _cache_signature(store_like: Any) -> dict[str, Any]:
    """Layers, channels and grid of a TokenStore (attributes) or a dict (a signature, config or store attrs)."""
    get = store_like.get if isinstance(store_like, Mapping) else lambda k, d=None: getattr(store_like, k, d)
    layers = get("layers")
    n_layers = len(layers) if layers is not None else get("n_layers")
    if n_layers is None or get("channels") is None or get("grid") is None:
        raise ValueError(f"cannot read layers/channels/grid from {type(store_like).__name__} {store_like!r}")
    return {"n_layers": int(n_layers), "channels": int(get("channels")), "grid": [int(g) for g in get("grid")],
            "layers": None if layers is None else [int(l) for l in layers]}


def check_compatible(config: Mapping[str, Any], store_like: Any) -> None:
    """Refuse a token cache whose layers, channel width or patch grid differ from what the head was built for.

    With recorded block indices every head layer must be in the cache; otherwise the layer counts must match.
    """
    head, cache = head_signature(config), _cache_signature(store_like)
    where = getattr(store_like, "path", None) or "the cache"
    problems = []
    if head["channels"] != cache["channels"]:
        problems.append(f"channels {head['channels']} (head) vs {cache['channels']} ({where})")
    if head["grid"] != cache["grid"]:
        problems.append(f"grid {head['grid']} (head) vs {cache['grid']} ({where})")
    if head["layers"] is not None and cache["layers"] is not None:
        absent = [l for l in head["layers"] if l not in cache["layers"]]
        if absent:
            problems.append(f"layers {head['layers']} (head) not all in {cache['layers']} ({where}); missing {absent}")
    elif head["n_layers"] != cache["n_layers"]:
        problems.append(f"{head['n_layers']} layers (head) vs {cache['n_layers']} ({where})")
    if problems:
        raise ValueError(f"head '{config.get('name', '?')}' is incompatible with {where}: " + "; ".join(problems))


def enable_mc_dropout(module: nn.Module) -> nn.Module:
    """Eval mode everywhere except nn.Dropout modules, which stay stochastic (MC-dropout at inference)."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.train()
    return module


def tokens_to_grid(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, T, C) row-major patch tokens -> (B, C, rows, cols)."""
    rows, cols = grid
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)
