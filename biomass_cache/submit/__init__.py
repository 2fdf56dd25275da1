"""Trained heads on new photos: ensembles, the submission, predictions for a folder, pseudo-labels and the offline
bundle."""
