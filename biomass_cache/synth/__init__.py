"""Synthetic Kaggle-format datasets: photos painted from known biomass, so the pipeline can be run and tested without
the competition's images."""
