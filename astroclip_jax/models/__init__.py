"""Flax modules: the frozen image and spectrum towers and the trainable heads."""
