"""What every stage shares: the Kaggle table, the targets, the metric, the folds, the config loader, the error types,
atomic writes, content hashes and the device/rank helper. Imports nothing else of the package."""
