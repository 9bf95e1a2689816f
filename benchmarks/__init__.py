"""Benchmarks of astroclip-jax against the PyTorch baseline (`torch_baseline` is also the
test suite's reference step)."""
