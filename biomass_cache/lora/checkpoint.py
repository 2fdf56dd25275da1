"""LoRA checkpoints: head and adapter tensors only (megabytes), plus the base backbone's identity, checked on load."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from biomass_cache.backbone.precision import check_precision
from biomass_cache.backbone.vit import Backbone, backbone_fingerprint, create_backbone, resolve_layers
from biomass_cache.common.content import sha256_file
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import write_bytes, write_json
from biomass_cache.common.targets import ZScore
from biomass_cache.heads import rebuild_head
from biomass_cache.lora.adapters import adapter_state, make_trainable
from biomass_cache.lora.model import LiveTokens
from biomass_cache.lora.settings import LoraSettings, adapted_blocks
from biomass_cache.store.fingerprint import of_lora
from biomass_cache.train import runs

ADAPTER_PREFIX, HEAD_PREFIX = "backbone.", "head."


def lora_fingerprint(bb: Backbone, s: LoraSettings) -> dict:
    """The run's fingerprint (kind "lora", fingerprint.of_lora) as config.json and the checkpoints record it."""
    return of_lora(bb, s, resolve_layers(s.layers, bb.depth), adapted_blocks(bb.depth, s.blocks)).to_dict()


def base_identity(bb: Backbone) -> dict:
    fp = backbone_fingerprint(bb)
    return {k: fp[k] for k in ("name", "weights_sha256", "random_seed", "overrides")}


def save_checkpoint(json_path: Path, head: nn.Module, meta: dict, live: LiveTokens) -> None:
    """Head + adapter tensors (never a frozen weight) to `<stem>.safetensors`, then the JSON beside it."""
    json_path = Path(json_path)
    tensors = {HEAD_PREFIX + k: v for k, v in head.state_dict().items()}
    tensors |= {ADAPTER_PREFIX + k: v for k, v in adapter_state(live.model).items()}
    weights = json_path.with_suffix(".safetensors")
    write_bytes(weights, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    write_json(json_path, {**meta, "kind": "lora", "base": base_identity(live.bb), "lora": asdict(live.s),
                           "weights_sha256": sha256_file(weights), "format_version": runs.FORMAT_VERSION})


def load_checkpoint(json_path: Path, weights: str | None = None, device: str = "cpu", precision: str | None = None):
    """(head, live tokens, meta) from a LoRA checkpoint; the base backbone is rebuilt from `weights` (default: the
    recorded path) and must be the one the adapters were trained on (name, weights sha256, seed, overrides). The
    backbone computes in `precision` (default: the one recorded at training, resolved on `device`)."""
    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    if meta.get("kind") != "lora":
        raise DataError(f"{json_path}: not a LoRA checkpoint (use runs.load_head for cached-token heads)")
    file = json_path.with_suffix(".safetensors")
    if sha256_file(file) != meta["weights_sha256"]:
        raise DataError(f"{file}: sha256 differs from the one recorded in {json_path.name} (file changed?)")
    s = LoraSettings(**{**meta["lora"], "size": tuple(meta["lora"]["size"]), "prefix_cache": None})
    s.weights = str(weights or s.weights)
    s.precision = check_precision(precision or s.precision)
    bb = create_backbone(s.backbone, s.weights, seed=s.backbone_seed, overrides=s.overrides)
    if base_identity(bb) != meta["base"]:
        raise DataError(f"{json_path}: the adapters were trained on base {meta['base']}, but {s.weights} gives "
                        f"{base_identity(bb)}; pass the original backbone weights")
    make_trainable(bb, s)
    live = LiveTokens(bb, s, torch.device(device))
    tensors = load_file(file)
    adapters = {k[len(ADAPTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
    mine = adapter_state(live.model)
    if set(adapters) != set(mine):
        raise DataError(f"{file}: adapter tensors {sorted(set(adapters) ^ set(mine))[:4]} do not match the model")
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(adapters[k])
    head = rebuild_head(meta["head"], ZScore.from_dict(meta["zscore"]))
    head.load_state_dict({k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)})
    return head.to(device).eval(), live.eval(), meta
