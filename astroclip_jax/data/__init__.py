"""Data: the synthetic generator, tfds builders for synthetic and real files, the grain pipeline."""
