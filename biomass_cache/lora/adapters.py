"""What trains on the live path: peft LoRA adapters on the last blocks of a timm DINOv3 (injection, seeded
re-initialisation, their tensors), or with `finetune = "full"` those blocks' own weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from biomass_cache.backbone.vit import Backbone
from biomass_cache.common.errors import DataError
from biomass_cache.lora.settings import LoraSettings, adapted_blocks, target_regex


def is_lora_layer(module: nn.Module) -> bool:
    """Whether peft turned `module` into a LoRA layer. peft (and the transformers it loads, seconds of start-up) is
    imported only here and in `inject_lora`, so commands that never touch LoRA start without it."""
    from peft.tuners.lora import LoraLayer  # after biomass_cache.backbone.vit, which makes timm/torchvision importable

    return isinstance(module, LoraLayer)


def inject_lora(bb: Backbone, s: LoraSettings, seed: int = 0) -> list[str]:
    """Add peft LoRA adapters to `s.targets` of the last `s.blocks` blocks (in place); returns the adapted names.

    On `_qkvb` variants the attention calls F.linear on the raw qkv weight, bypassing any wrapper: those blocks are
    switched to `qkv_bias_separate` (qkv(x) + bias, the same function) so the adapter is really applied.
    """
    model = bb.model
    blocks = adapted_blocks(bb.depth, s.blocks)
    expected = [f"blocks.{b}.{t}" for b in blocks for t in s.targets]
    modules = dict(model.named_modules())
    absent = [n for n in expected if not isinstance(modules.get(n), nn.Linear)]
    if absent:
        raise DataError(f"LoRA targets {absent[:4]} are not Linear layers of {bb.name}; "
                         f"valid targets are Linear modules inside a block, e.g. attn.qkv, attn.proj, mlp.fc1")
    if "attn.qkv" in s.targets:
        for b in blocks:
            attn = model.blocks[b].attn
            if not hasattr(attn, "qkv_bias_separate"):
                raise DataError(f"blocks.{b}.attn ({type(attn).__name__}) is not timm's EvaAttention: cannot "
                                 "check that a LoRA on its qkv is applied")
            if getattr(attn, "q_bias", None) is not None:
                attn.qkv_bias_separate = True
    import peft

    config = peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                             target_modules=target_regex(blocks, s.targets))
    peft.inject_adapter_in_model(config, model)
    reset_adapters(model, seed)
    adapted = sorted(n for n, m in model.named_modules() if is_lora_layer(m))
    if adapted != sorted(expected):
        raise RuntimeError(f"peft adapted {adapted}, expected {sorted(expected)}")
    stray = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if stray:
        raise RuntimeError(f"non-adapter parameters became trainable: {stray[:4]}")
    return adapted


def make_trainable(bb: Backbone, s: LoraSettings) -> list[str]:
    """The trainable part of the live backbone: LoRA adapters (`inject_lora`), or with `s.finetune == "full"` every
    weight of the last `s.blocks` blocks (the rest stays frozen). Returns the trainable modules' or tensors' names."""
    if s.finetune == "lora":
        return inject_lora(bb, s)
    if s.finetune != "full":
        raise DataError(f"finetune must be lora or full, got {s.finetune!r}")
    prefixes = tuple(f"blocks.{b}." for b in adapted_blocks(bb.depth, s.blocks))
    for n, p in bb.model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    return sorted(adapter_state(bb.model))


def reset_adapters(model: nn.Module, seed: int) -> None:
    """Fresh adapters (A random, B = 0: the model's output is unchanged), a pure function of `seed`: identical on
    every rank, in every rerun, and for every fold (the adapters are re-initialised, never re-injected)."""
    gen = torch.Generator().manual_seed(seed)
    layers = sorted((n, m) for n, m in model.named_modules() if is_lora_layer(m))
    with torch.no_grad():
        for _, m in layers:  # peft's default init, drawn on the CPU so every device gets the same numbers
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            bound = 1 / math.sqrt(a.shape[1])  # = kaiming_uniform_(a=sqrt(5)), nn.Linear's default
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen))
            b.zero_()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by their model names: the adapters (each contains `lora_`), or the fine-tuned blocks'
    weights."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor (for bit-equality checks)."""
    return {n: t for n, t in model.state_dict().items() if "lora_" not in n}
