#!/usr/bin/env python
"""Stage one: frozen DINOv3 -> multi-layer patch tokens of every view, in a Zarr store (= `biomass extract`).

Several GPUs: torchrun --nproc-per-node N extract_features.py ...
"""

from biomass_cache.cli import run
from biomass_cache.cli.extract import extract_command

if __name__ == "__main__":
    run(extract_command)
