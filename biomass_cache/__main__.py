"""`python -m biomass_cache COMMAND ...` is `biomass COMMAND ...`; torchrun starts commands this way
(`torchrun --nproc-per-node N -m biomass_cache extract ...`)."""

from biomass_cache.cli import main

main()
