"""Stage two: readout heads trained on cached tokens - the settings, the loop, the cross-validation driver, the
dataset, losses, run folders, inference, plots and the hyper-parameter search."""
