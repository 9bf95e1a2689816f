"""Converters from PyTorch checkpoints to tower directories (the only package that imports torch)."""
