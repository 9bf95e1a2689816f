"""Flax modules and the model: the frozen towers, the trainable heads, the AstroCLIP model, the trainable/frozen partition, the tower-weight format."""
