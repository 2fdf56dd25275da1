#!/usr/bin/env python
"""Stage one: frozen DINOv3 -> multi-layer patch tokens of every view, in a Zarr store (= `biomass extract`).

Several GPUs: torchrun --nproc-per-node N extract_features.py ...
"""

import typer

from biomass_cache.extract import extract_command

if __name__ == "__main__":
    typer.run(extract_command)
