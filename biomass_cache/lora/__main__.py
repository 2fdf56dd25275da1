"""python -m biomass_cache.lora ... (and under torchrun)."""

from biomass_cache.lora.cli import lora_command
from biomass_cache.runtime import run

run(lora_command)
