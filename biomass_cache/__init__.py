"""biomass-cache: frozen DINOv3 patch tokens cached in Zarr, light readout heads trained on top."""

__version__ = "0.2.0"
