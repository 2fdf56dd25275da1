#!/usr/bin/env python
"""Stage two: train readout heads on cached tokens (= `biomass train`).

With --lora the backbone runs live with LoRA adapters instead of reading the cache (= `biomass lora`):
    python train_heads.py --lora --data DATA --backbone NAME --weights PATH --size WxH --layers ... --out RUN
See `python train_heads.py --lora --help` for its options.
"""

import sys

from biomass_cache.cli import run
from biomass_cache.cli.lora import lora_command
from biomass_cache.cli.train import train_command

if __name__ == "__main__":
    if "--lora" in sys.argv[1:]:
        sys.argv.remove("--lora")
        run(lora_command)
    else:
        run(train_command)
