"""Training: the loop every trainer shares, the contrastive trainer and its steps, losses, augmentations, optimiser, feature store, checkpoints, metrics, sharding."""
