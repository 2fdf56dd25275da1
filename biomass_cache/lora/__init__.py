"""The LoRA path: adapt the last K blocks of the frozen DINOv3 backbone with peft adapters, running it live.

Everything but the token source is stage two's (`biomass_cache.train.crossval.cross_validate`): heads, losses, mixup,
uncertainty weighting, PCGrad, EMA, folds, metrics and the run folder. Here the tokens come from `LiveTokens`, an
nn.Module whose trainable parameters are the adapters only; it runs either the whole backbone on augmented pixels (a
fresh view per epoch) or, with a prefix cache (`data.build_prefix_cache`), only blocks [depth-K, depth) on the
stored hidden state entering block depth-K.

Checkpoints hold adapter and head tensors only (megabytes), plus the base backbone's name and weights sha256,
checked on load. Scale-out: `torchrun --nproc-per-node N train_heads.py --lora ...` (gloo on CPU, nccl on GPU).

| module | job |
|---|---|
| `settings.py` | `LoraSettings`, the [lora] config section and its checks |
| `adapters.py` | what trains: peft adapters (injection, seeded re-initialisation) or whole blocks |
| `model.py` | the split forward on timm's Eva, `LiveTokens` (stage two's token source) |
| `data.py` | images or stored hidden states with labels, the DDP sampler, the prefix cache |
| `checkpoint.py` | save and load adapter + head checkpoints |
| `predict.py` | predictions of a checkpoint and of an ensemble member |
| `train.py` | `run_lora`: cross-validation on one process or under torchrun |
"""

from biomass_cache.lora.adapters import adapter_state, base_state, inject_lora, make_trainable, reset_adapters
from biomass_cache.lora.checkpoint import base_identity, load_checkpoint, lora_fingerprint, save_checkpoint
from biomass_cache.lora.data import EpochSampler, LiveDataset, build_prefix_cache
from biomass_cache.lora.model import LiveTokens
from biomass_cache.lora.predict import predict_images, predict_member
from biomass_cache.lora.settings import LoraSettings, load_settings
from biomass_cache.lora.train import run_lora

__all__ = [
    "LiveDataset", "LiveTokens", "EpochSampler", "LoraSettings", "adapter_state", "base_identity", "base_state",
    "build_prefix_cache", "inject_lora", "load_checkpoint", "make_trainable", "load_settings", "lora_fingerprint",
    "predict_images", "predict_member", "reset_adapters", "run_lora", "save_checkpoint",
]
